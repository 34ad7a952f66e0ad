"""Benchmark GRPO training steps of training.py on a GPU: seconds per step, peak memory, tokens per second.

Not a test: run it on a GPU and copy the numbers into BENCHMARKS.md ("## Training")::

    python benchmarks/bench_train.py make-model /tmp/qwen05b            # random 0.5B-shaped model, fp16
    python benchmarks/bench_train.py run --model /tmp/qwen05b --tokenizer TOK --gsm8k-dir DIR \\
        --layouts 4x4,8x2 --steps 3 --memory-gib 15 --out train_bench.json
    accelerate launch --config_file configs/accelerate_2gpu.yaml benchmarks/bench_train.py dist \\
        --model /tmp/qwen05b --tokenizer TOK --gsm8k-dir DIR --method group --max-steps 3 --out dist.json

The model is Qwen2.5-0.5B-shaped (benchmarks/bench_eval.qwen05b_config: 24 layers, hidden 896, 14 heads,
2 KV heads, vocab 151,936, tied embeddings) with random weights: it almost never samples EOS, so every
completion runs to the full 512 tokens, the worst case for memory and time. Each process is capped at
``--memory-gib`` GiB (``torch.cuda.set_per_process_memory_fraction``) to stand in for a 15 GB T4. The trl
backend with transformers generation is used (vLLM off), fp16 as on a T4.

A layout ``PxS`` is per_device_train_batch_size x steps_per_generation (completions per micro-batch x
micro-batches per optimizer step); with 8 completions per question, 4x4 and 8x2 both give 16 completions
(2 whole groups) per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import runtime  # noqa: E402
import training  # noqa: E402

GIB = 2**30


def make_model(folder: str) -> None:
    """Save a randomly initialised Qwen2.5-0.5B-shaped model (fp16) to ``folder``."""
    import torch
    from bench_eval import qwen05b_config, random_model

    started = time.perf_counter()
    model = random_model(qwen05b_config(), torch.float16, "cuda" if torch.cuda.is_available() else "cpu")
    model.config.architectures = ["Qwen2ForCausalLM"]
    model.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"saved {parameters / 1e6:.0f}M parameters to {folder} in {time.perf_counter() - started:.0f} s")


def cap_memory(gib: float) -> int:
    """Cap this process's CUDA allocations at ``gib`` GiB on its own device; returns the device index."""
    import torch

    device = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():  # CPU dry run of the script itself
        return device
    torch.cuda.set_device(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return device


def step_timer():
    """A TrainerCallback that records the wall time and the peak memory of every optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.peak_allocated = 0
            self.peak_reserved = 0
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.peak_allocated = max(self.peak_allocated, torch.cuda.max_memory_allocated())
                self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def summarise(timer, history: list[dict], completions_per_step: int) -> dict:
    """Per-step seconds (the first step, with its warm-up, is reported but left out of the means)."""
    steps = [e for e in history if "num_tokens" in e and "loss" in e]
    tokens = [e["num_tokens"] for e in steps]  # cumulative prompt + completion tokens (TRL)
    per_step_tokens = [b - a for a, b in zip([0, *tokens], tokens)]
    generated = [e["completions/mean_length"] * completions_per_step for e in steps]
    warm = timer.seconds[1:] or timer.seconds
    warm_tokens = per_step_tokens[1:] or per_step_tokens
    warm_generated = generated[1:] or generated
    mean = sum(warm) / len(warm)
    return {
        "step_seconds": [round(s, 2) for s in timer.seconds],
        "mean_step_seconds": round(mean, 2),
        "peak_allocated_gib": round(timer.peak_allocated / GIB, 2),
        "peak_reserved_gib": round(timer.peak_reserved / GIB, 2),
        "tokens_per_s": round(sum(warm_tokens) / sum(warm), 1),
        "generated_tokens_per_s": round(sum(warm_generated) / sum(warm), 1),
        "mean_completion_length": round(sum(e["completions/mean_length"] for e in steps) / len(steps), 1),
        "whole_groups": [e.get("whole_groups") for e in steps],
        "hours_for_2000_steps": round(mean * 2000 / 3600, 1),
    }


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "peft", "accelerate"):
        versions[name] = __import__(name).__version__
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "versions": versions}


def bench_config(args, per_device: int, steps_per_generation: int, method: str, output: Path):
    return training.TrainConfig(
        method=method, model=args.model, tokenizer=args.tokenizer, gsm8k_dir=args.gsm8k_dir, backend="trl",
        smoke=False, precision=args.precision, per_device_train_batch_size=per_device,
        steps_per_generation=steps_per_generation, max_steps=args.steps, train_size=400, save_steps=10_000,
        report_to="none", live_view=False, output_dir=str(output), grpo_overrides={"use_vllm": False})


def run(args) -> None:
    import torch

    runtime.import_wandb_early()
    cap_memory(args.memory_gib)
    report = {"memory_cap_gib": args.memory_gib, **environment(), "layouts": []}
    out = Path(args.out)
    for layout in args.layouts.split(","):
        per_device, steps_per_generation = (int(x) for x in layout.lower().split("x"))
        config = bench_config(args, per_device, steps_per_generation, args.method,
                              Path(args.workdir) / f"layout-{layout}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timer = step_timer()
        row = {"layout": layout, "per_device_train_batch_size": per_device,
               "steps_per_generation": steps_per_generation,
               "completions_per_step": per_device * steps_per_generation, "num_generations": config.num_generations}
        try:
            result = training.train(config, callbacks=[timer])
            row.update(summarise(timer, result.log_history, row["completions_per_step"]))
        except torch.OutOfMemoryError as error:
            row.update({"oom": True, "error": str(error).splitlines()[0][:300], "step_seconds": timer.seconds,
                        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)})
        report["layouts"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(report, indent=2))  # after every layout: a timeout keeps what is done


def dist(args, parser_args) -> None:
    import torch.distributed as torch_dist

    runtime.import_wandb_early()
    cap_memory(args.memory_gib)
    config = training.config_from_args(parser_args)
    timer = step_timer()
    result = training.train(config, callbacks=[timer])
    mine = {"rank": runtime.rank(), "step_seconds": [round(s, 2) for s in timer.seconds],
            "peak_allocated_gib": round(timer.peak_allocated / GIB, 2),
            "peak_reserved_gib": round(timer.peak_reserved / GIB, 2)}
    everyone = [None] * torch_dist.get_world_size() if torch_dist.is_initialized() else [mine]
    if torch_dist.is_initialized():
        torch_dist.all_gather_object(everyone, mine)
    if mine["rank"] == 0:
        completions = config.per_device_train_batch_size * config.steps_per_generation * len(everyone)
        batches = [json.loads(line) for line in (result.output_dir / "batches.jsonl").read_text().splitlines()]
        owners = []
        for batch in batches:
            groups: dict = {}
            for qid, process in zip(batch["question_ids"], batch["processes"]):
                groups.setdefault(qid, set()).add(process)
            owners.append({str(q): sorted(p) for q, p in groups.items()})
        report = {"memory_cap_gib": args.memory_gib, **environment(), "processes": everyone,
                  "completions_per_step": completions, "method": config.method,
                  "summary": summarise(timer, result.log_history, completions),
                  "group_owners_per_step": owners,
                  "every_group_on_one_process": all(len(p) == 1 for step in owners for p in step.values())}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "group_owners_per_step"}), flush=True)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"make-model", "run", "dist"}:
        raise SystemExit("usage: bench_train.py {make-model FOLDER | run ... | dist ...} (see the docstring)")
    command, rest = argv[0], argv[1:]
    if command == "make-model":
        make_model(rest[0])
        return
    if command == "run":
        parser = argparse.ArgumentParser(prog="bench_train.py run")
        parser.add_argument("--model", required=True)
        parser.add_argument("--tokenizer", default=None)
        parser.add_argument("--gsm8k-dir", default=None)
        parser.add_argument("--method", default="group")
        parser.add_argument("--layouts", default="4x4,8x2")
        parser.add_argument("--steps", type=int, default=3)
        parser.add_argument("--precision", default="fp16")
        parser.add_argument("--memory-gib", type=float, default=15.0)
        parser.add_argument("--workdir", default="/tmp/bench_train")
        parser.add_argument("--out", default="train_bench.json")
        run(parser.parse_args(rest))
        return
    # dist: training.py's own options, plus where to write and the memory cap
    parser = training.build_parser()
    parser.add_argument("--memory-gib", type=float, default=15.0)
    parser.add_argument("--out", default="train_bench_dist.json")
    parsed = parser.parse_args(rest)
    dist(parsed, parsed)


if __name__ == "__main__":
    main()
