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
                 sharing the GPU with training (``UNSLOTH_VLLM_STANDBY=1``), fp16 on a T4.
    ``trl``      transformers + PEFT LoRA + TRL's GRPOTrainer, rollouts from vLLM or the project's decoder.
    ``auto``     Unsloth on CUDA when it imports and patches TRL cleanly, else ``trl`` (one line says why).

Rollouts (``rollout``; the run's first line names the generator and why)
    ``vllm``     TRL's vLLM colocate mode (``trl``) or Unsloth's fast inference (``unsloth``).
    ``static``   ``decoding.RolloutDecoder``: a static KV cache and CUDA graphs, the LoRA adapter merged on CUDA
                 (``trainer_class``); the fallback wherever vLLM is not installed (``trl`` backend only).
    ``generate`` TRL's plain transformers ``generate``.
    ``auto``     vLLM when it is installed and imports, else ``static``.

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
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import data
import decoding
import rewards
import runtime

METHOD_FOLDERS = {
    "baseline": "Baseline",
    "ans_len": "Ans_len_considering",
    "group": "Group_method",
    "group_ans_len": "Group_method_with_ans_len_considering",
}
BACKENDS = ("auto", "unsloth", "trl")
ROLLOUTS = ("auto", "vllm", "static", "generate")
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
    rollout: str = field(default="auto", metadata={
        "help": f"rollout generator, one of {ROLLOUTS}: vllm (TRL colocate or Unsloth fast inference), static "
                "(decoding.py's KV-cache/CUDA-graph decoder), generate (plain transformers); auto = vllm when it "
                "is installed and imports, else static"})
    rollout_merge_adapter: bool | None = field(default=None, metadata={
        "help": "static rollouts: merge the LoRA adapter into the weights while generating (default: on CUDA)"})
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
    profile_steps: bool = field(default=False, metadata={
        "help": "log each step's seconds split into generation, reference pass, rewards, policy forward/backward "
                "and the rest (profile/* metrics; synchronises the GPU at each boundary)"})

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
        rollout=config.rollout if config.rollout in ("static", "generate") else "auto",  # vLLM cannot serve it
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
    check_rollout(config)
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
    return trainer.record_metric  # RolloutTrainer: the one place that touches TRL's metric buffer


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

def _unsloth_problem() -> str | None:
    """Why Unsloth cannot be used here (None when it imported and patched TRL's GRPOTrainer)."""
    if not runtime.has_cuda():
        return "no CUDA GPU"
    # Standby lets vLLM and training share the GPU memory; it must be set before unsloth is imported.
    os.environ.setdefault("UNSLOTH_VLLM_STANDBY", "1")
    try:
        import unsloth  # noqa: F401  (must come before trl/transformers/peft so that its patches apply)
        from unsloth import FastLanguageModel
    except Exception as error:  # ImportError, or a CUDA/driver problem inside unsloth
        return f"Unsloth did not import ({type(error).__name__}: {_first_line(error)})"
    import trl

    if "Unsloth" not in trl.GRPOTrainer.__name__:
        try:
            from unsloth import PatchFastRL

            PatchFastRL("GRPO", FastLanguageModel)
        except Exception as error:
            return f"Unsloth could not patch TRL ({type(error).__name__}: {_first_line(error)})"
        if "Unsloth" not in trl.GRPOTrainer.__name__:
            return "Unsloth imported but did not patch TRL's GRPOTrainer"
    return None


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (empty messages included), short enough for one printed line."""
    return (str(error).splitlines() or [""])[0][:160]


def resolve_backend(requested: str) -> tuple[str, str]:
    """(backend, reason): ``auto`` becomes ``unsloth`` when usable, else ``trl`` with the reason why not."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "trl":
        return "trl", "requested"
    problem = _unsloth_problem()
    if requested == "unsloth":
        if problem:
            raise RuntimeError(f"backend='unsloth' is not available: {problem}. Use backend='trl' or 'auto'.")
        return "unsloth", "requested"
    if problem:
        return "trl", f"Unsloth not used: {problem}"
    return "unsloth", "Unsloth imported and patched TRL"


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the GPU supports it, fp16 on other GPUs (T4), fp32 on the CPU."""
    return runtime.default_precision() if precision == "auto" else precision


def _torch_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


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


def _load_unsloth_model(config: TrainConfig, memory_share: float):
    """(model, tokenizer) from Unsloth, the way its GRPO notebooks do: 16-bit LoRA, vLLM fast inference."""
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model,
        max_seq_length=config.max_prompt_length + config.max_completion_length,
        load_in_4bit=False,  # 0.5B fits in 16 bit; 4-bit would change the model under study
        fast_inference=True,  # vLLM generation
        max_lora_rank=config.lora_r,
        gpu_memory_utilization=memory_share,
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
    return model, tokenizer


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
        # Unsloth checkpoints in its own way. No gradient_checkpointing_kwargs: TRL 0.22.2 re-enables
        # checkpointing with transformers' default (reentrant) after every generation anyway, and with that
        # default TRL/PEFT make the input embeddings require grad, so LoRA inside checkpointed layers gets gradients
        # (tests/test_training.py checks that the adapter moves).
        "gradient_checkpointing": config.gradient_checkpointing and backend == "trl",
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not runtime.has_cuda(),
        "ddp_find_unused_parameters": False,
        "use_vllm": use_vllm,
        "log_completions": False,  # the live view replaces TRL's sample table
        "disable_tqdm": False,
        "remove_unused_columns": False,  # the rewards need answer, question_id and the length columns
    }
    if use_vllm and backend == "trl":
        arguments["vllm_mode"] = "colocate"
        share = config.vllm_gpu_memory_utilization
        arguments["vllm_gpu_memory_utilization"] = 0.3 if share is None else share
    arguments.update(config.grpo_overrides)
    return arguments


# --------------------------------------------------------------------------------------------------
# Rollouts: the generator, and the one GRPOTrainer subclass that touches TRL's internals
# --------------------------------------------------------------------------------------------------

ROLLOUT_LABELS = {"vllm": "vLLM", "static": "static KV-cache decoder", "generate": "transformers generate"}
# The GenerationConfig fields (set by TRL from GRPOConfig) that the static decoder honours; any other field that
# differs from transformers' default, e.g. a repetition penalty through generation_kwargs, is an error.
_STATIC_FIELDS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "pad_token_id",
                            "bos_token_id", "eos_token_id", "cache_implementation", "transformers_version"})


def check_rollout(config: TrainConfig) -> None:
    """One-line errors for a rollout choice that cannot run (part of ``check_config``; loads nothing)."""
    if config.rollout not in ROLLOUTS:
        raise ValueError(f"rollout must be one of {ROLLOUTS}, got {config.rollout!r}")
    if config.backend == "unsloth" and config.rollout in ("static", "generate"):
        raise ValueError(f"rollout={config.rollout!r} needs backend 'trl' or 'auto': Unsloth generates through its "
                         "vLLM fast inference only")
    if "use_vllm" in config.grpo_overrides:
        raise ValueError(f"grpo_overrides may not set use_vllm: choose the generator with rollout (one of {ROLLOUTS})")


def _vllm_problem(config: TrainConfig) -> str | None:
    """Why vLLM cannot generate this run's rollouts; None when it is installed and imports."""
    import importlib.util

    if not runtime.has_cuda():
        return "no CUDA GPU"
    if config.model == runtime.TINY_MODEL:
        return "the tiny smoke model exists only in memory"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        import vllm  # noqa: F401
    except Exception as error:  # a broken install (version mismatch, CUDA libraries) fails here, not mid-run
        return f"vLLM did not import ({type(error).__name__}: {_first_line(error)})"
    return None


def resolve_rollout(config: TrainConfig, backend: str) -> tuple[str, str]:
    """(generator, reason): how this run generates its rollouts, given the resolved ``backend``.

    ``vllm``: TRL's colocate mode (``trl``) or Unsloth's fast inference (``unsloth``, always vLLM); ``static``:
    ``decoding.RolloutDecoder`` inside ``trainer_class``; ``generate``: TRL's plain ``model.generate``. ``auto``
    takes vLLM when it is installed and imports, otherwise ``static``, and the reason says why.
    """
    check_rollout(config)
    if backend == "unsloth":
        if config.rollout in ("static", "generate"):
            raise ValueError(f"rollout={config.rollout!r} needs backend 'trl': Unsloth generates through its vLLM "
                             "fast inference only")
        return "vllm", "Unsloth's fast inference"
    if config.rollout in ("static", "generate"):
        return config.rollout, "requested"
    problem = _vllm_problem(config)
    if config.rollout == "vllm":
        if problem:
            raise RuntimeError(f"rollout='vllm' is not available: {problem}. Use rollout='static' or 'auto'.")
        return "vllm", "requested (TRL colocate)"
    if problem:
        return "static", f"vLLM not used: {problem}"
    return "vllm", "vLLM installed (TRL colocate)"


def startup_line(config: TrainConfig, backend: str, backend_reason: str, rollout: str, rollout_reason: str,
                 smoke_reason: str | None = None) -> str:
    """The run's first line: the rollout generator and the backend, each with the reason it was chosen."""
    if smoke_reason is None:
        return f"Rollouts: {rollout} ({rollout_reason}) · backend {backend} ({backend_reason})"
    return (f"Smoke mode ({smoke_reason}): rollouts {rollout} ({rollout_reason}), tiny random Qwen2, "
            f"{config.train_size} questions, {config.max_steps} GRPO steps, {config.max_completion_length}-token "
            f"completions, backend {backend} — not a real training run.")


def static_rollout_settings(generation: Any) -> decoding.DecodeSettings:
    """The decoder settings that sample what TRL's ``GenerationConfig`` asks for (GRPOConfig's temperature,
    top_p, top_k, min_p and ``generation_kwargs``; ``do_sample=False``: greedy), stopping at TRL's EOS token and
    padding with TRL's pad token. Unlike ``model.generate``, nothing comes from the model's own
    generation_config.json (Qwen's would bring temperature 0.7, top_p 0.8 and a repetition penalty), so the
    rollouts follow the distribution GRPOConfig states and the loss assumes, as TRL's vLLM path does."""
    unsupported = sorted(set(generation.to_diff_dict()) - _STATIC_FIELDS)
    if unsupported:
        raise ValueError(f"rollout='static' cannot honour generation setting(s) {', '.join(unsupported)}; "
                         "use rollout='generate' or drop them from generation_kwargs")
    eos = generation.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return decoding.DecodeSettings(
        max_new_tokens=generation.max_new_tokens, method="static",
        temperature=float(generation.temperature) if generation.do_sample else 0.0,
        top_k=generation.top_k, top_p=1.0 if generation.top_p is None else float(generation.top_p),
        min_p=generation.min_p, eos_token_ids=eos, pad_token_id=generation.pad_token_id)


@contextlib.contextmanager
def _generate_replaced(model: Any, generate: Callable[..., Any]) -> Iterator[None]:
    """``model.generate`` is ``generate`` for the duration (an instance attribute over the class's method)."""
    previous = model.__dict__.get("generate")
    model.generate = generate
    try:
        yield
    finally:
        if previous is None:
            del model.generate
        else:
            model.generate = previous


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class RolloutTrainer:
    """What training adds to the backend's ``GRPOTrainer``; ``trainer_class(base)`` mixes it over ``base``.

    The only code that touches TRL's internals:

    - ``rollout="static"``: completions come from ``decoding.RolloutDecoder``. TRL 0.22.2 generates inline in
      ``_generate_and_score_completions`` with ``unwrapped_model.generate(input_ids, attention_mask, ...)`` on
      left-padded prompts; for that call, the unwrapped model's ``generate`` is the decoder, which returns what
      ``generate`` returns: the prompts as given, then the completions right-padded with the pad token (each
      ending at its first EOS token or at ``max_completion_length``). TRL then builds the EOS mask, the
      ``completion_ids`` lists for the rewards, the log-probabilities and the advantages exactly as for its own
      ``generate``. The adapter is merged for the rollout (``merge_adapter``; default on CUDA) and recomputed from
      the current weights every call, so no rollout samples a stale policy. Each call is seeded from the run's
      seed, the process and the optimizer step, so a resumed run draws what an uninterrupted one would have;
    - ``record_metric`` / ``has_unlogged_metrics``: TRL's per-step metric buffer (``_metrics``);
    - ``save_checkpoint_now``: a full checkpoint at the current step (``_save_checkpoint``);
    - ``profile=True``: per-step seconds of generation, reference pass, rewards, policy forward/backward and the
      rest, logged as ``profile/*_s`` (the GPU is synchronised at each boundary).
    """

    def __init__(self, *args: Any, rollout: str = "generate", merge_adapter: bool | None = None,
                 profile: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if rollout not in ROLLOUTS[1:]:
            raise ValueError(f"rollout must be one of {ROLLOUTS[1:]} here (resolve 'auto' first), got {rollout!r}")
        self.rollout = rollout
        self.rollout_decoder: decoding.RolloutDecoder | None = None
        self.rollout_info: dict[str, Any] = {}  # what the last static rollout ran (method, slots, CUDA graphs)
        self._rollout_calls: dict[int, int] = {}
        self._in_rollout = False
        self.phase_seconds: dict[str, float] | None = None
        if rollout == "static":
            if getattr(self, "use_vllm", False) or getattr(self, "use_transformers_paged", False):
                raise ValueError("rollout='static' generates with decoding.py: turn use_vllm and "
                                 "use_transformers_paged off")
            if merge_adapter is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                merge_adapter = self.accelerator.device.type == "cuda" and hasattr(unwrapped, "merge_adapter")
            self.rollout_decoder = decoding.RolloutDecoder(static_rollout_settings(self.generation_config),
                                                           merge_adapter=merge_adapter)
        if profile:
            self.phase_seconds = dict.fromkeys(("rollout", "reference", "rewards", "train_step"), 0.0)
            self.add_callback(_phase_logger(self))

    # -- metrics and checkpoints -------------------------------------------------------------------
    def record_metric(self, name: str, value: float) -> None:
        """Append to TRL's metric buffer: averaged over the logging step and logged beside ``reward``."""
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value))

    def has_unlogged_metrics(self) -> bool:
        """True when training metrics are buffered for a step that has not been logged yet."""
        return bool(self._metrics["train"])

    def save_checkpoint_now(self) -> None:
        """Save a full checkpoint (adapter, optimizer, scheduler, RNG states, trainer state) at this step."""
        self._save_checkpoint(self.model, trial=None)

    # -- rollouts ----------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: Any) -> Any:
        self._in_rollout = True
        try:
            with self._timed("rollout"):
                if self.rollout_decoder is None:
                    return super()._generate_and_score_completions(inputs)
                model = self.accelerator.unwrap_model(self.model_wrapped)
                calls = self.rollout_decoder.calls
                with _generate_replaced(model, lambda **kwargs: self._static_generate(model, **kwargs)):
                    output = super()._generate_and_score_completions(inputs)
                if self.rollout_decoder.calls == calls:
                    raise RuntimeError("rollout='static': TRL generated without calling model.generate (a TRL "
                                       "version this trainer does not know); use rollout='generate'")
                return output
        finally:
            self._in_rollout = False

    def _static_generate(self, model: Any, input_ids: Any, attention_mask: Any, **_: Any) -> Any:
        """``model.generate``'s result for left-padded prompts: prompts, then right-padded completions."""
        import torch

        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        info: dict[str, Any] = {}
        completions = self.rollout_decoder.generate(model, prompts, seed=self._rollout_seed(), info=info)
        self.rollout_info = info
        block = torch.full((len(prompts), max(len(c) for c in completions)), self.generation_config.pad_token_id,
                           dtype=input_ids.dtype)
        for row, ids in enumerate(completions):
            block[row, :len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, block.to(input_ids.device)], dim=1)

    def _rollout_seed(self) -> int:
        """A seed per (run seed, process, optimizer step, call within the step): reproducible, and the same
        after a resume, which restores the step."""
        import numpy as np

        step = self.state.global_step
        call = self._rollout_calls.get(step, 0)
        self._rollout_calls[step] = call + 1
        entropy = [int(self.args.seed) & 0xFFFFFFFF, self.accelerator.process_index, step, call]
        return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)

    # -- profiling (profile=True) --------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        if self.phase_seconds is None:
            yield
            return
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.phase_seconds[phase] += time.perf_counter() - start

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._timed("train_step"):
            return super().training_step(*args, **kwargs)

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        with self._timed("rewards"):
            return super()._calculate_rewards(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        if not self._in_rollout:  # the policy's own forward (with gradients): part of training_step
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        with self._timed("reference"):  # reference model (and the old policy, when TRL needs it)
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _log_phases(self, step_seconds: float) -> None:
        seconds = self.phase_seconds
        phases = {"generation": seconds["rollout"] - seconds["reference"] - seconds["rewards"],
                  "reference": seconds["reference"], "rewards": seconds["rewards"],
                  "policy": seconds["train_step"] - seconds["rollout"],
                  "other": step_seconds - seconds["train_step"], "step": step_seconds}
        for name, value in phases.items():
            self._metrics["train"][f"profile/{name}_s"].append(value)
        self.phase_seconds = dict.fromkeys(seconds, 0.0)


def _phase_logger(trainer: RolloutTrainer) -> Any:
    """The callback that closes each optimizer step's phase times (``profile=True``)."""
    from transformers import TrainerCallback

    class PhaseLogger(TrainerCallback):
        start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _synchronize()
            trainer._log_phases(time.perf_counter() - self.start)

    return PhaseLogger()


_TRAINER_CLASSES: dict[type, type] = {}


def trainer_class(base: type) -> type:
    """``RolloutTrainer`` mixed over ``base``: TRL's ``GRPOTrainer``, or the class Unsloth puts in its place
    (built per base when first asked, since Unsloth replaces ``trl.GRPOTrainer`` when it is imported). Takes
    GRPOTrainer's arguments plus ``rollout`` (``vllm``, ``static`` or ``generate``), ``merge_adapter`` and
    ``profile``."""
    if base not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[base] = type(f"{base.__name__}WithRollouts", (RolloutTrainer, base),
                                      {"__doc__": RolloutTrainer.__doc__, "__module__": __name__})
    return _TRAINER_CLASSES[base]


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
    if step not in logged and trainer.has_unlogged_metrics():
        # Interrupted between the optimizer step and its logging: keep that step's metrics (without the loss).
        trainer.log({})
    # _save_checkpoint rotates old checkpoints when save_total_limit is set: an interruption must delete none.
    limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    try:
        trainer.save_checkpoint_now()
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
    smoke_reason = ("no CUDA GPU" if not runtime.has_cuda() else "requested") if config is not original else None
    check_config(config)  # before anything heavy: a bad configuration fails in seconds
    output_dir = run_output_dir(config)
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = latest_checkpoint(checkpoints_dir) if config.resume else None
    if not config.resume and latest_checkpoint(checkpoints_dir) is not None:
        raise ValueError(f"{checkpoints_dir} already holds checkpoints and resume=False; "
                         "choose another folder, delete them, or resume")
    _check_same_run(output_dir, config)

    _import_wandb_early()
    if config.backend == "auto" and config.rollout in ("static", "generate"):  # Unsloth generates with vLLM only
        backend, reason = "trl", f"rollout {config.rollout!r} runs on trl"
    else:
        backend, reason = resolve_backend(config.backend)  # imports unsloth first when it is used
    rollout, rollout_reason = resolve_rollout(config, backend)
    precision = resolve_precision(config.precision)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(startup_line(config, backend, reason, rollout, rollout_reason, smoke_reason), flush=True)
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
    use_vllm = rollout == "vllm"
    peft_config = None
    if backend == "unsloth":
        share = config.vllm_gpu_memory_utilization or 0.6
        model, trainer_tokenizer = _load_unsloth_model(config, share)
    else:
        model, peft_config = _load_trl_model(config, tokenizer, precision)
        trainer_tokenizer = tokenizer
    if rank == 0:
        print(f"Training {config.method} (λ={config.lam}) with {backend} + {ROLLOUT_LABELS[rollout]}, {precision}, "
              f"{world_size()} process(es) -> {output_dir}", flush=True)

    monitor = RewardMonitor(config.num_generations, config.max_completion_length, live_view=config.live_view,
                            batches_file=output_dir / "batches.jsonl")
    reward_funcs = monitor.wrap(rewards.reward_functions(config.method, **reward_params(config)))
    args = GRPOConfig(**grpo_arguments(config, checkpoints_dir, backend, precision, use_vllm,
                                       run_name=config.resolved_folder()))
    trainer = trainer_class(GRPOTrainer)(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                                         processing_class=trainer_tokenizer, peft_config=peft_config,
                                         callbacks=list(callbacks or []), rollout=rollout,
                                         merge_adapter=config.rollout_merge_adapter, profile=config.profile_steps)
    monitor.attach(trainer)

    if rank == 0:
        _write_json(output_dir / "run_config.json", {"config": dataclasses.asdict(config), "backend": backend,
                                                     "rollout": rollout, "rollout_reason": rollout_reason,
                                                     "precision": precision, "num_processes": world_size()})
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
            "rollout": rollout, "rollout_reason": rollout_reason,
            "precision": precision, "num_processes": world_size(), "use_vllm": use_vllm,
            "train_seconds": train_seconds, "train_seconds_total": sum(s["seconds"] for s in sessions),
            "global_step": trainer.state.global_step, "resumed_from": str(resume_from) if resume_from else None,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": runtime.library_versions(),
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
