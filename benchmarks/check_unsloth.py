"""GPU check of the project's ``unsloth`` backend without vLLM (issue 9 item 6, issue 13): not a test, a script the
lead runs on the GPU machine, and whose JSON goes into BENCHMARKS.md.

It runs ``training.train`` with ``backend="unsloth"`` for a few steps with the project's rewards, callbacks and
metrics (vLLM absent, so Unsloth loads with ``fast_inference=False`` and trains with ``use_vllm=False``), checks
that the project's metrics are in the log history, re-evaluates the saved adapter through ``evaluation.py`` (from
disk, and the trained model still in memory), trains the same configuration with ``backend="trl"`` in a fresh
process (no Unsloth patches there) and prints how the two runs' effective trainer arguments differ::

    python benchmarks/check_unsloth.py --model MODEL_DIR --tokenizer TOK_DIR --gsm8k-dir GSM8K_DIR \\
        --steps 3 --max-completion-length 128 --eval-limit 64 --out check_unsloth.json

``MODEL_DIR`` is a local model folder (e.g. Qwen2.5-0.5B-Instruct, or ``bench_train.py make-model``'s random
0.5B-shaped one); ``tiny-random-qwen2`` runs the tiny random model. Exit status 0 when every check passed.
Dry run on a CPU with the stand-in Unsloth of the tests::

    PYTHONPATH=tests/standins python benchmarks/check_unsloth.py --model tiny-random-qwen2 --steps 2 \\
        --max-completion-length 8 --eval-limit 4 --out /tmp/check_unsloth.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("LENGTHRL_SMOKE", "0")

# The project's metrics (RewardMonitor) and TRL's, logged at every step whatever the completions say (the length
# correlations and model_efficiency are left out when undefined, e.g. nothing correct).
REQUIRED_METRICS = ("accuracy", "format_accuracy", "mean_length", "out_of_limit", "whole_groups", "reward", "kl",
                    "completions/mean_length", "frac_reward_zero_std")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model folder, or tiny-random-qwen2")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: found by runtime.py)")
    parser.add_argument("--gsm8k-dir", default=None, help="GSM8K folder (default: found by runtime.py)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per backend")
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--eval-limit", type=int, default=64, help="test questions for the re-evaluation")
    parser.add_argument("--method", default="baseline")
    parser.add_argument("--memory-gib", type=float, default=None, help="cap this process's GPU memory (a T4: 15)")
    parser.add_argument("--work", default="outputs/check_unsloth", help="run folders go here (replaced)")
    parser.add_argument("--out", default="check_unsloth.json", help="the JSON summary")
    parser.add_argument("--backend", default="unsloth", choices=("unsloth", "trl"),
                        help="trl: only train the comparison run (the script runs itself so for the comparison)")
    return parser.parse_args(argv)


def train_config(args: argparse.Namespace, backend: str):
    import training

    return training.TrainConfig(
        method=args.method, backend=backend, model=args.model, tokenizer=args.tokenizer, gsm8k_dir=args.gsm8k_dir,
        smoke=False, max_steps=args.steps, train_size=max(8, 2 * args.steps),  # 2 questions (16 completions) a step
        max_completion_length=args.max_completion_length, save_steps=args.steps, report_to="none",
        live_view=False, resume=False, output_dir=str(Path(args.work) / backend))


def run_backend(args: argparse.Namespace, backend: str) -> tuple[dict, object]:
    """Train ``backend``; returns (record, TrainResult or None). The record holds the run's run_config.json, the
    metrics found in its log history, or the one-line stop (``StageFailure``) and its stage."""
    import shutil

    import backends
    import training

    shutil.rmtree(Path(args.work) / backend, ignore_errors=True)
    started = time.perf_counter()
    try:
        result = training.train(train_config(args, backend))
    except backends.StageFailure as stop:
        return {"backend": backend, "ok": False, "stopped": str(stop), "stage": stop.stage,
                "seconds": time.perf_counter() - started}, None
    run_config = json.loads((result.adapter_dir / "run_config.json").read_text(encoding="utf-8"))
    steps = [entry for entry in result.log_history if "accuracy" in entry]
    missing = sorted({name for entry in steps for name in REQUIRED_METRICS if name not in entry}
                     | (set(REQUIRED_METRICS) if not steps else set()))
    adapter_files = sorted(path.name for path in result.adapter_dir.iterdir())
    record = {
        "backend": backend, "ok": not missing and len(steps) == args.steps and "adapter_model.safetensors" in
        adapter_files, "seconds": time.perf_counter() - started, "global_step": result.global_step,
        "logged_steps": [entry["step"] for entry in steps], "missing_metrics": missing,
        "last_step": {name: steps[-1].get(name) for name in REQUIRED_METRICS} if steps else None,
        "adapter_files": adapter_files, "run_config": run_config,
    }
    return record, result


def evaluate(args: argparse.Namespace, result, from_disk: bool) -> dict:
    """The saved adapter through evaluation.py: loaded from disk (the Eval notebooks), or the trained model still
    in memory (``training.evaluate_adapter``, the training notebooks)."""
    import evaluation
    import training

    started = time.perf_counter()
    try:
        if from_disk:
            config = evaluation.EvalConfig(
                model=args.model, adapter=str(result.adapter_dir), limit=args.eval_limit, smoke=False,
                max_new_tokens=args.max_completion_length, tokenizer=args.tokenizer, gsm8k_dir=args.gsm8k_dir,
                output_dir=str(Path(args.work) / "eval-from-disk"), progress=False)
            summary = evaluation.evaluate(config)
        else:
            summary = training.evaluate_adapter(result, limit=args.eval_limit)
    except Exception as error:  # recorded, not raised: the other checks still report
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000],
                "seconds": time.perf_counter() - started}
    metrics = summary["metrics"]
    return {"ok": metrics["n"] == args.eval_limit, "seconds": time.perf_counter() - started,
            "backend": summary["backend"], "backend_reason": summary["backend_reason"], "n": metrics["n"],
            "accuracy": metrics["accuracy"]["value"],
            "generation_info": summary.get("generation_info")}


def trl_comparison(args: argparse.Namespace) -> dict:
    """The same configuration trained with ``backend="trl"`` in a fresh process (Unsloth patches TRL for the whole
    process that imported it)."""
    out = Path(args.work) / "trl.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--backend", "trl", "--model", args.model,
               "--steps", str(args.steps), "--max-completion-length", str(args.max_completion_length),
               "--method", args.method, "--work", args.work, "--out", str(out)]
    for option, value in (("--tokenizer", args.tokenizer), ("--gsm8k-dir", args.gsm8k_dir),
                          ("--memory-gib", args.memory_gib)):
        if value is not None:
            command += [option, str(value)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0 or not out.is_file():
        return {"ok": False, "returncode": completed.returncode, "stderr": completed.stderr[-3000:]}
    return json.loads(out.read_text(encoding="utf-8"))["trl"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_gib:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_train import cap_memory

        cap_memory(args.memory_gib)
    import backends
    import training

    record, result = run_backend(args, args.backend)
    summary: dict = {"versions": backends.stack_versions(), "gpu": backends.gpu_status(), "arguments": vars(args),
                     args.backend: record}
    if args.backend == "unsloth" and result is not None:
        summary["eval_from_disk"] = evaluate(args, result, from_disk=True)
        summary["eval_in_memory"] = evaluate(args, result, from_disk=False)
        trl = trl_comparison(args)
        summary["trl"] = trl
        if trl.get("run_config"):
            diff = training.compare_arguments(trl["run_config"]["effective_args"],
                                              record["run_config"]["effective_args"])
            summary["effective_args_trl_vs_unsloth"] = diff
            print("Effective trainer arguments, trl vs unsloth:")
            for name, (first, second) in diff["different"].items():
                print(f"  {name}: trl {first!r}  unsloth {second!r}")
            print(f"  only in unsloth: {', '.join(diff['only_second']) or '-'}; only in trl: "
                  f"{', '.join(diff['only_first']) or '-'}")
        summary["ok"] = all(part.get("ok") for part in (record, summary["eval_from_disk"],
                                                        summary["eval_in_memory"], trl))
    else:
        summary["ok"] = record["ok"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    first_minutes = (record.get("run_config") or {}).get("first_minutes", {})
    print(f"{args.backend}: {'ok' if summary['ok'] else 'FAILED'}; {record.get('stopped') or ''}"
          f"{first_minutes.get('seconds_per_step')} s a step; summary in {args.out}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
