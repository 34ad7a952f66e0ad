r"""GRPO training of Qwen2.5-0.5B-Instruct on GSM8K with the length-aware rewards of ``rewards.METHODS``.

One builder serves the four training notebooks, the command line and multi-GPU runs::

    import training
    result = training.train(training.TrainConfig(method="group", lam=0.5))
    training.plot_training_curves(result.output_dir)
    # evaluate result.adapter_dir with evaluation.py

    python training.py --method group [--lam 0.3 ...]          # train, then evaluate (evaluation.py)
    python training.py                                          # no GPU: the CPU smoke configuration
    accelerate launch --config_file configs/accelerate_2gpu.yaml training.py --method group

A method is one entry of ``rewards.METHODS``: ``lam`` reaches the method's length rewards and
``reward_params`` reaches any other keyword a reward function takes (e.g. a literature method's own
parameter); a parameter that no function of the method takes is an error.

Backends
    ``unsloth``  Unsloth's FastLanguageModel: LoRA, Unsloth gradient checkpointing, vLLM fast inference
                 sharing the GPU with training (``UNSLOTH_VLLM_STANDBY=1``) where vLLM is installed and starts,
                 else without fast inference; fp16 on a T4.
    ``trl``      transformers + PEFT LoRA + TRL's GRPOTrainer; vLLM in colocate mode when vllm is installed
                 and a GPU is present, else transformers' ``generate``.
    ``auto``     Unsloth on CUDA when it imports and patches TRL cleanly, else ``trl`` (one line says why).
Both backends pass the same trainer arguments, including those whose defaults Unsloth rewrites
(``PINNED_ARGUMENTS``); ``run_config.json`` records the effective ones and the model repo really loaded. Every
stage of Unsloth's start (``UNSLOTH_STAGES``) has a defined fallback: go on without vLLM, or stop in the first
minutes with one line naming the stage and the change (``StageFailure``). When training begins, a first-minutes
block (``format_first_minutes``) says which GPU, precision, backend and rollout generator run and why, and after
step 2 the seconds a step and the projected hours against a Colab session.

What a run costs (defaults: 4000 questions x 8 completions = 32,000 completions = 2000 optimizer steps of 16
completions = 2 whole groups, at most 512 completion tokens). Measured (BENCHMARKS.md "## Training") on an H200 capped
at 15 GiB with a 0.5B-shaped random model whose completions all run to 512 tokens (the worst case): the default
layout (4 completions per micro-batch x 4 micro-batches) peaks at 4.7 GiB allocated / 6.6 GiB reserved and, with
transformers generation, takes 26-35 s a step, i.e. 15-20 h for 2000 steps on an H200 and far longer on a T4. So a
full run needs vLLM generation: the ``unsloth`` backend (the notebooks' choice on Colab) or ``trl`` with vLLM
colocate. With vLLM, expect roughly 10-20 s a step on a T4, 6-11 h in all (an estimate, not a T4 measurement): one
free Colab session at best, often two; running again resumes from the last checkpoint (``save_steps=50``) with the
same data order. Disk: ~106 MB a checkpoint (adapter + AdamW state), ~4.2 GB for all 40 (``save_total_limit`` keeps
fewer). Two GPUs (``accelerate launch``) double the completions per step at about the same step time.

Outputs (``output_dir`` = ``runtime.output_dir(folder, save_to_drive)``, i.e. ``outputs/<folder>`` or Google
Drive ``MyDrive/length-rl/<folder>``)::

    <output_dir>/adapter/            final LoRA adapter + tokenizer + run_config.json (config, times, versions)
    <output_dir>/checkpoints/        checkpoint-<step>/ every save_steps (the run resumes from the latest)
    <output_dir>/log_history.json    the trainer's log history (every metric at every logging step)
    <output_dir>/batches.jsonl       the question ids of every step (proves the data order on resume)
    <output_dir>/training_curves.png plot_training_curves()
    <output_dir>/wandb/              Weights & Biases files (offline: ``wandb sync <output_dir>/wandb/offline-run-*``)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import data
import rewards
import runtime

METHOD_FOLDERS = {
    "baseline": "Baseline",
    "ans_len": "Ans_len_considering",
    "group": "Group_method",
    "group_ans_len": "Group_method_with_ans_len_considering",
}
BACKENDS = ("auto", "unsloth", "trl")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A completion "reached the limit" when it ended within this many tokens of max_completion_length.
OUT_OF_LIMIT_MARGIN = rewards.OUT_OF_LIMIT_MARGIN
# Fields that define a run: resuming a folder whose saved run differs in one of them is an error.
_RUN_IDENTITY = ("method", "lam", "reward_params", "budget", "budget_in_prompt", "model", "num_generations",
                 "per_device_train_batch_size", "steps_per_generation", "max_completion_length", "train_size",
                 "max_steps_in_question", "seed", "gsm8k_dir")
SMOKE_QUESTIONS = 8
SMOKE_STEPS = 2


def default_folder(method: str) -> str:
    """The notebook folder of a study method, else the method's own name."""
    return METHOD_FOLDERS.get(method, method)


@dataclass
class TrainConfig:
    """Everything that defines a training run; the notebooks' Colab form fields map onto these.

    Defaults reproduce the study and fit a 15 GB T4 (see the module docstring for the cost)."""

    method: str = field(default="baseline", metadata={
        "help": f"reward method, one of rewards.METHODS {sorted(rewards.METHODS)}"})
    lam: float = field(default=rewards.DEFAULT_LAMBDA, metadata={
        "help": "λ of the method's length rewards (ignored by methods without one)"})
    reward_params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra keyword parameters for the method's reward functions, KEY=VALUE"})
    backend: str = field(default="auto", metadata={"help": f"one of {BACKENDS}"})
    model: str = field(default=runtime.MODEL_ID, metadata={
        "help": f"Hub id or local folder of the base model; {runtime.TINY_MODEL!r} = tiny random Qwen2"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: found by runtime.py)"})
    folder: str | None = field(default=None, metadata={"help": "output folder name (default: METHOD_FOLDERS[method])"})
    output_dir: str | None = field(default=None, metadata={"help": "explicit output folder (overrides folder/drive)"})
    save_to_drive: bool = field(default=False, metadata={"help": "write to Google Drive (Colab)"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the final adapter to the Hub (HF_TOKEN)"})
    hub_repo: str | None = field(default=None, metadata={"help": "Hub repository id for push_to_hub, user/name"})
    # 8 completions per question: enough spread inside a group for the group method's shortest-correct
    # reference, and the study's value.
    num_generations: int = field(default=8, metadata={"help": "completions per question (group size G)"})
    # 4 completions per forward/backward pass: the 151,936-word logits dominate memory; 4 x 512-token completions
    # peak at 4.7 GiB (8 at a time: 8.3 GiB; 16: out of memory), leaving a T4 room for vLLM (BENCHMARKS.md).
    per_device_train_batch_size: int = field(default=4, metadata={"help": "completions per micro-batch"})
    # 4 micro-batches per generation and per optimizer step: 16 completions = 2 whole groups per step, and
    # one generation per optimizer step, so every completion is on-policy (no importance sampling needed).
    steps_per_generation: int = field(default=4, metadata={
        "help": "micro-batches per generation = gradient accumulation steps"})
    # TRL's GRPO default (1e-6) is a full fine-tuning rate; LoRA usually needs ~10x that. 1e-5 is the conservative end.
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "the study's schedule"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps for the warm-up"})
    # r=16 on all linear layers: ~8.8M trainable parameters, enough for format and length behaviour.
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (alpha/r = 2)"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens (longest study prompt: 229)"})
    max_completion_length: int = field(default=512, metadata={"help": "completion token limit (the study's)"})
    beta: float = field(default=0.005, metadata={"help": "KL coefficient β (the study's)"})
    # Token-level normalisation, the same under TRL and Unsloth (Unsloth rewrites TRL's "dapo" default) and
    # free of the per-sequence length bias of the original "grpo" loss, which matters for a length study.
    loss_type: str = field(default="bnpo", metadata={"help": "TRL loss_type"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    budget: str | None = field(default=None, metadata={
        "help": "length budget kind for a target_length column (budgets.KINDS; needed by l1_exact)"})
    budget_in_prompt: bool = field(default=True, metadata={"help": "state the budget in the prompt"})
    train_size: int = field(default=data.DEFAULT_TRAIN_SIZE, metadata={"help": "training questions"})
    max_steps_in_question: int = field(default=data.DEFAULT_MAX_STEPS, metadata={
        "help": "keep questions with at most this many solution steps"})
    seed: int = field(default=data.DEFAULT_SEED, metadata={"help": "seed for data order, LoRA init and sampling"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations (memory)"})
    precision: str = field(default="auto", metadata={"help": f"one of {PRECISIONS}; auto = bf16 if supported, "
                                                             "fp16 on other GPUs (T4), fp32 on CPU"})
    vllm_gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "GPU share for vLLM (default: 0.3 trl colocate, 0.6 unsloth)"})
    # A disconnect costs at most 50 steps (~10-20 minutes on a T4 with vLLM); ~106 MB per checkpoint.
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every N steps"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after N optimizer steps (default: 1 epoch)"})
    report_to: str = field(default="wandb", metadata={"help": "wandb or none"})
    wandb_project: str = field(default="length-rl-gsm8k", metadata={"help": "Weights & Biases project"})
    gsm8k_dir: str | None = field(default=None, metadata={"help": "local GSM8K folder (default: found or Hub)"})
    live_view: bool = field(default=True, metadata={"help": "print one line per completion at every step"})
    resume: bool = field(default=True, metadata={"help": "resume from the latest checkpoint in the folder"})
    smoke: bool | None = field(default=None, metadata={
        "help": "CPU smoke configuration; default: when runtime.smoke_mode() (no GPU)"})
    grpo_overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra trl.GRPOConfig arguments, KEY=VALUE"})

    def resolved_folder(self) -> str:
        return self.folder or default_folder(self.method)


@dataclass
class TrainResult:
    """What ``train`` returns; ``adapter_dir`` is what evaluation needs."""

    output_dir: Path
    adapter_dir: Path
    train_seconds: float
    log_history: list[dict[str, Any]]
    resumed_from: str | None
    global_step: int = 0
    backend: str = "trl"
    config: TrainConfig | None = None
    # The trained model and tokenizer, still in memory (main process), so evaluation can reuse them.
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def smoke_config(config: TrainConfig) -> TrainConfig:
    """``config`` turned into the CPU smoke configuration, keeping its method, λ and reward parameters.

    Tiny random Qwen2 with the real tokenizer, 8 GSM8K questions, 2 GRPO steps of 2 groups of 4
    completions of at most 32 tokens, checkpoints every step, ``trl`` backend, local disk.
    """
    folder = config.resolved_folder()
    return dataclasses.replace(
        config,
        model=runtime.TINY_MODEL,
        backend="trl",
        train_size=SMOKE_QUESTIONS,
        max_steps=SMOKE_STEPS if config.max_steps is None else min(config.max_steps, SMOKE_STEPS),
        num_generations=4,
        per_device_train_batch_size=4,
        steps_per_generation=2,
        max_completion_length=32,
        gradient_checkpointing=False,
        precision="fp32",
        save_steps=1,
        logging_steps=1,
        save_to_drive=False,
        push_to_hub=False,
        folder=folder if folder.endswith("-smoke") else f"{folder}-smoke",
        smoke=True,
    )


# --------------------------------------------------------------------------------------------------
# Configuration checks (before anything heavy is loaded)
# --------------------------------------------------------------------------------------------------

def world_size() -> int:
    """Number of training processes of this launch (``accelerate launch`` / ``torchrun`` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def reward_params(config: TrainConfig) -> dict[str, Any]:
    """The keyword parameters for ``rewards.reward_functions``: ``lam`` and the generation limit
    (``max_completion_length``) for the methods that take them, then ``config.reward_params``."""
    settings = rewards.method_parameters(config.method)  # raises for an unknown method
    params: dict[str, Any] = {}
    if "lam" in settings:
        params["lam"] = config.lam
    if "max_completion_length" in settings:  # e.g. DAPO's overlong penalty must use the real limit
        params["max_completion_length"] = config.max_completion_length
    params.update(config.reward_params)
    return params


def check_config(config: TrainConfig) -> None:
    """Raise a clear error for a configuration that cannot train correctly; loads nothing.

    The group rewards compare the completions of one question, and TRL computes rewards on each process
    for that process's own completions. So every process must hold whole groups:
    ``per_device_train_batch_size * steps_per_generation`` (the completions one process generates at a
    time) must be a multiple of ``num_generations``. TRL itself only asks this of the sum over processes.
    """
    if config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    # These decide how completions are split across processes and steps: set them on TrainConfig, where the
    # whole-group check below sees them, never through grpo_overrides.
    guarded = sorted({"per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                      "num_generations", "generation_batch_size"} & set(config.grpo_overrides))
    if guarded:
        raise ValueError(f"grpo_overrides may not set {guarded}: use the TrainConfig fields, which are checked "
                         "for whole groups per process")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.report_to not in {"wandb", "none"}:
        raise ValueError(f"report_to must be 'wandb' or 'none', got {config.report_to!r}")
    for name in ("num_generations", "per_device_train_batch_size", "steps_per_generation", "max_completion_length",
                 "train_size", "save_steps", "logging_steps", "lora_r", "max_prompt_length"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.num_generations < 2:
        raise ValueError("num_generations must be at least 2: GRPO compares completions within a group")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be positive or None, got {config.max_steps}")
    per_process = config.per_device_train_batch_size * config.steps_per_generation
    if per_process % config.num_generations:
        raise ValueError(
            "groups would be split across processes: per_device_train_batch_size "
            f"({config.per_device_train_batch_size}) x steps_per_generation ({config.steps_per_generation}) = "
            f"{per_process} completions per process is not a multiple of num_generations "
            f"({config.num_generations}). Group rewards need each question's {config.num_generations} completions "
            "on one process; e.g. use steps_per_generation="
            f"{_next_multiple(per_process, config.num_generations) // config.per_device_train_batch_size}.")
    if not 0 < config.learning_rate < 1:
        raise ValueError(f"learning_rate must be in (0, 1), got {config.learning_rate}")
    if config.beta < 0:
        raise ValueError(f"beta must be >= 0, got {config.beta}")
    if config.push_to_hub and not config.hub_repo:
        raise ValueError("push_to_hub=True needs hub_repo, e.g. 'your-name/qwen-gsm8k-group'")
    if config.push_to_hub and not runtime.get_secret("HF_TOKEN"):
        raise ValueError("push_to_hub=True needs an HF_TOKEN (Colab secret or environment variable)")
    rewards.reward_functions(config.method, **reward_params(config))  # unknown method or parameter: error now
    if "target_length" in rewards.method_columns(config.method) and config.budget is None:
        raise ValueError(f"method {config.method!r} needs a per-question target_length: set budget to one of "
                         "budgets.KINDS ('steps', 'reference', 'question')")


def _next_multiple(value: int, base: int) -> int:
    return -(-value // base) * base


# --------------------------------------------------------------------------------------------------
# Metrics (pure functions, unit-tested) and the live view
# --------------------------------------------------------------------------------------------------

def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long sequences; None when undefined (< 2 points or no spread)."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson needs sequences of equal length, got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    dx = [float(x) - mean_x for x in xs]
    dy = [float(y) - mean_y for y in ys]
    sxx, syy = sum(d * d for d in dx), sum(d * d for d in dy)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sum(a * b for a, b in zip(dx, dy)) / math.sqrt(sxx * syy)))


def out_of_limit(lengths: Sequence[int], limit: int, margin: int = OUT_OF_LIMIT_MARGIN) -> float:
    """Fraction of completions that reached the token limit or ended within ``margin`` tokens of it."""
    if not lengths:
        raise ValueError("out_of_limit needs at least one completion")
    return sum(1 for n in lengths if rewards.is_out_of_limit(n, limit, margin)) / len(lengths)


# The same definition as evaluation's (one source: rewards.py).
model_efficiency = rewards.model_efficiency


def batch_metrics(lengths: Sequence[int], question_lengths: Sequence[int], reference_lengths: Sequence[int],
                  correct: Sequence[bool], format_ok: Sequence[bool], limit: int) -> dict[str, float]:
    """The step's metrics over its completions; undefined ones (e.g. a correlation without spread) are left out."""
    n = len(lengths)
    if n == 0:
        raise ValueError("batch_metrics needs at least one completion")
    if not n == len(question_lengths) == len(reference_lengths) == len(correct) == len(format_ok):
        raise ValueError("batch_metrics needs one value per completion in every column")
    metrics: dict[str, float | None] = {
        "accuracy": sum(map(bool, correct)) / n,
        "format_accuracy": sum(map(bool, format_ok)) / n,
        "mean_length": sum(lengths) / n,
        "out_of_limit": out_of_limit(lengths, limit),
        "model_efficiency": model_efficiency(reference_lengths, lengths, correct),
        "question_vs_response_length_correlation": pearson(question_lengths, lengths),
        "answer_vs_response_length_correlation": pearson(reference_lengths, lengths),
    }
    return {name: float(value) for name, value in metrics.items() if value is not None}


def completion_symbol(correct: bool, format_ok: bool) -> str:
    """✔ correct answer; ★ right format, wrong answer; ✗ otherwise."""
    if correct:
        return "✔"
    return "★" if format_ok else "✗"


def format_live_view(records: Sequence[dict[str, Any]], step: int | None = None, limit: int | None = None) -> str:
    """One line per completion, grouped by question with visible group boundaries.

    Each record has ``group`` (question id), ``correct``, ``format_ok``, ``length``, ``reward`` and optionally
    ``gold`` and ``process``. Groups appear in order of first appearance.
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record.get("process", 0), record["group"]), []).append(record)
    title = f"step {step}" if step is not None else "batch"
    lines = [f"── {title}: {len(records)} completions in {len(groups)} groups "
             f"(✔ correct  ★ format only  ✗ wrong) " + "─" * 10]
    width = len(str(limit)) if limit else 3
    for (process, group), members in groups.items():
        where = f" · process {process}" if any(m.get("process") for m in records) else ""
        gold = members[0].get("gold")
        lines.append(f"┌ question {group}{f' · gold {gold}' if gold is not None else ''}{where}")
        for member in members:
            capped = " (limit)" if limit and rewards.is_out_of_limit(member["length"], limit) else ""
            lines.append(f"│ {completion_symbol(member['correct'], member['format_ok'])} "
                         f"{member['length']:>{width}} tok  reward {member['reward']:+.2f}{capped}")
        right = sum(1 for m in members if m["correct"])
        lines.append(f"└ {right}/{len(members)} correct")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reward monitor: metrics through ``log_metric`` (or the fallback), live view, data order
# --------------------------------------------------------------------------------------------------

def trainer_metric_logger(trainer: Any) -> Callable[[str, float], None]:
    """Fallback for TRL versions without the ``log_metric`` reward keyword (e.g. the pinned 0.22.2).

    Appends to the trainer's metric buffer exactly as TRL's own metrics are: values are averaged over each
    logging step and logged next to ``reward``, ``kl`` and ``completions/mean_length``.
    """
    def log_metric(name: str, value: float) -> None:
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode][name].append(float(value))

    return log_metric


def _distributed() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(items: list[Any]) -> list[list[Any]]:
    """Every process's ``items`` (a list per process); collective, so every process must call it."""
    size = _distributed()[1]
    if size == 1:
        return [items]
    import torch.distributed as dist

    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, items)
    return gathered


class RewardMonitor:
    """Wraps a method's reward functions so that, once per generation batch, the step's metrics are logged,
    the live view is printed and the question order is recorded.

    Rewards are unchanged (each wrapper returns its function's values). The last function of the method
    triggers the report, with the total reward of each completion. Metrics use ``log_metric`` when TRL
    passes it (newer TRL) and ``trainer_metric_logger(trainer)`` otherwise, after ``attach(trainer)``. In a
    multi-process run, completions are gathered first, so every process logs the same whole-batch metrics.
    """

    def __init__(self, num_generations: int, max_completion_length: int, live_view: bool = True,
                 batches_file: str | os.PathLike | None = None, out: Callable[[str], None] | None = None):
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.live_view = live_view
        self.batches_file = Path(batches_file) if batches_file else None
        self.out = out or (lambda text: print(text, flush=True))
        self.trainer: Any = None
        self.last_metrics: dict[str, float] = {}
        self._pending: list[list[float]] = []

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def wrap(self, functions: Sequence[Callable[..., list[float]]]) -> list[Callable[..., list[float]]]:
        wrapped = []
        for index, function in enumerate(functions):
            wrapped.append(self._wrap_one(function, first=index == 0, last=index == len(functions) - 1))
        return wrapped

    def _wrap_one(self, function: Callable[..., list[float]], first: bool, last: bool) -> Callable[..., list[float]]:
        def reward(*args: Any, **kwargs: Any) -> list[float]:
            values = function(*args, **kwargs)
            if first:
                self._pending = []
            self._pending.append([0.0 if v is None or not math.isfinite(v) else float(v) for v in values])
            if last:
                totals = [sum(column) for column in zip(*self._pending)]
                self._pending = []
                self.observe(totals, **kwargs)
            return values

        # TRL names each reward's metrics after __name__ (rewards/<name>/mean), so keep it.
        reward.__name__ = getattr(function, "__name__", "reward")
        reward.__qualname__ = reward.__name__
        reward.__doc__ = function.__doc__
        return reward

    def observe(self, totals: Sequence[float], completions: Sequence, completion_ids: Sequence,
                answer: Sequence, question_length: Sequence[int], reference_length: Sequence[int],
                question_id: Sequence | None = None, prompts: Sequence | None = None,
                log_metric: Callable[[str, float], None] | None = None, trainer_state: Any = None,
                **_: Any) -> dict[str, float]:
        """Log the batch's metrics, print the live view, record the question order; returns the metrics."""
        keys = rewards.group_keys(len(completions), prompts, question_id)
        rank, size = _distributed()
        local = [{
            "group": key if question_id is not None else f"#{index // self.num_generations}",
            "question_id": key if question_id is not None else None,
            "process": rank,
            "length": len(ids),
            "question_length": int(q),
            "reference_length": int(r),
            "correct": rewards.is_correct(text, gold),
            "format_ok": rewards.is_format_ok(text),
            "reward": float(total),
            "gold": rewards.gold_number(gold),
        } for index, (key, text, ids, gold, q, r, total) in enumerate(
            zip(keys, completions, completion_ids, answer, question_length, reference_length, totals))]
        records = [record for part in _gather(local) for record in part]
        metrics = batch_metrics([r["length"] for r in records], [r["question_length"] for r in records],
                                [r["reference_length"] for r in records], [r["correct"] for r in records],
                                [r["format_ok"] for r in records], self.max_completion_length)
        metrics["whole_groups"] = whole_group_fraction(records, self.num_generations)
        self.last_metrics = metrics
        log = log_metric
        if log is None and self.trainer is not None:
            log = trainer_metric_logger(self.trainer)
        if log is not None:
            for name, value in metrics.items():
                log(name, value)
        step = trainer_state.global_step + 1 if trainer_state is not None else None
        if rank == 0:
            if self.live_view:
                gold = {r["group"]: r["gold"] for r in records}
                self.out(format_live_view([{**r, "gold": _format_number(gold[r["group"]])} for r in records],
                                          step, self.max_completion_length))
            if self.batches_file is not None:
                with self.batches_file.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": step, "question_ids": [r["question_id"] for r in records],
                                             "processes": [r["process"] for r in records]}) + "\n")
        _ = size
        return metrics


def whole_group_fraction(records: Sequence[dict[str, Any]], num_generations: int) -> float:
    """Fraction of (process, question) groups holding exactly ``num_generations`` completions (1.0 = all whole)."""
    counts: dict[tuple[Any, Any], int] = {}
    for record in records:
        key = (record.get("process", 0), record["group"])
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise ValueError("whole_group_fraction needs at least one completion")
    return sum(1 for count in counts.values() if count == num_generations) / len(counts)


def _format_number(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --------------------------------------------------------------------------------------------------
# Checkpoints, run records
# --------------------------------------------------------------------------------------------------

def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder (one with ``trainer_state.json``, which the trainer
    writes last), so a checkpoint cut short by a disconnect is skipped rather than breaking the resume."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None
    complete = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            complete.append((int(suffix), path))
    return max(complete)[1] if complete else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_same_run(output_dir: Path, config: TrainConfig) -> None:
    saved_path = output_dir / "run_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8")).get("config", {})
    current = _jsonable(dataclasses.asdict(config))
    different = [name for name in _RUN_IDENTITY if name in saved and saved[name] != current[name]]
    if different:
        details = ", ".join(f"{name}: saved {saved[name]!r} vs now {current[name]!r}" for name in different)
        raise ValueError(f"{output_dir} holds a different run ({details}); choose another folder or delete it")


def _write_json(path: Path, payload: Any) -> None:
    runtime.write_atomic(path, json.dumps(_jsonable(payload), indent=2))  # a disconnect never leaves half a file


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

def _unsloth_problem(use_vllm: bool = True) -> tuple[str, str] | None:
    """(stage, why) when Unsloth cannot be used here, the stage being ``import`` or ``patch``; None when it imported
    and patched TRL's GRPOTrainer."""
    if use_vllm:
        # Standby lets vLLM and training share the GPU memory; it must be set before unsloth is imported. Without
        # vLLM it is left off: it also turns off PyTorch's expandable segments (unsloth_zoo 2026.10.9 __init__.py).
        os.environ.setdefault("UNSLOTH_VLLM_STANDBY", "1")
    try:
        import unsloth  # noqa: F401  (must come before trl/transformers/peft so that its patches apply)
        from unsloth import FastLanguageModel
    except Exception as error:  # ImportError, or a CUDA/driver problem inside unsloth
        return "import", f"Unsloth did not import ({type(error).__name__}: {_first_line(error)})"
    import trl

    if "Unsloth" not in trl.GRPOTrainer.__name__:
        try:
            from unsloth import PatchFastRL

            PatchFastRL("GRPO", FastLanguageModel)
        except Exception as error:
            return "patch", f"Unsloth could not patch TRL ({type(error).__name__}: {_first_line(error)})"
        if "Unsloth" not in trl.GRPOTrainer.__name__:
            return "patch", "Unsloth imported but did not patch TRL's GRPOTrainer"
    return None


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (empty messages included), short enough for one printed line."""
    return (str(error).splitlines() or [""])[0][:160]


def resolve_backend(requested: str, use_vllm: bool = True) -> tuple[str, str]:
    """(backend, reason): ``auto`` becomes ``unsloth`` when it imports and patches TRL on a CUDA GPU, else ``trl``.

    Import and patching are Unsloth's first two stages (``UNSLOTH_STAGES``). ``auto`` continues with ``trl`` after
    a failed import that left TRL unpatched; otherwise (``backend="unsloth"``, or Unsloth half-patched the process)
    a ``StageFailure`` stops the run at once with one line naming the stage and the change to make.
    ``use_vllm``: whether vLLM will generate (Unsloth's standby mode is switched on only then)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "trl":
        return "trl", "requested"
    if requested == "auto" and not runtime.has_cuda():
        return "trl", "Unsloth not used: no CUDA GPU"
    problem = _unsloth_problem(use_vllm)
    if problem is None:
        return "unsloth", "requested" if requested == "unsloth" else "Unsloth imported and patched TRL"
    return backend_after_unsloth_failure(requested, *problem, trl_patched=_trl_patched_by_unsloth())


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the GPU supports it, fp16 on other GPUs (T4), fp32 on the CPU."""
    return runtime.default_precision() if precision == "auto" else precision


def _torch_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def _vllm_available() -> bool:
    import importlib.util

    return runtime.has_cuda() and importlib.util.find_spec("vllm") is not None


def _load_trl_model(config: TrainConfig, tokenizer, precision: str):
    """(model, peft_config) for TRL: the base model (tiny random for smoke runs) and a LoRA config."""
    from peft import LoraConfig

    if config.model == runtime.TINY_MODEL:
        model = runtime.build_tiny_qwen2(tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=_torch_dtype(precision),
                                                     attn_implementation="sdpa")
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    return model, peft_config


def _load_unsloth_model(config: TrainConfig, precision: str, fast_inference: bool) -> tuple[Any, Any, str]:
    """(model, tokenizer, effective model repo) from Unsloth, the way its GRPO notebooks do: 16-bit LoRA, with vLLM
    fast inference when ``fast_inference``. The repo is the one asked for: ``use_exact_model_name=True`` stops
    Unsloth's loader from swapping ``Qwen/...`` for ``unsloth/...`` (unsloth 2026.10.9 models/loader.py,
    ``FastLanguageModel.from_pretrained``: only ``get_model_name``'s mapper honours it); ``on_model_resolved``
    (same function) reports what it loaded."""
    from unsloth import FastLanguageModel

    resolved: list[str] = []
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model,
        max_seq_length=config.max_prompt_length + config.max_completion_length,
        dtype=_torch_dtype(precision),  # the precision both backends resolved (runtime.default_precision)
        load_in_4bit=False,  # 0.5B fits in 16 bit; 4-bit would change the model under study
        fast_inference=fast_inference,  # vLLM generation
        max_lora_rank=config.lora_r,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization or 0.6,
        use_exact_model_name=True,
        on_model_resolved=resolved.append,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        target_modules=list(LORA_TARGETS),
        lora_alpha=config.lora_alpha,
        lora_dropout=0,
        use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
        random_state=config.seed,
    )
    return model, tokenizer, resolved[-1] if resolved else config.model


# GRPOConfig arguments whose defaults Unsloth rewrites (unsloth 2026.10.9 models/rl.py, _patch_trl_rl_trainers_impl,
# ``replacements``; an argument passed explicitly keeps its value). Passed by both backends, so that ``unsloth`` and
# ``trl`` train the same run; the values are TRL's defaults unless a comment says why not.
PINNED_ARGUMENTS: dict[str, Any] = {
    "weight_decay": 0.0,  # Unsloth: 0.001
    "logging_nan_inf_filter": False,  # Unsloth's value: a NaN/inf loss (fp16 on a T4) is logged as it is, not hidden
    "torch_empty_cache_steps": 250,  # Unsloth's value: frees cached blocks every 250 steps of a 2000-step run
    "per_device_eval_batch_size": 8,  # Unsloth: 4 (no evaluation runs inside training)
    "eval_accumulation_steps": None,  # Unsloth: 2
    "vllm_mode": "colocate",  # Unsloth's value and the only one used here: vLLM inside the training process
    "generation_kwargs": {},  # Unsloth's value; TRL 0.22.2 treats {} as None
    "mask_truncated_completions": False,  # Unsloth: None, resolved by its loss_type rules
}


def grpo_arguments(config: TrainConfig, checkpoints_dir: str | os.PathLike, backend: str, precision: str,
                   use_vllm: bool, run_name: str | None = None) -> dict[str, Any]:
    """The ``trl.GRPOConfig`` keyword arguments of a run (``config.grpo_overrides`` applied last)."""
    arguments: dict[str, Any] = {
        "output_dir": str(checkpoints_dir),
        "run_name": run_name,
        "seed": config.seed,
        "data_seed": config.seed,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_ratio": config.warmup_ratio,
        "optim": "adamw_torch",
        "per_device_train_batch_size": config.per_device_train_batch_size,
        # One generation per optimizer step (TRL sets steps_per_generation = gradient_accumulation_steps; passing
        # only this also keeps Unsloth from resizing the batch).
        "gradient_accumulation_steps": config.steps_per_generation,
        "num_generations": config.num_generations,
        "max_prompt_length": config.max_prompt_length,
        "max_completion_length": config.max_completion_length,
        "temperature": config.temperature,
        "beta": config.beta,
        "loss_type": config.loss_type,
        "num_train_epochs": 1,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "report_to": [] if config.report_to == "none" else [config.report_to],
        # Both backends say the same (Unsloth's own notebooks keep TRL's default, True; its model-level "unsloth"
        # checkpointing comes from get_peft_model). Reentrant, as Unsloth pins it (rl.py, RLConfig_post) and as
        # transformers defaults to: TRL 0.22.2 re-enables checkpointing after every generation, and with reentrant
        # checkpointing TRL/PEFT make the input embeddings require grad, so LoRA inside checkpointed layers gets
        # gradients (tests/test_training.py checks that the adapter moves).
        "gradient_checkpointing": config.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": True} if config.gradient_checkpointing else None,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # Unsloth's trainer copies the training precision into these; set them so for both backends.
        "bf16_full_eval": precision == "bf16",
        "fp16_full_eval": precision == "fp16",
        "use_cpu": not runtime.has_cuda(),
        "ddp_find_unused_parameters": False,
        "use_vllm": use_vllm,
        "log_completions": False,  # the live view replaces TRL's sample table
        "disable_tqdm": False,
        "remove_unused_columns": False,  # the rewards need answer, question_id and the length columns
    }
    arguments.update(copy.deepcopy(PINNED_ARGUMENTS))  # generation_kwargs is a dict: never share it
    if use_vllm:
        # vLLM's "no top-k"; TRL maps None to it, Unsloth writes it into the config (rl_replacements.py,
        # grpo_config_fix_vllm_top_k), so both backends record it.
        arguments["top_k"] = -1
    if use_vllm and backend == "trl":
        share = config.vllm_gpu_memory_utilization
        arguments["vllm_gpu_memory_utilization"] = 0.3 if share is None else share
    arguments.update(config.grpo_overrides)
    return arguments


# ==================================================================================================
# Colab path: Unsloth's start-up stages and their fallbacks, the effective trainer arguments, the first-minutes report
# ==================================================================================================

# The stages of the Unsloth/vLLM path, in order, and what a failure at each does (issue 9). Once ``import unsloth``
# ran, TRL is patched for the whole process and a second standby vLLM engine cannot start in it, so a fallback
# either goes on in this process without vLLM or stops at once, in the first minutes, with one line that names
# the stage and the change to make:
#   import      auto: go on with trl (Unsloth patched nothing); unsloth: stop, set BACKEND = "trl".
#   patch       stop: Unsloth half-patched the process; set BACKEND = "trl" and restart the runtime.
#   load, engine, generate: Unsloth's from_pretrained(fast_inference=True), the vLLM engine it starts, and one
#               probe generation. Go on with Unsloth without fast inference and the project's rollouts
#               (rollout "static") once the GPU memory is free again; stop (restart, ROLLOUT = "static") when it
#               is not, or when rollout "vllm" was asked for. Loading without fast inference failing: stop,
#               set BACKEND = "trl" and restart.
#   trainer     stop: set ROLLOUT = "static" (with vLLM) or BACKEND = "trl", and restart.
#   first_step  out of memory before the first optimizer step ends (either backend): stop, naming what to lower.
UNSLOTH_STAGES = ("import", "patch", "load", "engine", "generate", "trainer", "first_step")
_BACKEND_TRL = 'BACKEND = "trl" (CLI: --backend trl)'
_ROLLOUT_STATIC = 'ROLLOUT = "static" (CLI: --rollout static)'
_RESTART = "restart the runtime and run again"
GIB = 2**30
# Free GPU memory needed to go on without vLLM after one of its stages failed: the default run peaks at 6.6 GiB
# reserved without vLLM (BENCHMARKS.md, "## Training", 4x4 layout).
NO_VLLM_MIN_FREE_GIB = 7.0
COLAB_SESSION_HOURS = 12.0  # the longest Colab session; free sessions often end sooner
MEASURED_STEP = 2  # step 1 includes the warm-up (graph capture, compilation); step 2 is the steady pace
# Trainer arguments that differ between any two runs (paths, names): not compared between backends.
RUN_SPECIFIC_ARGUMENTS = ("output_dir", "logging_dir", "run_name")
# The libraries the report prints (run_config.json records all of runtime.library_versions()).
REPORTED_VERSIONS = ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "vllm")


class StageFailure(runtime.ConfigError):
    """Training stopped at a known stage of its start (``UNSLOTH_STAGES``); the message is one line: the stage,
    the error and the fix. A ``ConfigError``, so the CLI prints just that line."""

    def __init__(self, stage: str, why: str, fix: str):
        self.stage, self.why, self.fix = stage, why, fix
        super().__init__(f"training stopped at stage '{stage}': {why}. Fix: {fix}.")


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _trl_patched_by_unsloth() -> bool:
    """Whether Unsloth replaced TRL's GRPOTrainer in this process (then plain TRL cannot run here any more)."""
    trl = sys.modules.get("trl")
    return trl is not None and "Unsloth" in getattr(getattr(trl, "GRPOTrainer", None), "__name__", "")


def backend_after_unsloth_failure(requested: str, stage: str, why: str, trl_patched: bool) -> tuple[str, str]:
    """(backend, reason) after Unsloth failed at ``stage`` (``import`` or ``patch``), or ``StageFailure``: only
    ``auto`` after an import that patched nothing goes on, with ``trl``. ``trl_patched``: whether Unsloth replaced
    TRL's trainer in this process anyway (then only a restart gives plain TRL back)."""
    if stage == "import" and not trl_patched:
        if requested == "auto":
            return "trl", f"Unsloth not used: {why}"
        raise StageFailure(stage, why, f"set {_BACKEND_TRL} and run again")
    raise StageFailure(stage, why, f"set {_BACKEND_TRL}, {_RESTART}")


def _vllm_may_run(config: TrainConfig) -> bool:
    """Whether vLLM could generate this run's rollouts (installed, a CUDA GPU, a real model, a rollout setting
    that allows it): decides Unsloth's standby mode, which must be set before unsloth is imported."""
    return (_vllm_available() and config.model != runtime.TINY_MODEL
            and getattr(config, "rollout", "auto") in ("auto", "vllm"))


def vllm_wanted(config: TrainConfig, backend: str) -> bool:
    """Whether vLLM generates the rollouts: ``resolve_rollout`` says ``vllm`` where the rollout setting exists,
    else ``_vllm_may_run``."""
    resolver = globals().get("resolve_rollout")
    if resolver is None:
        return _vllm_may_run(config)
    choice = resolver(config, backend)
    return (choice[0] if isinstance(choice, tuple) else choice) == "vllm"


def rollout_choice(config: TrainConfig, backend: str, use_vllm: bool, fallback: str | None = None) -> tuple[str, str]:
    """(rollout generator, reason) for the run record; ``fallback`` is the reason when a vLLM stage failed."""
    resolver = globals().get("resolve_rollout")
    if resolver is not None:
        choice = resolver(config, backend)
        name, reason = (choice[0], choice[1]) if isinstance(choice, tuple) else (choice, "resolve_rollout")
    elif use_vllm:
        name = "vllm"
        reason = "Unsloth's fast inference started" if backend == "unsloth" else "vLLM is installed (TRL colocate)"
    else:
        import importlib.util

        name = "generate"
        reason = ("the tiny smoke model" if config.model == runtime.TINY_MODEL
                  else "no CUDA GPU" if not runtime.has_cuda()
                  else "vLLM is not installed" if importlib.util.find_spec("vllm") is None
                  else f"rollout={getattr(config, 'rollout', 'auto')!r}")
    return str(name), fallback or str(reason)


def _with_static_rollout(config: TrainConfig) -> TrainConfig:
    # The rollout setting (TrainConfig.rollout) chooses the project's decoder; without it TRL's generate runs.
    return dataclasses.replace(config, rollout="static") if hasattr(config, "rollout") else config


def _raised_in_vllm(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it chains) was raised inside vLLM or Unsloth's vLLM loader, judged from the
    frames of its traceback: the engine start, as opposed to loading the weights."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None:
            module = str(frame.tb_frame.f_globals.get("__name__", ""))
            if module == "vllm" or module.startswith("vllm.") or frame.tb_frame.f_code.co_name == "load_vllm":
                return True
            frame = frame.tb_next
        error = error.__cause__ or error.__context__
    return False


def _is_out_of_memory(error: BaseException) -> bool:
    return (any(kind.__name__ == "OutOfMemoryError" for kind in type(error).__mro__)
            or "out of memory" in str(error).lower())


def free_gpu_gib() -> float | None:
    """Free memory of the current CUDA GPU in GiB, after dropping unreferenced objects and PyTorch's cached
    blocks; None without a GPU."""
    import gc

    gc.collect()
    if not runtime.has_cuda():
        return None
    import torch

    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0] / GIB


def _probe_generation(model: Any) -> None:
    """One short generation through Unsloth's vLLM engine, so that the attention backend, FlashInfer and the
    sampler fail here, in the first minutes, and not in the first training step."""
    outputs = model.fast_generate(["1 + 1 ="], use_tqdm=False)
    if len(outputs) != 1 or not hasattr(outputs[0], "outputs"):
        raise RuntimeError(f"vLLM answered one prompt with {outputs!r}")


def engine_memory_share(model: Any) -> float | None:
    """The GPU memory share Unsloth's vLLM engine runs with (``gpu_memory_utilization`` of vLLM's cache config;
    Unsloth's standby mode moves it to a tier of its own, unsloth_zoo 2026.10.9 vllm_utils.py, load_vllm); None
    when it cannot be read."""
    engine = getattr(model, "vllm_engine", None)
    for path in (("llm_engine", "vllm_config", "cache_config"), ("llm_engine", "cache_config"), ()):
        holder = engine
        for name in path:
            holder = getattr(holder, name, None)
        share = getattr(holder, "gpu_memory_utilization", None)
        if isinstance(share, (int, float)):
            return float(share)
    return None


def vllm_failure_note(stage: str, why: str, free_gib: float | None) -> str:
    """The line that says Unsloth goes on without vLLM after its ``stage`` failed; ``StageFailure`` instead when
    less than ``NO_VLLM_MIN_FREE_GIB`` of GPU memory came free (``free_gib``; None without a GPU)."""
    if free_gib is not None and free_gib < NO_VLLM_MIN_FREE_GIB:
        raise StageFailure(stage, f"{why}; afterwards only {free_gib:.1f} GiB of GPU memory were free (going on "
                           f"without vLLM needs {NO_VLLM_MIN_FREE_GIB:g})", f"set {_ROLLOUT_STATIC}, {_RESTART}")
    return (f"Unsloth's vLLM failed at stage '{stage}' ({why}): going on with Unsloth without fast inference and "
            "the project's rollouts ('static')")


@dataclass
class UnslothStart:
    """What ``start_unsloth`` built: the model and tokenizer, the repo Unsloth loaded, whether vLLM generates,
    the configuration to train (rollout "static" after a vLLM stage failed) and one line per fallback taken."""

    model: Any
    tokenizer: Any
    model_repo: str
    fast_inference: bool
    config: TrainConfig
    notes: list[str] = field(default_factory=list)
    vllm_memory_share: float | None = None  # what the engine took (standby moves it), None without vLLM


def start_unsloth(config: TrainConfig, precision: str, fast_inference: bool,
                  out: Callable[[str], None] | None = None) -> UnslothStart:
    """Load the model through Unsloth (imported and patched already, ``resolve_backend``), stage by stage.

    With ``fast_inference`` the stages are ``load`` (``from_pretrained(fast_inference=True)``), ``engine`` (the
    vLLM engine it starts; told apart from ``load`` by the traceback) and ``generate`` (one probe generation). A
    failure there falls back to Unsloth without fast inference and rollout "static", once the GPU memory is free
    again (``NO_VLLM_MIN_FREE_GIB``); ``StageFailure`` otherwise, and when rollout "vllm" was asked for. Loading
    without fast inference failing is a ``StageFailure`` at ``load``."""
    out = out or (lambda text: print(text, flush=True))
    notes: list[str] = []
    if fast_inference:
        stage, why = "load", ""
        try:
            model, tokenizer, repo = _load_unsloth_model(config, precision, fast_inference=True)
            stage = "generate"
            _probe_generation(model)
            return UnslothStart(model, tokenizer, repo, True, config, notes, engine_memory_share(model))
        except Exception as error:
            stage = "engine" if stage == "load" and _raised_in_vllm(error) else stage
            why = _why(error)
            if getattr(config, "rollout", "auto") == "vllm":
                raise StageFailure(stage, why, f"set {_ROLLOUT_STATIC}, {_RESTART}") from error
            error.__traceback__ = None  # its frames hold the model and the engine: let them go
        model = tokenizer = None  # the half-started engine's memory must be freed before reloading
        note = vllm_failure_note(stage, why, free_gpu_gib())
        out(note)
        notes.append(note)
        config = _with_static_rollout(config)
    try:
        model, tokenizer, repo = _load_unsloth_model(config, precision, fast_inference=False)
    except Exception as error:
        raise StageFailure("load", _why(error), f"set {_BACKEND_TRL}, {_RESTART}") from error
    return UnslothStart(model, tokenizer, repo, False, config, notes)


def trainer_failure(error: BaseException, backend: str, use_vllm: bool) -> StageFailure | None:
    """The one-line stop for a trainer that could not be built: vLLM's engine failing inside it (TRL colocate;
    stage ``engine``), or Unsloth's trainer (stage ``trainer``); None for other errors of the ``trl`` backend."""
    if use_vllm and _raised_in_vllm(error):
        return StageFailure("engine", _why(error), f"set {_ROLLOUT_STATIC}, {_RESTART}")
    if backend != "unsloth":
        return None
    return StageFailure("trainer", _why(error), f"set {_ROLLOUT_STATIC if use_vllm else _BACKEND_TRL}, {_RESTART}")


def first_step_failure(error: BaseException, steps_done: int, config: TrainConfig,
                       use_vllm: bool) -> StageFailure | None:
    """The one-line stop for an error before this session's first optimizer step ended: out of memory (stage
    ``first_step``), or an error inside vLLM's first generation (stage ``generate``); None for anything else (a
    bug keeps its traceback) and for any error after the first step."""
    if steps_done > 0:
        return None
    if _is_out_of_memory(error):
        if use_vllm:
            fix = f"set {_ROLLOUT_STATIC}: vLLM's share of the GPU memory then goes to training"
        elif config.per_device_train_batch_size > 1:
            half = config.per_device_train_batch_size // 2
            twice = config.steps_per_generation * config.per_device_train_batch_size // half
            fix = (f"pass per_device_train_batch_size={half}, steps_per_generation={twice} to TrainConfig (CLI: "
                   f"--per-device-train-batch-size {half} --steps-per-generation {twice}): the same completions a "
                   "step, in smaller micro-batches")
        else:
            fix = "lower max_completion_length (CLI: --max-completion-length)"
        return StageFailure("first_step", f"out of memory ({_why(error)})", f"{fix}; {_RESTART}")
    if use_vllm and _raised_in_vllm(error):
        return StageFailure("generate", _why(error), f"set {_ROLLOUT_STATIC}, {_RESTART}")
    return None


def effective_arguments(trainer: Any) -> dict[str, Any]:
    """The trainer's arguments after every rewrite (TRL's and transformers' ``__post_init__``; Unsloth's config
    defaults and trainer), as JSON values: ``trainer.args.to_dict()``."""
    return _jsonable(trainer.args.to_dict())


def compare_arguments(first: dict[str, Any], second: dict[str, Any],
                      ignore: Sequence[str] = RUN_SPECIFIC_ARGUMENTS) -> dict[str, Any]:
    """How two sets of trainer arguments differ, compared as JSON values: ``different`` maps each argument both
    have with different values to ``[first, second]``; ``only_first``/``only_second`` list the arguments one
    side lacks (e.g. Unsloth's own fields). ``ignore``: arguments expected to differ (paths, names)."""
    first, second = _jsonable(first), _jsonable(second)
    shared = sorted((set(first) & set(second)) - set(ignore))
    return {"different": {name: [first[name], second[name]] for name in shared if first[name] != second[name]},
            "only_first": sorted(set(first) - set(second) - set(ignore)),
            "only_second": sorted(set(second) - set(first) - set(ignore))}


def stack_versions() -> dict[str, str]:
    from importlib import metadata

    versions = runtime.library_versions()
    try:
        versions["unsloth_zoo"] = metadata.version("unsloth_zoo")
    except metadata.PackageNotFoundError:
        pass
    return {name: version for name, version in versions.items() if version}


def gpu_status() -> dict[str, Any]:
    """The GPU, its compute capability and its memory now (total, free, held by PyTorch), in GiB; Nones on the CPU."""
    if not runtime.has_cuda():
        return {"gpu": None, "compute_capability": None, "memory_total_gib": None, "memory_free_gib": None,
                "memory_allocated_gib": None}
    import torch

    free, total = torch.cuda.mem_get_info()
    major, minor = runtime.cuda_capability() or (0, 0)
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "memory_total_gib": round(total / GIB, 2), "memory_free_gib": round(free / GIB, 2),
            "memory_allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2)}


def precision_reason(requested: str, precision: str, capability: tuple[int, int] | None) -> str:
    """Why the run trains in ``precision``: asked for, or chosen from the GPU (``runtime.default_precision``)."""
    if requested != "auto":
        return "requested"
    if capability is None:
        return "no CUDA GPU"
    where = f"compute capability {capability[0]}.{capability[1]}"
    if precision == "bf16":
        return f"{where} >= 8.0: bf16 in hardware"
    return f"{where} < 8.0: no bf16 in hardware"


def project_run(seconds_per_step: float, steps_left: int, session_hours: float = COLAB_SESSION_HOURS) -> dict[str, Any]:
    """The rest of the run at the measured pace: hours = seconds a step x steps left / 3600, against a Colab
    session of at most ``session_hours``."""
    hours = seconds_per_step * steps_left / 3600
    return {"seconds_per_step": round(seconds_per_step, 2), "steps_left": steps_left,
            "projected_hours": round(hours, 2), "session_hours": session_hours, "fits_session": hours <= session_hours}


def first_minutes_fields(config: TrainConfig, backend: tuple[str, str], precision: str, rollout: tuple[str, str],
                         model_effective: str, notes: Sequence[str], t4_environment: dict[str, str],
                         vllm_memory_share: float | None = None) -> dict[str, Any]:
    """The run-start fields of the first-minutes report (``format_first_minutes``) before the GPU is measured."""
    return {
        "backend": backend[0], "backend_reason": backend[1], "rollout": rollout[0], "rollout_reason": rollout[1],
        "vllm_memory_share": vllm_memory_share,
        "precision": precision, "precision_reason": precision_reason(config.precision, precision,
                                                                      runtime.cuda_capability()),
        "model": config.model, "model_effective": model_effective, "versions": stack_versions(),
        "t4_vllm_environment": dict(t4_environment), "fallbacks": list(notes),
        "save_steps": config.save_steps, "save_to_drive": config.save_to_drive, "colab": runtime.in_colab(),
    }


def session_advice(fields: dict[str, Any]) -> str:
    """Whether the rest of the run fits a Colab session, with the resume advice when it does not."""
    session = f"a Colab session lasts at most {fields['session_hours']:g} h, often less"
    if fields["fits_session"]:
        return f"fits ({session})"
    where = "on Google Drive" if fields.get("save_to_drive") else "in the run folder"
    advice = (f"more than one session ({session}). Checkpoints every {fields.get('save_steps')} steps {where}; "
              "after a disconnect run all cells again (or the same command) to resume")
    if fields.get("colab") and not fields.get("save_to_drive"):
        advice += "; set SAVE_TO_DRIVE = True first: a disconnect loses the runtime's disk"
    return advice


def format_step_time(fields: dict[str, Any]) -> str:
    """The report's timing line: the measured seconds a step and the rest of the run against a Colab session
    (``session_advice``), or a note that it follows after step ``MEASURED_STEP``."""
    if fields.get("seconds_per_step") is None:
        return f"Step time  measured after step {MEASURED_STEP}, with the projection against a Colab session"
    warm_up = fields.get("first_step_seconds")
    measured = f"step {fields['measured_step']}" + (
        f"; step 1 with warm-up: {warm_up:.1f} s" if warm_up is not None and fields["measured_step"] != 1 else "")
    return (f"Step time  {fields['seconds_per_step']:.1f} s a step ({measured}) -> {fields['steps_left']} steps "
            f"left ≈ {fields['projected_hours']:.1f} h: {session_advice(fields)}")


def format_first_minutes(fields: dict[str, Any]) -> str:
    """The compact block printed when training begins: GPU and free memory, precision, backend and rollout
    generator (each with its reason), model, versions, T4 settings, fallbacks, steps, and the timing line."""
    if fields.get("gpu"):
        gpu = (f"{fields['gpu']}, compute capability {fields['compute_capability']}; "
               f"{fields['memory_free_gib']:.1f} of {fields['memory_total_gib']:.1f} GiB free")
    else:
        gpu = "none (CPU)"
    model = fields.get("model")
    effective = fields.get("model_effective")
    lines = [
        "── Run start " + "─" * 60,
        f"GPU        {gpu}",
        f"Precision  {fields.get('precision')} ({fields.get('precision_reason')})",
        f"Backend    {fields.get('backend')} ({fields.get('backend_reason')})",
        f"Rollouts   {fields.get('rollout')} ({fields.get('rollout_reason')})",
        f"Model      {model}" + ("" if effective in (None, model) else f" (Unsloth loaded {effective})"),
        "Versions   " + " · ".join(f"{name} {version}" for name, version in (fields.get("versions") or {}).items()
                                   if name in REPORTED_VERSIONS),
    ]
    if fields.get("vllm_memory_share") is not None:
        lines.append(f"vLLM       {fields['vllm_memory_share']:g} of the GPU memory")
    if fields.get("t4_vllm_environment"):
        settings = " ".join(f"{name}={value}" for name, value in fields["t4_vllm_environment"].items())
        lines.append(f"T4 vLLM    {settings} (unverified on a T4)")
    lines += [f"Fallback   {note}" for note in fields.get("fallbacks") or []]
    if fields.get("total_steps") is not None:
        start = fields.get("start_step") or 0
        lines.append(f"Steps      {fields['total_steps']}" + (f", resuming after step {start}" if start else ""))
    lines += [format_step_time(fields), "─" * 72]
    return "\n".join(lines)


def _wandb_run() -> Any:
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


class FirstMinutesReport:
    """The first minutes of a run tell the user everything: ``format_first_minutes`` is printed when training
    begins, and the timing line once step ``MEASURED_STEP`` (or this session's only step) has ended. The fields
    go to ``record_path`` (the run's ``run_config.json``, key ``first_minutes``) and to W&B (config
    ``first_minutes``; the timing also in the summary). ``callback()`` is the trainer callback that drives it."""

    def __init__(self, fields: dict[str, Any], record_path: str | os.PathLike | None = None,
                 out: Callable[[str], None] | None = None):
        self.fields = dict(fields)
        self.record_path = Path(record_path) if record_path is not None else None
        self.out = out or (lambda text: print(text, flush=True))
        self.steps_done = 0  # optimizer steps ended in this session
        self._marks: list[float] = []

    def train_begin(self, global_step: int, max_steps: int, main_process: bool = True) -> None:
        self._marks = [time.perf_counter()]
        self.fields.update(gpu_status())
        self.fields.update({"start_step": global_step, "total_steps": max_steps})
        if main_process:
            self.out(format_first_minutes(self.fields))
            self._publish(summary=False)

    def step_end(self, global_step: int, max_steps: int, main_process: bool = True) -> None:
        self._marks.append(time.perf_counter())
        self.steps_done += 1
        last = global_step >= max_steps
        if self.fields.get("seconds_per_step") is not None or not (self.steps_done == MEASURED_STEP or last):
            return
        durations = [b - a for a, b in zip(self._marks, self._marks[1:])]
        self.fields.update(project_run(durations[-1], max(0, max_steps - global_step)))
        self.fields.update({"measured_step": self.steps_done, "first_step_seconds": round(durations[0], 2)})
        self.fields["advice"] = session_advice(self.fields)
        if main_process:
            self.out(format_step_time(self.fields))
            self._publish(summary=True)

    def _publish(self, summary: bool) -> None:
        if self.record_path is not None and self.record_path.is_file():
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
            record["first_minutes"] = self.fields
            _write_json(self.record_path, record)
        run = _wandb_run()
        if run is not None:
            run.config.update({"first_minutes": _jsonable(self.fields)}, allow_val_change=True)
            if summary:
                run.summary.update({name: self.fields[name] for name in
                                    ("seconds_per_step", "projected_hours", "fits_session", "first_step_seconds")})

    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that calls ``train_begin``/``step_end``."""
        from transformers import TrainerCallback

        report = self

        class FirstMinutesCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                report.train_begin(state.global_step, state.max_steps, state.is_world_process_zero)

            def on_step_end(self, args, state, control, **kwargs):
                report.step_end(state.global_step, state.max_steps, state.is_world_process_zero)

        return FirstMinutesCallback()



# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def resolve_config(config: TrainConfig) -> TrainConfig:
    """The configuration ``train`` runs: the smoke configuration when asked or when ``runtime.smoke_mode()``."""
    smoke = runtime.smoke_mode() if config.smoke is None else config.smoke
    return smoke_config(config) if smoke else config


def run_output_dir(config: TrainConfig) -> Path:
    """``config.output_dir`` when given, else ``runtime.output_dir(folder, save_to_drive)``."""
    if config.output_dir:
        path = Path(config.output_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return runtime.output_dir(config.resolved_folder(), config.save_to_drive)


def _setup_wandb(config: TrainConfig, output_dir: Path) -> str:
    # W&B files live with the run (on Drive when the run is), and a resumed run continues the same W&B run.
    os.environ["WANDB_DIR"] = str(output_dir)
    mode = runtime.setup_wandb(config.wandb_project)
    id_file = output_dir / "wandb_run_id"
    if not id_file.is_file():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12], encoding="utf-8")
    os.environ["WANDB_RUN_ID"] = id_file.read_text(encoding="utf-8").strip()
    os.environ["WANDB_RESUME"] = "allow"
    return mode


def _save_emergency_checkpoint(trainer, checkpoints_dir: Path) -> Path | None:
    """On Ctrl-C: save a full checkpoint (adapter, optimizer, scheduler, RNG, state) at the last finished step."""
    step = trainer.state.global_step
    target = checkpoints_dir / f"checkpoint-{step}"
    if step == 0 or (target / "trainer_state.json").is_file() or _distributed()[1] > 1:
        return None  # nothing learned yet, already saved, or other processes cannot join the save
    logged = [entry.get("step") for entry in trainer.state.log_history]
    if step not in logged and trainer._metrics["train"]:
        # Interrupted between the optimizer step and its logging: keep that step's metrics (without the loss).
        trainer.log({})
    # _save_checkpoint rotates old checkpoints when save_total_limit is set: an interruption must delete none.
    limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    try:
        trainer._save_checkpoint(trainer.model, trial=None)
    finally:
        trainer.args.save_total_limit = limit
    return target


def push_adapter(adapter_dir: str | os.PathLike, repo_id: str, token: str | None = None) -> str:
    """Upload the adapter folder (weights, tokenizer, run_config.json) to a private Hub repository."""
    from huggingface_hub import HfApi

    token = token or runtime.get_secret("HF_TOKEN")
    if not token:
        raise ValueError("pushing to the Hub needs an HF_TOKEN (Colab secret or environment variable)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(adapter_dir), repo_id=repo_id, commit_message="GRPO LoRA adapter")
    return f"https://huggingface.co/{repo_id}"


def _import_wandb_early() -> None:
    # TRL imports wandb whenever it is installed. wandb's pydantic models look up their source module
    # (inspect.getmodule scans sys.modules) at import, so importing it before torch/transformers fill sys.modules
    # is ~3x faster (44 s -> 16 s for `from trl import GRPOTrainer` on a 2-core machine).
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass


def train(config: TrainConfig, callbacks: Sequence[Any] | None = None) -> TrainResult:
    """Build and run one GRPO training run; returns where everything was saved.

    Resumes from the newest complete checkpoint in ``<output_dir>/checkpoints`` (same data order: the
    sampler is seeded and the trainer skips the batches already seen). On Ctrl-C an emergency checkpoint is
    saved and the interrupt re-raised; checkpoints already written are never removed by an interruption.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects.
    """
    original = config
    config = resolve_config(config)
    if config is not original and config.smoke:
        print(f"Smoke mode ({'no CUDA GPU' if not runtime.has_cuda() else 'requested'}): tiny random Qwen2, "
              f"{config.train_size} questions, {config.max_steps} GRPO steps, {config.max_completion_length}-token "
              f"completions, backend trl — not a real training run.", flush=True)
    check_config(config)  # before anything heavy: a bad configuration fails in seconds
    output_dir = run_output_dir(config)
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = latest_checkpoint(checkpoints_dir) if config.resume else None
    if not config.resume and latest_checkpoint(checkpoints_dir) is not None:
        raise ValueError(f"{checkpoints_dir} already holds checkpoints and resume=False; "
                         "choose another folder, delete them, or resume")
    _check_same_run(output_dir, config)

    _import_wandb_early()
    t4_environment = runtime.t4_vllm_environment()  # before unsloth or vllm is imported: FlashInfer off below cc 8.0
    # Imports unsloth first when it is used; stops here, with one line, when Unsloth fails half-way.
    backend, reason = resolve_backend(config.backend, use_vllm=_vllm_may_run(config))
    precision = resolve_precision(config.precision)
    rank = int(os.environ.get("RANK", "0"))
    if config.backend == "auto" and backend == "trl" and rank == 0:
        print(f"Backend: trl ({reason})", flush=True)
    if config.report_to == "wandb":
        mode = _setup_wandb(config, output_dir)
        if rank == 0:
            print(f"Weights & Biases: {mode}" + ("" if mode == "online" else
                  f" (sync later: wandb sync {output_dir}/wandb/offline-run-*)"), flush=True)

    import torch  # noqa: F401  (after unsloth)
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = runtime.load_tokenizer(config.tokenizer, config.model)
    dataset = data.training_dataset(tokenizer, config.gsm8k_dir, size=config.train_size,
                                    max_steps=config.max_steps_in_question, seed=config.seed,
                                    budget=config.budget, budget_in_prompt=config.budget_in_prompt)
    use_vllm = vllm_wanted(config, backend)
    peft_config = None
    model_effective, notes, vllm_share = config.model, [], None
    if backend == "unsloth":  # stage by stage; without vLLM (absent, or failed to start) fast_inference=False
        started = start_unsloth(config, precision, fast_inference=use_vllm)
        model, trainer_tokenizer, model_effective = started.model, started.tokenizer, started.model_repo
        use_vllm, config, notes = started.fast_inference, started.config, started.notes
        vllm_share = started.vllm_memory_share
    else:
        model, peft_config = _load_trl_model(config, tokenizer, precision)
        trainer_tokenizer = tokenizer
    if rank == 0:
        generation = "vLLM" if use_vllm else "transformers generate"
        print(f"Training {config.method} (λ={config.lam}) with {backend} + {generation}, {precision}, "
              f"{world_size()} process(es) -> {output_dir}", flush=True)

    monitor = RewardMonitor(config.num_generations, config.max_completion_length, live_view=config.live_view,
                            batches_file=output_dir / "batches.jsonl")
    reward_funcs = monitor.wrap(rewards.reward_functions(config.method, **reward_params(config)))
    arguments = grpo_arguments(config, checkpoints_dir, backend, precision, use_vllm,
                               run_name=config.resolved_folder())
    args = GRPOConfig(**arguments)
    if use_vllm and backend == "trl":
        vllm_share = arguments["vllm_gpu_memory_utilization"]
    report = FirstMinutesReport(
        first_minutes_fields(config, (backend, reason), precision,
                             rollout_choice(config, backend, use_vllm, notes[0] if notes else None),
                             model_effective, notes, t4_environment, vllm_share),
        record_path=output_dir / "run_config.json" if rank == 0 else None)
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                              processing_class=trainer_tokenizer, peft_config=peft_config,
                              callbacks=[*(callbacks or []), report.callback()])
    except Exception as error:
        failure = trainer_failure(error, backend, use_vllm)
        if failure is None:
            raise
        raise failure from error
    monitor.attach(trainer)
    # What the run really trains with, after Unsloth's rewrites: compare_arguments of two runs' records.
    effective = effective_arguments(trainer)
    run_record = {"model_effective": model_effective, "effective_args": effective,
                  "rewritten_args": compare_arguments(arguments, effective)["different"],
                  "first_minutes": report.fields}

    if rank == 0:
        if backend == "unsloth" and run_record["rewritten_args"]:
            print("Unsloth changed trainer arguments: " + ", ".join(
                f"{name} {passed!r} -> {now!r}" for name, (passed, now) in run_record["rewritten_args"].items()),
                flush=True)
        _write_json(output_dir / "run_config.json", {"config": dataclasses.asdict(config), "backend": backend,
                                                     "precision": precision, "num_processes": world_size(),
                                                     **run_record})
        if resume_from is not None:
            print(f"Resuming from {resume_from}", flush=True)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        saved = _save_emergency_checkpoint(trainer, checkpoints_dir)
        print(f"Interrupted at step {trainer.state.global_step}: "
              + (f"emergency checkpoint {saved}" if saved else "checkpoints kept") + f" in {checkpoints_dir}; "
              "run again to resume.", flush=True)
        _append_session(output_dir, trainer, time.perf_counter() - start, interrupted=True)
        raise
    except Exception as error:  # known first-step failures stop with one line (Colab path section)
        failure = first_step_failure(error, report.steps_done, config, use_vllm)
        if failure is not None:
            raise failure from error
        raise
    finally:
        _finish_wandb(config)
    train_seconds = time.perf_counter() - start

    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter weights + config (main process only)
    if trainer.accelerator.is_main_process:
        trainer_tokenizer.save_pretrained(str(adapter_dir))
        sessions = _append_session(output_dir, trainer, train_seconds, interrupted=False)
        record = {
            "config": dataclasses.asdict(config), "backend": backend, "backend_reason": reason,
            "precision": precision, "num_processes": world_size(), "use_vllm": use_vllm,
            "train_seconds": train_seconds, "train_seconds_total": sum(s["seconds"] for s in sessions),
            "global_step": trainer.state.global_step, "resumed_from": str(resume_from) if resume_from else None,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": runtime.library_versions(),
            **run_record,
        }
        _write_json(adapter_dir / "run_config.json", record)
        _write_json(output_dir / "log_history.json", trainer.state.log_history)
        if config.push_to_hub:
            print(f"Pushed to {push_adapter(adapter_dir, config.hub_repo)}", flush=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output_dir=output_dir, adapter_dir=adapter_dir, train_seconds=train_seconds,
                       log_history=list(trainer.state.log_history),
                       resumed_from=str(resume_from) if resume_from else None,
                       global_step=trainer.state.global_step, backend=backend, config=config,
                       model=trainer.model, tokenizer=trainer_tokenizer)


def _finish_wandb(config: TrainConfig) -> None:
    # Close this run's W&B run (flushes offline files), so that a next train() in the same notebook starts its own.
    if config.report_to != "wandb" or "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
    # wandb reads WANDB_DIR and WANDB_RUN_ID once per process (its setup singleton): without a teardown the next
    # run's files and id would be this run's.
    wandb.teardown()


def _append_session(output_dir: Path, trainer, seconds: float, interrupted: bool) -> list[dict[str, Any]]:
    """Record this session's training time (sessions.jsonl) and return all sessions so far."""
    path = output_dir / "sessions.jsonl"
    if _distributed()[0] == 0:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"end_step": trainer.state.global_step, "seconds": round(seconds, 2),
                                     "interrupted": interrupted}) + "\n")
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------

CURVES = (
    ("reward", "reward"),
    ("accuracy", "accuracy"),
    ("format_accuracy", "format accuracy"),
    ("mean_length", "mean completion length (tokens)"),
    ("model_efficiency", "model efficiency"),
    ("out_of_limit", "out of limit"),
    ("question_vs_response_length_correlation", "corr(question, response length)"),
    ("answer_vs_response_length_correlation", "corr(reference, response length)"),
)


def load_log_history(log_history_or_run_dir: Sequence[dict[str, Any]] | str | os.PathLike) -> list[dict[str, Any]]:
    """A log history as given, or read from a run folder: ``log_history.json``, else the newest checkpoint's
    ``trainer_state.json`` (so an interrupted run can be plotted too)."""
    if not isinstance(log_history_or_run_dir, (str, os.PathLike)):
        return list(log_history_or_run_dir)
    folder = Path(log_history_or_run_dir)
    if (folder / "log_history.json").is_file():
        return json.loads((folder / "log_history.json").read_text(encoding="utf-8"))
    checkpoint = latest_checkpoint(folder / "checkpoints") or latest_checkpoint(folder)
    if checkpoint is None:
        raise FileNotFoundError(f"{folder} has neither log_history.json nor a complete checkpoint")
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]


def plot_training_curves(log_history_or_run_dir: Sequence[dict[str, Any]] | str | os.PathLike,
                         path: str | os.PathLike | None = None):
    """Plot reward, accuracy, mean length, efficiency and the length correlations per step with matplotlib.

    Given a run folder, the figure is also saved as ``<run>/training_curves.png`` unless ``path`` says
    otherwise; given a log history, it is saved only when ``path`` is given. Returns the figure.
    """
    import matplotlib

    if "ipykernel" not in sys.modules and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")  # headless (CLI, CI): never try to open a window
    import matplotlib.pyplot as plt

    history = load_log_history(log_history_or_run_dir)
    if path is None and isinstance(log_history_or_run_dir, (str, os.PathLike)):
        path = Path(log_history_or_run_dir) / "training_curves.png"
    figure, axes = plt.subplots(2, 4, figsize=(18, 7), constrained_layout=True)
    for axis, (key, title) in zip(axes.flat, CURVES):
        points = [(entry["step"], entry[key]) for entry in history
                  if key in entry and "step" in entry and entry[key] is not None and math.isfinite(entry[key])]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(points) < 50 else None)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_SCALARS = {"int": int, "float": float, "str": str}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one option per ``TrainConfig`` field (same names, dashes), plus evaluation options."""
    parser = argparse.ArgumentParser(
        prog="training.py", description="GRPO training on GSM8K with length-aware rewards (then evaluation).",
        epilog="Without a GPU the CPU smoke configuration runs (see --smoke/--no-smoke). Multi-GPU: "
               "accelerate launch --config_file configs/accelerate_2gpu.yaml training.py --method group")
    for spec in dataclasses.fields(TrainConfig):
        option = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata.get("help", "")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        type_name = str(spec.type).replace(" | None", "").strip()
        if type_name.startswith("dict"):
            parser.add_argument(option, dest=spec.name, type=_key_value, action="append", default=None,
                                metavar="KEY=VALUE", help=f"{help_text} (repeatable)")
        elif type_name == "bool":
            parser.add_argument(option, dest=spec.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(option, dest=spec.name, type=_SCALARS[type_name], default=default,
                                help=f"{help_text} (default: {default})")
    parser.add_argument("--eval", dest="run_eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the adapter with evaluation.py after training (default: on)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="test questions to evaluate (default: all; smoke: 8)")
    parser.add_argument("--eval-backend", default="auto", help="evaluation backend (default: auto)")
    return parser


def config_from_args(namespace: argparse.Namespace) -> TrainConfig:
    values = {spec.name: getattr(namespace, spec.name) for spec in dataclasses.fields(TrainConfig)}
    for name in ("reward_params", "grpo_overrides"):
        values[name] = dict(values[name] or [])
    return TrainConfig(**values)


def evaluate_adapter(result: TrainResult, limit: int | None = None, backend: str = "auto",
                     reuse_model: bool = True) -> dict[str, Any] | None:
    """Evaluate a finished run's adapter with evaluation.py, results in ``<output_dir>/eval``; None when the
    evaluation module is absent. ``reuse_model`` evaluates the trained model still in memory (no reload)."""
    try:
        import evaluation
    except ImportError:
        print("evaluation.py not found: skipping evaluation", flush=True)
        return None
    config = result.config or TrainConfig()
    if limit is None and config.smoke:
        limit = SMOKE_QUESTIONS
    eval_config = evaluation.EvalConfig(model=config.model, adapter=str(result.adapter_dir),
                                        output_dir=str(result.output_dir / "eval"), limit=limit,
                                        max_new_tokens=config.max_completion_length, backend=backend,
                                        gsm8k_dir=config.gsm8k_dir, tokenizer=config.tokenizer)
    model = result.model if reuse_model else None
    summary = evaluation.evaluate(eval_config, model=model, tokenizer=result.tokenizer if model is not None else None)
    evaluation.print_summary(summary)
    return summary


def evaluate_saved_run(method: str, adapter: str | None = None, save_to_drive: bool = False,
                       limit: int | None = None, backend: str = "auto", redo: bool = False,
                       folder: str | None = None) -> dict[str, Any]:
    """Evaluate the adapter a training run saved (the Eval notebooks), then compare it with the baseline.

    ``adapter`` is a local or Google Drive folder or a Hub repo id; by default the ``adapter/`` folder of the
    method's run (``runtime.output_dir(folder, save_to_drive)``, the smoke folder in smoke mode), with results
    in that run's ``eval/``. The base model, tokenizer, GSM8K folder and token limit come from the run's
    ``run_config.json`` when there is one. For the default adapter, when the baseline run's results are present
    (and this is not the baseline), a paired comparison is printed and returned under ``"baseline_comparison"``.
    """
    import evaluation

    smoke = runtime.smoke_mode()
    run_config = TrainConfig(method=method, folder=folder)
    if smoke:
        run_config = smoke_config(run_config)
    run_dir = None
    if adapter is None:
        run_dir = runtime.output_dir(run_config.resolved_folder(), save_to_drive and not smoke)
        adapter = str(run_dir / "adapter")
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no trained adapter in {adapter}: run the {run_config.resolved_folder()} "
                                    "training notebook first, or give the adapter's folder or Hub repo id")
    saved_path = Path(adapter) / "run_config.json"
    saved = json.loads(saved_path.read_text(encoding="utf-8")).get("config", {}) if saved_path.is_file() else {}
    if limit is None and smoke:
        limit = SMOKE_QUESTIONS
    eval_config = evaluation.EvalConfig(
        model=saved.get("model", run_config.model), adapter=adapter, backend=backend, limit=limit, redo=redo,
        max_new_tokens=saved.get("max_completion_length", run_config.max_completion_length),
        output_dir=str(run_dir / "eval") if run_dir is not None else None,
        gsm8k_dir=saved.get("gsm8k_dir"), tokenizer=saved.get("tokenizer"))
    summary = evaluation.evaluate(eval_config)
    evaluation.print_summary(summary)
    if method != "baseline" and run_dir is not None:
        baseline = smoke_config(TrainConfig()) if smoke else TrainConfig()
        baseline_dir = runtime.output_dir(baseline.resolved_folder(), save_to_drive and not smoke) / "eval"
        baseline_results = evaluation.result_paths(baseline_dir)[0]
        if baseline_results.is_file():
            comparison = evaluation.compare_runs(baseline_results, evaluation.result_paths(run_dir / "eval")[0],
                                                 labels=("baseline", method))
            evaluation.print_comparison(comparison)
            summary = {**summary, "baseline_comparison": comparison}
    return summary


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """``python training.py [options]``: train, then evaluate the adapter (main process only)."""
    namespace = build_parser().parse_args(argv)
    config = config_from_args(namespace)
    result = train(config)
    if _distributed()[0] == 0:
        plot_training_curves(result.output_dir)
        print(f"Adapter: {result.adapter_dir}  ({result.train_seconds:.0f} s, {result.global_step} steps)", flush=True)
        if namespace.run_eval:
            evaluate_adapter(result, limit=namespace.eval_limit, backend=namespace.eval_backend)
    return result


if __name__ == "__main__":
    main()
