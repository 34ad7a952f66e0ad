r"""GRPO training of Qwen2.5-0.5B-Instruct on GSM8K with the length-aware rewards of ``rewards.METHODS``.

One builder serves the four training notebooks, the command line and multi-GPU runs::

    import training
    result = training.train(training.TrainConfig(method="group", lam=0.5))
    training.plot_training_curves(result.output_dir)
    summary = training.evaluate_adapter(result)   # evaluation.evaluate_run on the run folder

    python training.py --method group [--lam 0.3 ...]          # train, then evaluate (evaluation.py)
    python training.py                                          # no GPU: the CPU smoke configuration
    accelerate launch --config_file configs/accelerate_2gpu.yaml training.py --method group

This module holds the run's configuration and its checks, the live view and ``RewardMonitor`` (the step's numbers
are ``metrics.batch_metrics``), checkpoint records, the backends, the ``train`` flow, the curves and the CLI; the
evaluation after training is ``evaluation.evaluate_run``.

A method is one entry of ``rewards.METHODS``: ``lam`` reaches the method's length rewards and
``reward_params`` reaches any other keyword a reward function takes (e.g. a literature method's own
parameter); a parameter that no function of the method takes is an error.

Backends
    ``unsloth``  Unsloth's FastLanguageModel: LoRA, Unsloth gradient checkpointing, vLLM fast inference
                 sharing the GPU with training (``UNSLOTH_VLLM_STANDBY=1``) where vLLM is installed and starts,
                 else without fast inference and with the project's decoder; fp16 on a T4.
    ``trl``      transformers + PEFT LoRA + TRL's GRPOTrainer, rollouts from vLLM or the project's decoder.
    ``auto``     Unsloth on CUDA when it imports and patches TRL cleanly, else ``trl`` (one line says why).
Both backends pass the same trainer arguments, including those whose defaults Unsloth rewrites
(``PINNED_ARGUMENTS``); ``run_config.json`` records the effective ones and the model repo really loaded. Every
stage of Unsloth's start (``UNSLOTH_STAGES``) has a defined fallback: go on without vLLM, or stop in the first
minutes with one line naming the stage and the change (``StageFailure``). When training begins, a first-minutes
block (``format_first_minutes``) says which GPU, precision, backend and rollout generator run and why, and after
step 2 the seconds a step and the projected hours against a Colab session.

Rollouts (``rollout``; the run's first line names the generator and why)
    ``vllm``     TRL's vLLM colocate mode (``trl``) or Unsloth's fast inference (``unsloth``).
    ``static``   ``decoding.RolloutDecoder``: a static KV cache and CUDA graphs, the LoRA adapter merged on CUDA
                 (``trainer_class``); the fallback wherever vLLM is not installed (``trl`` backend only: Unsloth
                 patches the attention the decoder drives).
    ``generate`` TRL's plain transformers ``generate`` (Unsloth's own generate on the ``unsloth`` backend).
    ``auto``     vLLM when it is installed and imports, else ``static`` (``generate`` on ``unsloth``).

What a run costs (defaults: 4000 questions x 8 completions = 32,000 completions = 2000 optimizer steps of 16
completions = 2 whole groups, at most 512 completion tokens). Measured (BENCHMARKS.md) on an H100 capped at 15 GiB
with a 0.5B-shaped random model whose completions all run to 512 tokens (the worst case), default layout (4
completions per micro-batch x 4 micro-batches): rollouts ``static`` 3.6 s a step (2.2 s generating), 4.9 GiB peak
allocated, 2 h for 2000 steps; transformers ``generate`` 31 s a step (17 h). On a T4 the estimate (a cost model, not a
measurement) is 4-7.5 s a step worst case and 2-3.5 s at realistic lengths: 1-4 h, one Colab session; running again
resumes from the last checkpoint (``save_steps=50``) with the same data order. Disk: ~106 MB a checkpoint (adapter +
AdamW state), ~4.2 GB for all 40 (``save_total_limit`` keeps fewer). Two GPUs (``accelerate launch``) double the
completions per step at about the same step time.

Outputs (``output_dir`` = ``runtime.run_dir(method, save_to_drive, smoke, folder)``, i.e. ``outputs/<folder>`` or
Google Drive ``MyDrive/length-rl/<folder>``; the folder of a study method is ``runtime.METHOD_FOLDERS``'s)::

    <output_dir>/adapter/            final LoRA adapter + tokenizer + run_config.json (config, sessions, times,
                                     versions); written last, it marks the run finished (running again re-uses it)
    <output_dir>/checkpoints/        checkpoint-<step>/ every save_steps, each ending with CHECKPOINT_MARKER (the
                                     run resumes from the newest complete one)
    <output_dir>/run_config.json     the run's settings (RUN_IDENTITY is fixed) and each session's
    <output_dir>/sessions.jsonl      each session's start and end step, seconds and status, updated every step
    <output_dir>/log_history.json    the trainer's log history (every metric at every logging step), kept current
    <output_dir>/batches.jsonl       the question ids of every step (proves the data order on resume), each once
    <output_dir>/training_curves.png plot_training_curves()
    <output_dir>/wandb/              Weights & Biases files (offline: ``wandb sync <output_dir>/wandb/offline-run-*``)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import data
import decoding
import metrics
import rewards
import runtime

BACKENDS = ("auto", "unsloth", "trl")
ROLLOUTS = ("auto", "vllm", "static", "generate")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The settings that may change when a run resumes: where it is written, how often it is saved and logged, and
# memory-only switches. Every other TrainConfig field shapes what is trained, so it is part of the run's identity
# (RUN_IDENTITY): resuming with a different value is an error. ``max_steps`` may only grow (train further).
RESUME_MAY_CHANGE = ("folder", "output_dir", "save_to_drive", "push_to_hub", "hub_repo", "save_steps",
                     "save_total_limit", "logging_steps", "report_to", "wandb_project", "live_view", "resume", "smoke",
                     "gradient_checkpointing", "vllm_gpu_memory_utilization", "rollout", "rollout_merge_adapter",
                     "profile_steps")
# Written last and atomically into a checkpoint folder: the names and sizes of the files saved before it.
CHECKPOINT_MARKER = "checkpoint_complete.json"
# log_history.json is rewritten at most this often while training (and at every checkpoint): small on Drive.
LOG_WRITE_SECONDS = 60.0
SMOKE_STEPS = 2


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
    folder: str | None = field(default=None, metadata={"help": "output folder name (default: the method's folder)"})
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
        return runtime.run_folder(self.method, folder=self.folder)


RUN_IDENTITY = tuple(spec.name for spec in dataclasses.fields(TrainConfig)
                     if spec.name not in RESUME_MAY_CHANGE and spec.name != "max_steps")


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
    # True when the run had already finished and was re-used as it was (nothing trained, adapter untouched).
    reused: bool = False


def smoke_config(config: TrainConfig) -> TrainConfig:
    """``config`` turned into the CPU smoke configuration, keeping its method, λ and reward parameters.

    Tiny random Qwen2 with the real tokenizer, 8 GSM8K questions, 2 GRPO steps of 2 groups of 4
    completions of at most 32 tokens, checkpoints every step, ``trl`` backend, local disk.
    """
    return dataclasses.replace(
        config,
        model=runtime.TINY_MODEL,
        backend="trl",
        rollout=config.rollout if config.rollout in ("static", "generate") else "auto",  # vLLM cannot serve it
        train_size=runtime.SMOKE_QUESTIONS,
        max_steps=SMOKE_STEPS if config.max_steps is None else min(config.max_steps, SMOKE_STEPS),
        num_generations=4,
        per_device_train_batch_size=4,
        steps_per_generation=2,
        max_completion_length=runtime.SMOKE_NEW_TOKENS,
        gradient_checkpointing=False,
        precision="fp32",
        save_steps=1,
        logging_steps=1,
        save_to_drive=False,
        push_to_hub=False,
        folder=runtime.run_folder(config.method, smoke=True, folder=config.folder),
        smoke=True,
    )


def smoke_overrides(config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings given explicitly (not TrainConfig's defaults) that the smoke configuration replaces,
    ``{name: (given, smoke value)}``: smoke mode says what it changed instead of changing it silently."""
    smoke, defaults = smoke_config(config), TrainConfig()
    return {spec.name: (getattr(config, spec.name), getattr(smoke, spec.name))
            for spec in dataclasses.fields(TrainConfig)
            if spec.name != "smoke" and getattr(config, spec.name) != getattr(defaults, spec.name)
            and getattr(config, spec.name) != getattr(smoke, spec.name)}


# --------------------------------------------------------------------------------------------------
# Configuration checks (before anything heavy is loaded)
# --------------------------------------------------------------------------------------------------

def reward_params(config: TrainConfig) -> dict[str, Any]:
    """The keyword parameters for ``rewards.reward_functions``, checked for name, type and range: ``lam`` and the
    generation limit (``max_completion_length``) for the methods that take them, then ``config.reward_params``
    (``rewards.effective_params``: a value given twice must agree, so the banner shows what trains)."""
    return rewards.effective_params(config.method, config.reward_params, lam=config.lam,
                                    max_completion_length=config.max_completion_length)


def check_config(config: TrainConfig) -> None:
    """Raise a one-line ``runtime.ConfigError`` for a configuration that cannot train correctly; loads nothing.

    The group rewards compare the completions of one question, and TRL computes rewards on each process
    for that process's own completions. So every process must hold whole groups:
    ``per_device_train_batch_size * steps_per_generation`` (the completions one process generates at a
    time) must be a multiple of ``num_generations``. TRL itself only asks this of the sum over processes.
    """
    error = runtime.ConfigError
    if config.backend not in BACKENDS:
        raise error(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    check_rollout(config)
    # These decide how completions are split across processes and steps: set them on TrainConfig, where the
    # whole-group check below sees them, never through grpo_overrides.
    guarded = sorted({"per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                      "num_generations", "generation_batch_size"} & set(config.grpo_overrides))
    if guarded:
        raise error(f"grpo_overrides may not set {guarded}: use the TrainConfig fields, which are checked "
                    "for whole groups per process")
    if config.precision not in PRECISIONS:
        raise error(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.report_to not in {"wandb", "none"}:
        raise error(f"report_to must be 'wandb' or 'none', got {config.report_to!r}")
    for name in ("num_generations", "per_device_train_batch_size", "steps_per_generation", "max_completion_length",
                 "train_size", "save_steps", "logging_steps", "lora_r", "max_prompt_length", "max_steps_in_question"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise error(f"{name} must be a positive integer, got {value!r}")
    if config.num_generations < 2:
        raise error("num_generations must be at least 2: GRPO compares completions within a group")
    for name in ("max_steps", "save_total_limit"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise error(f"{name} must be a positive integer or None, got {value!r}")
    per_process = config.per_device_train_batch_size * config.steps_per_generation
    if per_process % config.num_generations:
        raise error(
            "groups would be split across processes: per_device_train_batch_size "
            f"({config.per_device_train_batch_size}) x steps_per_generation ({config.steps_per_generation}) = "
            f"{per_process} completions per process is not a multiple of num_generations "
            f"({config.num_generations}). Group rewards need each question's {config.num_generations} completions "
            "on one process; e.g. use steps_per_generation="
            f"{runtime.round_up(per_process, config.num_generations) // config.per_device_train_batch_size}.")
    if not 0 < config.learning_rate < 1:
        raise error(f"learning_rate must be in (0, 1), got {config.learning_rate}")
    if not 0 <= config.warmup_ratio <= 1:
        raise error(f"warmup_ratio must be in [0, 1], got {config.warmup_ratio}")
    if not (math.isfinite(config.beta) and config.beta >= 0):
        raise error(f"beta must be >= 0, got {config.beta}")
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise error(f"temperature must be > 0, got {config.temperature}")
    # A negative λ would turn every length penalty into a bonus for rambling.
    if not (isinstance(config.lam, (int, float)) and math.isfinite(config.lam) and config.lam >= 0):
        raise error(f"lam must be a number >= 0, got {config.lam!r}")
    if config.push_to_hub and not config.hub_repo:
        raise error("push_to_hub=True needs hub_repo, e.g. 'your-name/qwen-gsm8k-group'")
    if config.push_to_hub and not runtime.get_secret("HF_TOKEN"):
        raise error("push_to_hub=True needs an HF_TOKEN (Colab secret or environment variable)")
    _check_local_paths(config)
    _check_reward_params(config)
    if "target_length" in rewards.method_columns(config.method) and config.budget is None:
        raise error(f"method {config.method!r} needs a per-question target_length: set budget to one of "
                    "budgets.KINDS ('steps', 'reference', 'question')")


def _looks_like_local_path(name: str) -> bool:
    # A Hub repo id is "name" or "owner/name"; anything absolute, relative or deeper is a folder on this machine.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name[1:2] == ":"


def _check_local_paths(config: TrainConfig) -> None:
    if config.model != runtime.TINY_MODEL and _looks_like_local_path(config.model):
        if not Path(config.model).expanduser().is_dir():
            raise runtime.ConfigError(f"model {config.model!r}: no such local folder (a Hub model is given as "
                                      "'owner/name', e.g. 'Qwen/Qwen2.5-0.5B-Instruct')")
    for name in ("tokenizer", "gsm8k_dir"):
        value = getattr(config, name)
        if value and not Path(value).expanduser().exists():
            raise runtime.ConfigError(f"{name} {value!r}: no such local folder")


def _check_reward_params(config: TrainConfig) -> None:
    """Unknown method or parameter, a parameter of the wrong type or range, or one that contradicts the
    TrainConfig field that sets it (``lam``, ``max_completion_length``): an error now, not after hours."""
    if config.method not in rewards.METHODS:
        raise runtime.ConfigError(f"unknown method {config.method!r}; choose one of {sorted(rewards.METHODS)}")
    try:
        rewards.reward_functions(config.method, **reward_params(config))
    except runtime.ConfigError:
        raise
    except (ValueError, TypeError) as problem:
        raise runtime.ConfigError(str(problem)) from None


# --------------------------------------------------------------------------------------------------
# The live view (the step's metrics are metrics.batch_metrics)
# --------------------------------------------------------------------------------------------------

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


def _gather(items: list[Any]) -> list[list[Any]]:
    """Every process's ``items`` (a list per process); collective, so every process must call it."""
    size = runtime.world_size()
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
                **batch: Any) -> dict[str, float]:
        """Log the batch's metrics, print the live view, record the question order; returns the metrics.

        ``batch`` is what TRL passes a reward function besides the completions: the dataset columns ``answer``,
        ``question_length`` and ``reference_length`` (needed) and ``question_id``, and ``prompts``,
        ``log_metric`` and ``trainer_state`` where TRL gives them."""
        needed = ("answer", "question_length", "reference_length")
        missing = [name for name in needed if name not in batch]
        if missing:
            raise ValueError(f"the reward batch lacks the dataset column(s) {missing} (data.training_dataset has them)")
        answer, question_length, reference_length = (batch[name] for name in needed)
        question_id, prompts = batch.get("question_id"), batch.get("prompts")
        log_metric, trainer_state = batch.get("log_metric"), batch.get("trainer_state")
        keys = rewards.group_keys(len(completions), prompts, question_id)
        rank = runtime.rank()
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
        step_metrics = metrics.batch_metrics(
            [r["length"] for r in records], [r["question_length"] for r in records],
            [r["reference_length"] for r in records], [r["correct"] for r in records],
            [r["format_ok"] for r in records], self.max_completion_length)
        step_metrics["whole_groups"] = metrics.whole_group_fraction(records, self.num_generations)
        self.last_metrics = step_metrics
        log = log_metric
        if log is None and self.trainer is not None:
            log = trainer_metric_logger(self.trainer)
        if log is not None:
            for name, value in step_metrics.items():
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
        return step_metrics


def _format_number(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --------------------------------------------------------------------------------------------------
# Checkpoints, run records
# --------------------------------------------------------------------------------------------------

def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name.split("-", 1)[1] if "-" in path.name else ""
    return int(suffix) if suffix.isdigit() else None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a ``checkpoint-<step>`` folder cannot be resumed from; None when it is complete.

    Complete means: its completion marker (``CHECKPOINT_MARKER``, written last and atomically) exists, every
    file it lists has the recorded size (a kill mid-save, a truncated copy or a half-synced Drive file fails
    this), and ``trainer_state.json`` is valid JSON for that step."""
    folder = Path(checkpoint)
    try:
        files = json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {CHECKPOINT_MARKER} (saving it was cut short)"
    except (ValueError, KeyError, TypeError):
        return f"{CHECKPOINT_MARKER} is unreadable"
    for name, size in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, {size} when saved)"
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is missing or not valid JSON"
    if state.get("global_step") != _checkpoint_step(folder):
        return f"trainer_state.json is for step {state.get('global_step')}"
    return None


def find_checkpoint(checkpoints_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(each newer checkpoint skipped, why), newest first])."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None, []
    candidates = sorted(((step, path) for path in folder.glob("checkpoint-*")
                         if path.is_dir() and (step := _checkpoint_step(path)) is not None), reverse=True)
    skipped = []
    for _, path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder (see ``checkpoint_problem``), so a checkpoint cut short
    by a disconnect or corrupted later is skipped rather than breaking the resume."""
    return find_checkpoint(checkpoints_dir)[0]


def mark_checkpoint_complete(checkpoint: str | os.PathLike) -> Path:
    """Write the completion marker of a saved checkpoint: each of its files with its size, atomically, last."""
    folder = Path(checkpoint)
    files = {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != CHECKPOINT_MARKER and not path.name.endswith(".tmp")}
    return runtime.write_atomic(folder / CHECKPOINT_MARKER, json.dumps(
        {"step": _checkpoint_step(folder), "files": files, "written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


def _rotate_checkpoints(checkpoints_dir: Path, keep: int | None) -> None:
    # Done here, after the newest checkpoint is marked complete (the trainer's own rotation runs before): a kill
    # in between never leaves fewer than `keep` complete checkpoints.
    if keep is None:
        return
    complete = sorted((step, path) for path in checkpoints_dir.glob("checkpoint-*")
                      if (step := _checkpoint_step(path)) is not None and checkpoint_problem(path) is None)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _set_aside(skipped: Sequence[tuple[Path, str]]) -> None:
    """Rename incomplete checkpoints newer than the resume point (``checkpoint-N.incomplete``): the resumed run
    saves ``checkpoint-N`` again and must not write into a folder holding a stale marker or files."""
    for path, _ in skipped:
        target = path.with_name(f"{path.name}.incomplete")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        path.rename(target)


def _rng_snapshot() -> dict[str, Any]:
    """The random states a checkpoint saves (python, numpy, torch CPU and CUDA), as at the end of a step."""
    import random

    import numpy as np
    import torch

    snapshot: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                                "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        snapshot["cuda"] = torch.cuda.random.get_rng_state_all()
    return snapshot


def _restore_rng(snapshot: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.random.set_rng_state(snapshot["cpu"])
    if "cuda" in snapshot:
        torch.cuda.random.set_rng_state_all(snapshot["cuda"])


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_same_run(output_dir: Path, config: TrainConfig, saved: dict[str, Any]) -> None:
    """Every RUN_IDENTITY field must equal the saved run's: resuming with another value would mix two runs."""
    current = _jsonable(dataclasses.asdict(config))
    different = [name for name in RUN_IDENTITY if name in saved and saved[name] != current[name]]
    if different:
        details = ", ".join(f"{name}: saved {saved[name]!r} vs now {current[name]!r}" for name in different)
        raise runtime.ConfigError(
            f"{output_dir} holds a different run ({details}); resuming would mix two runs: keep the saved "
            "value, or choose another folder (folder/output_dir)")


def _finished_record(output_dir: Path) -> dict[str, Any] | None:
    """The final record of a run whose adapter was saved (written last, after the adapter), else None."""
    record = _read_json(output_dir / "adapter" / "run_config.json")
    if record is None or not (output_dir / "adapter" / "adapter_config.json").is_file():
        return None
    return record


def _write_json(path: Path, payload: Any) -> None:
    runtime.write_atomic(path, json.dumps(_jsonable(payload), indent=2))  # a disconnect never leaves half a file


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in data.iter_jsonl(path)] if path.is_file() else []


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    runtime.write_atomic(path, "".join(json.dumps(_jsonable(row)) + "\n" for row in rows))


def _update_session(output_dir: Path, session: dict[str, Any]) -> list[dict[str, Any]]:
    """Rewrite ``sessions.jsonl`` (atomically) with this session's entry in place; returns every session.

    One line per training session: its number, start and end step, seconds of training and status
    (``running`` while it trains, then ``finished`` or ``interrupted``; a session still ``running`` when the
    next one starts was killed, its time counted up to its last finished step)."""
    path = output_dir / "sessions.jsonl"
    sessions = _read_jsonl(path)
    numbers = [entry.get("session", index + 1) for index, entry in enumerate(sessions)]
    if session["session"] in numbers:
        sessions[numbers.index(session["session"])] = dict(session)
    else:
        sessions.append(dict(session))
    _write_jsonl(path, sessions)
    return sessions


def _start_session(output_dir: Path, start_step: int) -> dict[str, Any]:
    """A new ``sessions.jsonl`` entry; sessions left ``running`` by a killed process are marked ``killed``."""
    path = output_dir / "sessions.jsonl"
    sessions = _read_jsonl(path)
    for entry in sessions:
        if entry.get("status") == "running":
            entry.update(status="killed", interrupted=True)
    _write_jsonl(path, sessions)
    return {"session": len(sessions) + 1, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "start_step": start_step,
            "end_step": start_step, "seconds": 0.0, "status": "running", "interrupted": False}


def _keep_batches_until(output_dir: Path, step: int) -> None:
    """batches.jsonl keeps the steps up to the resume point; later ones were lost with the process and are
    trained again, so each step appears once."""
    path = output_dir / "batches.jsonl"
    rows = _read_jsonl(path)
    kept = [row for row in rows if row.get("step") is not None and row["step"] <= step]
    if len(kept) != len(rows):
        _write_jsonl(path, kept)


def _mark_resumed_step(output_dir: Path, step: int, resumed_from: str) -> None:
    """Mark the first step a resumed session trained in batches.jsonl (``resumed_from``: its checkpoint)."""
    path = output_dir / "batches.jsonl"
    rows = _read_jsonl(path)
    for row in rows:
        if row.get("step") == step:
            row["resumed_from"] = resumed_from
    _write_jsonl(path, rows)


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
    if requested == "auto" and not use_vllm:  # trl with the project's decoder is faster than Unsloth's generate
        return "trl", "Unsloth not used: without vLLM the project's decoder on trl generates faster"
    problem = _unsloth_problem(use_vllm)
    if problem is None:
        return "unsloth", "requested" if requested == "unsloth" else "Unsloth imported and patched TRL"
    return backend_after_unsloth_failure(requested, *problem, trl_patched=_trl_patched_by_unsloth())


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the GPU supports it, fp16 on other GPUs (T4), fp32 on the CPU."""
    return runtime.default_precision() if precision == "auto" else precision




def _load_trl_model(config: TrainConfig, tokenizer, precision: str):
    """(model, peft_config) for TRL: the base model (tiny random for smoke runs) and a LoRA config."""
    from peft import LoraConfig

    if config.model == runtime.TINY_MODEL:
        model = runtime.build_tiny_qwen2(tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=runtime.torch_dtype(precision),
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
        dtype=runtime.torch_dtype(precision),  # the precision both backends resolved (runtime.default_precision)
        load_in_4bit=False,  # 0.5B fits in 16 bit; 4-bit would change the model under study
        fast_inference=fast_inference,  # vLLM generation
        max_lora_rank=config.lora_r,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization or 0.6,
        use_exact_model_name=True,
        on_model_resolved=resolved.append,
        # The tokenizer the trl backend uses; Unsloth would read it from the model folder (loader_utils.py,
        # _resolve_checkpoint_tokenizer_name: an explicit tokenizer_name wins).
        **({"tokenizer_name": str(config.tokenizer)} if config.tokenizer else {}),
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
        "save_total_limit": None,  # rotated after the completion marker (RunKeeper), never before
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
#               probe generation. Go on with Unsloth without fast inference, generating with its own generate
#               (rollout "generate"), once the GPU memory is free again; stop (restart, ROLLOUT = "static") when it
#               is not, or when rollout "vllm" was asked for. Loading without fast inference failing: stop,
#               set BACKEND = "trl" and restart.
#   trainer     stop: set ROLLOUT = "static" (with vLLM) or BACKEND = "trl", and restart.
#   first_step  out of memory before the first optimizer step ends (either backend): stop, naming what to lower.
UNSLOTH_STAGES = ("import", "patch", "load", "engine", "generate", "trainer", "first_step")
_BACKEND_TRL = 'BACKEND = "trl" (CLI: --backend trl)'
_ROLLOUT_STATIC = 'ROLLOUT = "static" with BACKEND = "auto" (CLI: --rollout static; it trains on trl)'
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
    return config.rollout in ("auto", "vllm") and _vllm_problem(config) is None


def _with_generate_rollout(config: TrainConfig) -> TrainConfig:
    # Unsloth patches Qwen2's attention, which the project's decoder cannot drive: its own generate takes over.
    return dataclasses.replace(config, rollout="generate")


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
    the configuration to train (rollout "generate" after a vLLM stage failed) and one line per fallback taken."""

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
    failure there falls back to Unsloth without fast inference and rollout "generate" (Unsloth's own generation),
    once the GPU memory is free again (``NO_VLLM_MIN_FREE_GIB``); ``StageFailure`` otherwise, and when rollout "vllm"
    was asked for. Loading without fast inference failing is a ``StageFailure`` at ``load``."""
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
            if config.rollout == "vllm":
                raise StageFailure(stage, why, f"set {_ROLLOUT_STATIC}, {_RESTART}") from error
            error.__traceback__ = None  # its frames hold the model and the engine: let them go
        model = tokenizer = None  # the half-started engine's memory must be freed before reloading
        note = vllm_failure_note(stage, why, free_gpu_gib())
        out(note)
        notes.append(note)
        config = _with_generate_rollout(config)
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
    if config.backend == "unsloth" and config.rollout == "static":
        raise ValueError("rollout='static' needs backend 'trl' or 'auto': Unsloth patches the model's attention, "
                         "which the project's decoder cannot drive (Unsloth without vLLM uses rollout 'generate')")
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

    ``vllm``: TRL's colocate mode (``trl``) or Unsloth's fast inference (``unsloth``); ``static``:
    ``decoding.RolloutDecoder`` inside ``trainer_class``; ``generate``: TRL's plain ``model.generate``. ``auto``
    takes vLLM when it is installed and imports, otherwise ``static``, and the reason says why.
    """
    check_rollout(config)
    if config.rollout in ("static", "generate"):
        return config.rollout, "requested"
    problem = _vllm_problem(config)
    if config.rollout == "vllm":
        if problem:
            raise RuntimeError(f"rollout='vllm' is not available: {problem}. Use rollout='static' or 'auto'.")
        return "vllm", "requested" + (" (Unsloth's fast inference)" if backend == "unsloth" else " (TRL colocate)")
    if problem and backend == "unsloth":  # its patched attention bypasses the interface the decoder drives
        return "generate", f"vLLM not used: {problem}; Unsloth generates itself"
    if problem:
        return "static", f"vLLM not used: {problem}"
    return "vllm", "Unsloth's fast inference" if backend == "unsloth" else "vLLM installed (TRL colocate)"


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
    return smoke_config(config) if runtime.wants_smoke(config.smoke) else config


def run_output_dir(config: TrainConfig) -> Path:
    """``config.output_dir`` when given, else ``runtime.run_dir(method, save_to_drive, smoke, folder)``."""
    if config.output_dir:
        path = Path(config.output_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return runtime.run_dir(config.method, config.save_to_drive, bool(config.smoke), config.folder)


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


def _save_emergency_checkpoint(trainer, checkpoints_dir: Path,
                               snapshot: tuple[int, dict[str, Any], int] | None) -> Path | None:
    """After an immediate stop (KeyboardInterrupt outside a step's end): save a full checkpoint (adapter,
    optimizer, scheduler, RNG, state) at the last finished step, as the regular schedule would have saved it.

    ``snapshot`` is that step's (step, random states, tokens seen) taken at its end: the unfinished step has
    already drawn random numbers and counted its prompt and completion tokens, and a resumed run must continue
    from the finished step's values to repeat the uninterrupted run."""
    step = trainer.state.global_step
    target = checkpoints_dir / f"checkpoint-{step}"
    if step == 0 or checkpoint_problem(target) is None or runtime.world_size() > 1:
        return None  # nothing learned yet, already saved, or other processes cannot join the save
    if snapshot is not None and snapshot[0] == step:
        _restore_rng(snapshot[1])
        trainer.state.num_input_tokens_seen = snapshot[2]
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
    mark_checkpoint_complete(target)
    return target


def _run_keeper(output_dir: Path, session: dict[str, Any], save_total_limit: int | None,
                resumed_from: Path | None):
    """The trainer callback that keeps a run's records true while it trains (see RunKeeper)."""
    from transformers import TrainerCallback

    class RunKeeper(TrainerCallback):
        """Records written as training goes, and SIGINT/SIGTERM turned into a checkpoint.

        - Each checkpoint gets its completion marker once the trainer has saved it; old ones are rotated after.
        - ``sessions.jsonl`` (every step) and ``log_history.json`` (every checkpoint, and at most every
          ``LOG_WRITE_SECONDS``) are rewritten atomically, so a killed run keeps its time and its curves.
        - The random states and token count at each step's end are kept for an emergency checkpoint.
        - A stop signal that arrives between a step's optimizer update and the end of its logging and saving
          (``critical``) lets the step finish, then the trainer saves it and stops; elsewhere (generation, most
          of a step) it stops at once (``KeyboardInterrupt``) and ``train`` saves the last finished step.
        """

        def __init__(self) -> None:
            self.trainer: Any = None
            self.signal: int | None = None
            self.critical = False
            self.saving = False
            self.snapshot: tuple[int, dict[str, Any], int] | None = None
            self.started = time.perf_counter()
            self.logs_written = -math.inf

        def request_stop(self, signum: int, frame: Any) -> None:
            """Signal handler for SIGINT and SIGTERM (main thread, one process)."""
            first = self.signal is None
            self.signal = signum
            if self.saving:
                print(f"{signal.Signals(signum).name}: saving the checkpoint, then stopping", flush=True)
                return
            if first and self.critical:
                print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                      "(send it again to stop at once)", flush=True)
                return
            raise KeyboardInterrupt

        def seconds(self) -> float:
            return round(time.perf_counter() - self.started, 2)

        def write_logs(self, state: Any) -> None:
            _write_json(output_dir / "log_history.json", state.log_history)
            self.logs_written = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            state.compute_steps(args, state.max_steps)  # a resumed state keeps its old save/logging steps otherwise

        def on_step_begin(self, args, state, control, **kwargs):
            self.critical = False
            if self.signal is not None:  # came while the last step was logged or saved: it is complete, stop now
                raise KeyboardInterrupt

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.critical = True

        def on_step_end(self, args, state, control, **kwargs):
            self.snapshot = (state.global_step, _rng_snapshot(), state.num_input_tokens_seen)
            if self.signal is not None:
                control.should_save = control.should_training_stop = True
            if state.is_world_process_zero:
                session.update(end_step=state.global_step, seconds=self.seconds())
                _update_session(output_dir, session)
                if resumed_from is not None and state.global_step == session["start_step"] + 1:
                    _mark_resumed_step(output_dir, state.global_step, resumed_from.name)
            return control

        def on_log(self, args, state, control, **kwargs):
            if state.is_world_process_zero and time.perf_counter() - self.logs_written >= LOG_WRITE_SECONDS:
                self.write_logs(state)

        def on_save(self, args, state, control, **kwargs):
            if self.trainer is not None:
                self.trainer.accelerator.wait_for_everyone()  # every process has written its files
            if state.is_world_process_zero:
                self.write_logs(state)  # first: a complete checkpoint's steps are always in log_history.json
                mark_checkpoint_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                _rotate_checkpoints(Path(args.output_dir), save_total_limit)

    return RunKeeper()


def _catch_stop_signals(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Route SIGINT and SIGTERM to ``handler``; returns the previous handlers. Only the main thread of a
    single-process run (several processes would have to agree on the step to stop at)."""
    if threading.current_thread() is not threading.main_thread() or runtime.world_size() > 1:
        return {}
    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def _end_session(output_dir: Path, session: dict[str, Any], keeper: Any, trainer: Any, status: str) -> None:
    if trainer.accelerator.is_main_process:
        session.update(end_step=trainer.state.global_step, seconds=keeper.seconds(), status=status,
                       interrupted=status != "finished")
        _update_session(output_dir, session)
        keeper.write_logs(trainer.state)


# Files of a checkpoint that only resuming needs; the rest (adapter, tokenizer) is what adapter/ holds.
_TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                         CHECKPOINT_MARKER)


def _before_new_adapter(output_dir: Path) -> None:
    """A run trained further gets a new adapter: first its old final record goes (so a stop while the new adapter
    is written leaves an unfinished run, not a finished one with a mixed adapter), and the old adapter's
    evaluation moves to ``eval-step-<step>`` (it must not pass for the new adapter's)."""
    record = _finished_record(output_dir)
    if record is None:
        return
    if (output_dir / "eval").is_dir():
        target = output_dir / f"eval-step-{record.get('global_step')}"
        shutil.rmtree(target, ignore_errors=True)
        (output_dir / "eval").rename(target)
        print(f"The step-{record.get('global_step')} adapter's evaluation moved to {target}", flush=True)
    (output_dir / "adapter" / "run_config.json").unlink()


def _final_record(run: dict[str, Any], sessions: list[dict[str, Any]], global_step: int, max_steps: int,
                  train_seconds: float, resumed_from: Path | None) -> dict[str, Any]:
    """adapter/run_config.json: the run's settings, each session (settings and time) and the totals."""
    progress = {entry.get("session"): entry for entry in sessions}
    merged = [{**entry, **progress.get(entry.get("session"), {})} for entry in run.get("sessions", [])]
    return {
        **{key: value for key, value in run.items() if key != "sessions"},
        "train_seconds": train_seconds, "train_seconds_total": sum(s.get("seconds", 0.0) for s in sessions),
        "global_step": global_step, "max_steps": max_steps, "resumed_from": str(resumed_from) if resumed_from else None,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": runtime.library_versions(), "sessions": merged,
    }


def _finish_from_checkpoint(output_dir: Path, checkpoint: Path, config: TrainConfig) -> TrainResult:
    """The run trained its last step but was stopped before saving the adapter: the last checkpoint holds the
    trained adapter and tokenizer, so copy them into adapter/ (nothing is trained again)."""
    adapter_dir = output_dir / "adapter"
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    run = _read_json(output_dir / "run_config.json") or {"config": dataclasses.asdict(config)}
    result = TrainResult(output_dir=output_dir, adapter_dir=adapter_dir, train_seconds=0.0,
                         log_history=state["log_history"], resumed_from=str(checkpoint),
                         global_step=state["global_step"], backend=run.get("backend", "trl"), config=config)
    if runtime.rank() != 0:
        return result  # the main process writes
    _before_new_adapter(output_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in _TRAINING_STATE_FILES and not path.name.startswith("rng_state"):
            shutil.copy2(path, adapter_dir / path.name)
    _start_session(output_dir, state["global_step"])  # marks the killed session
    sessions = _read_jsonl(output_dir / "sessions.jsonl")
    _write_json(output_dir / "log_history.json", state["log_history"])
    _write_json(adapter_dir / "run_config.json",
                _final_record(run, sessions, state["global_step"], state["max_steps"], 0.0, checkpoint))
    print(f"{checkpoint} is the run's last step: its adapter saved to {adapter_dir} (nothing trained again)",
          flush=True)
    return result


def _reuse_finished(output_dir: Path, record: dict[str, Any], config: TrainConfig) -> TrainResult:
    done = record["global_step"]
    print(f"{output_dir} holds a finished run ({done} steps): re-using it (nothing trained, adapter unchanged). To "
          f"train further, give max_steps > {done} (it continues from its last checkpoint); for a new run, choose "
          "another folder.", flush=True)
    history_file = output_dir / "log_history.json"
    return TrainResult(output_dir=output_dir, adapter_dir=output_dir / "adapter", train_seconds=0.0,
                       log_history=load_log_history(output_dir) if history_file.is_file() else [],
                       resumed_from=None, global_step=done, backend=record.get("backend", "trl"), config=config,
                       reused=True)


def _session_changes(previous: dict[str, Any], config: TrainConfig) -> dict[str, list[Any]]:
    """The settings allowed to change on resume (RESUME_MAY_CHANGE, max_steps) that this session changes."""
    now = _jsonable(dataclasses.asdict(config))
    return {name: [previous[name], now[name]] for name in (*RESUME_MAY_CHANGE, "max_steps")
            if name in previous and previous[name] != now[name]}


def _planned_dir(config: TrainConfig) -> Path | None:
    # Where run_output_dir will write, without creating it (None on Drive, which must be mounted first).
    if config.output_dir:
        return Path(config.output_dir).expanduser()
    return None if config.save_to_drive else Path("outputs") / config.resolved_folder()


def train(config: TrainConfig, callbacks: Sequence[Any] | None = None) -> TrainResult:
    """Build and run one GRPO training run; returns where everything was saved.

    A folder holds one run. Running again resumes it from the newest complete checkpoint in
    ``<output_dir>/checkpoints`` (same data order: the sampler is seeded and the trainer skips the batches
    already seen); a finished run is re-used as it is (``TrainResult.reused``) unless ``max_steps`` asks for
    more steps. A setting of RUN_IDENTITY that differs from the saved run's is a ``runtime.ConfigError``, as is
    every other configuration problem found before the model loads (then no folder is left behind).

    SIGINT (Ctrl-C) and SIGTERM save a checkpoint first: at the end of the step when the signal comes while a
    step is being completed, else (and on a second signal) an emergency checkpoint of the last finished step.
    Then SIGINT raises ``KeyboardInterrupt`` and SIGTERM ends the process as it would have. Checkpoints already
    written are never removed by an interruption. ``callbacks`` are extra ``transformers.TrainerCallback``
    objects.
    """
    original = config
    config = resolve_config(config)
    smoke_reason = ("no CUDA GPU" if not runtime.has_cuda() else "requested") if config is not original else None
    replaced = smoke_overrides(original) if smoke_reason is not None else {}
    if replaced and runtime.rank() == 0:  # said before any check can stop the run
        print("Smoke mode replaced: " + ", ".join(f"{name} {given!r} -> {value!r}"
                                                  for name, (given, value) in replaced.items()), flush=True)
    check_config(config)  # before anything heavy: a bad configuration fails in seconds
    planned = _planned_dir(config)
    created = [] if planned is None else [p for p in (planned, *planned.parents) if not p.exists()]
    try:
        return _train(config, callbacks, smoke_reason)
    except BaseException:
        for path in created:  # a run that failed before writing anything leaves no folder behind
            try:
                path.rmdir()  # only ever removes an empty folder
            except OSError:
                break
        raise


def _train(config: TrainConfig, callbacks: Sequence[Any] | None, smoke_reason: str | None = None) -> TrainResult:
    output_dir = run_output_dir(config)
    checkpoints_dir = output_dir / "checkpoints"
    saved_run = _read_json(output_dir / "run_config.json") or {}
    saved = saved_run.get("config") or {}
    record = _finished_record(output_dir)
    resume_from, skipped = find_checkpoint(checkpoints_dir)
    if record is None and resume_from is None:
        # Nothing trained here to resume or mix with (e.g. a start that stopped in its first minutes, whose one-line
        # fix changes the backend or the micro-batches): the run starts afresh with the settings given now.
        saved = {}
    _check_same_run(output_dir, config, saved)
    if config.resume and config.max_steps is None and saved.get("max_steps") is not None:
        config = dataclasses.replace(config, max_steps=saved["max_steps"])  # the run's plan, unless asked for more
    if not config.resume and (record is not None or resume_from is not None or skipped):
        raise runtime.ConfigError(f"{output_dir} already holds a run and resume=False; choose another folder, "
                                  "delete it, or resume")
    start_step = _checkpoint_step(resume_from) if resume_from is not None else 0
    target = config.max_steps
    if record is not None:
        done = record["global_step"]
        target = config.max_steps if config.max_steps is not None else record.get("max_steps", done)
        if target < done:
            raise runtime.ConfigError(f"{output_dir} holds a run finished at step {done}: max_steps={target} "
                                      "cannot shorten it; choose another folder for a shorter run")
        if target == done:
            return _reuse_finished(output_dir, record, config)
        if resume_from is None:
            raise runtime.ConfigError(f"{output_dir} holds a run finished at step {done} but no complete checkpoint "
                                      "to train it further from; choose another folder")
        print(f"{output_dir} holds a run finished at step {done}: training it further to step {target}.", flush=True)
    elif resume_from is not None:
        planned = json.loads((resume_from / "trainer_state.json").read_text(encoding="utf-8")).get("max_steps")
        target = config.max_steps if config.max_steps is not None else planned
    if resume_from is not None and target is not None:
        if start_step > target:
            raise runtime.ConfigError(f"{resume_from} is already past max_steps={target}: give max_steps >= "
                                      f"{start_step}, or choose another folder")
        if start_step == target:  # trained to the end, stopped before the adapter was saved
            return _finish_from_checkpoint(output_dir, resume_from, config)
    for path, problem in skipped:
        print(f"Warning: skipping {path}: {problem}", file=sys.stderr, flush=True)
    changes = _session_changes(saved, config)
    if changes:
        print("Resuming with changed settings: " + ", ".join(f"{name} {old!r} -> {new!r}"
                                                             for name, (old, new) in changes.items()), flush=True)

    runtime.import_wandb_early()
    t4_environment = runtime.t4_vllm_environment()  # before unsloth or vllm is imported: FlashInfer off below cc 8.0
    # Imports unsloth first when it is used; stops here, with one line, when Unsloth fails half-way.
    backend, reason = resolve_backend(config.backend, use_vllm=_vllm_may_run(config))
    rollout, rollout_reason = resolve_rollout(config, backend)
    precision = resolve_precision(config.precision)
    rank = runtime.rank()
    if rank == 0:
        print(startup_line(config, backend, reason, rollout, rollout_reason, smoke_reason), flush=True)

    import torch  # noqa: F401  (after unsloth)
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = runtime.load_tokenizer(config.tokenizer, config.model)
    dataset = data.training_dataset(tokenizer, config.gsm8k_dir, size=config.train_size,
                                    max_steps=config.max_steps_in_question, seed=config.seed)
    if config.budget is not None:
        import budgets

        dataset = budgets.add_target_lengths(dataset, config.budget, tokenizer, config.gsm8k_dir,
                                             in_prompt=config.budget_in_prompt)
    per_step = (config.per_device_train_batch_size * config.steps_per_generation * runtime.world_size()
                // config.num_generations)
    if len(dataset) < per_step:
        raise runtime.ConfigError(
            f"the training set has {len(dataset)} question(s) (train_size={config.train_size}, "
            f"max_steps_in_question={config.max_steps_in_question}, gsm8k_dir={config.gsm8k_dir!r}) but one step "
            f"needs {per_step}: nothing to train")

    # Everything is checked: from here on the run writes into its folder.
    if rank == 0:
        _set_aside(skipped)
    if config.report_to == "wandb":
        mode = _setup_wandb(config, output_dir)
        if rank == 0:
            print(f"Weights & Biases: {mode}" + ("" if mode == "online" else
                  f" (sync later: wandb sync {output_dir}/wandb/offline-run-*)"), flush=True)
    use_vllm = rollout == "vllm"
    peft_config = None
    model_effective, notes, vllm_share = config.model, [], None
    if backend == "unsloth":  # stage by stage; without vLLM (absent, or failed to start) fast_inference=False
        started = start_unsloth(config, precision, fast_inference=use_vllm)
        model, trainer_tokenizer, model_effective = started.model, started.tokenizer, started.model_repo
        use_vllm, config, notes = started.fast_inference, started.config, started.notes
        vllm_share = started.vllm_memory_share
        if rollout == "vllm" and not use_vllm:  # fast inference failed: Unsloth goes on with the project's decoder
            rollout, rollout_reason = "generate", notes[0] if notes else "Unsloth's fast inference did not start"
    else:
        model, peft_config = _load_trl_model(config, tokenizer, precision)
        trainer_tokenizer = tokenizer
    if rank == 0:
        print(f"Training {config.method} (λ={config.lam}) with {backend} + {ROLLOUT_LABELS[rollout]}, {precision}, "
              f"{runtime.world_size()} process(es) -> {output_dir}", flush=True)

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
                             (rollout, rollout_reason),
                             model_effective, notes, t4_environment, vllm_share),
        record_path=output_dir / "run_config.json" if rank == 0 else None)
    session = _start_session(output_dir, start_step) if rank == 0 else {"session": 0, "start_step": start_step}
    keeper = _run_keeper(output_dir, session, config.save_total_limit, resume_from)
    # PEFT draws the LoRA weights inside GRPOTrainer(), before the trainer seeds anything: seed here, so that the
    # same seed gives the same adapter (and, on the CPU, the same run).
    set_seed(config.seed)
    try:
        trainer = trainer_class(GRPOTrainer)(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
            processing_class=trainer_tokenizer, peft_config=peft_config,
            callbacks=[keeper, *(callbacks or []), report.callback()], rollout=rollout,
            merge_adapter=config.rollout_merge_adapter, profile=config.profile_steps)
    except Exception as error:
        failure = trainer_failure(error, backend, use_vllm)
        if failure is None:
            raise
        raise failure from error
    monitor.attach(trainer)
    keeper.trainer = trainer
    # What the run really trains with, after Unsloth's rewrites: compare_arguments of two runs' records.
    effective = effective_arguments(trainer)
    run_record = {"model_effective": model_effective, "effective_args": effective,
                  "rewritten_args": compare_arguments(arguments, effective)["different"],
                  "first_minutes": report.fields}

    run = {"config": dataclasses.asdict(config), "backend": backend, "backend_reason": reason, "rollout": rollout,
           "rollout_reason": rollout_reason, "precision": precision, "num_processes": runtime.world_size(),
           "use_vllm": use_vllm, **run_record}
    if rank == 0:
        if backend == "unsloth" and run_record["rewritten_args"]:
            print("Unsloth changed trainer arguments: " + ", ".join(
                f"{name} {passed!r} -> {now!r}" for name, (passed, now) in run_record["rewritten_args"].items()),
                flush=True)
        last = (saved_run.get("sessions") or [{}])[-1]
        for key in ("backend", "rollout", "precision"):
            if last.get(key) not in (None, run[key]):
                print(f"Warning: this session trains with {key} {run[key]!r}, the previous one with {last[key]!r}",
                      file=sys.stderr, flush=True)
        _keep_batches_until(output_dir, start_step)
        sessions = [*(saved_run.get("sessions") or []), {
            "session": session["session"], "started": session["started"], "start_step": start_step,
            "resumed_from": str(resume_from) if resume_from else None, "changed": changes,
            **{key: run[key] for key in ("backend", "backend_reason", "rollout", "rollout_reason", "precision",
                                         "num_processes", "use_vllm")},
            "versions": runtime.library_versions()}]
        run["sessions"] = sessions
        _write_json(output_dir / "run_config.json", run)
        _update_session(output_dir, session)
        if resume_from is not None:
            print(f"Resuming from {resume_from}", flush=True)
    previous_handlers = _catch_stop_signals(keeper.request_stop)
    try:
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except KeyboardInterrupt:
            keeper.saving = True  # a further signal must not cut the emergency save short
            saved_checkpoint = _save_emergency_checkpoint(trainer, checkpoints_dir, keeper.snapshot)
            _end_session(output_dir, session, keeper, trainer, "interrupted")
            print(f"Interrupted at step {trainer.state.global_step}: "
                  + (f"emergency checkpoint {saved_checkpoint}" if saved_checkpoint else "checkpoints kept")
                  + f" in {checkpoints_dir}; run again to resume.", flush=True)
            raise
        except Exception as error:  # known first-step failures stop with one line (Colab path section)
            failure = first_step_failure(error, report.steps_done, config, use_vllm)
            if failure is not None:
                raise failure from error
            raise
        keeper.critical = True  # from here a stop signal waits until the adapter and the records are saved
        if keeper.signal is not None and trainer.state.global_step < trainer.state.max_steps:
            _end_session(output_dir, session, keeper, trainer, "interrupted")
            print(f"Stopped at step {trainer.state.global_step}: checkpoint {checkpoints_dir}/checkpoint-"
                  f"{trainer.state.global_step}; run again to resume.", flush=True)
            raise KeyboardInterrupt
        train_seconds = keeper.seconds()
        adapter_dir = output_dir / "adapter"
        if trainer.accelerator.is_main_process:
            _before_new_adapter(output_dir)
        trainer.save_model(str(adapter_dir))  # adapter weights + config (main process only)
        if trainer.accelerator.is_main_process:
            trainer_tokenizer.save_pretrained(str(adapter_dir))
            _end_session(output_dir, session, keeper, trainer, "finished")
            _write_json(adapter_dir / "run_config.json",  # written last: it marks the run finished
                        _final_record(run, _read_jsonl(output_dir / "sessions.jsonl"), trainer.state.global_step,
                                      trainer.state.max_steps, train_seconds, resume_from))
            if config.push_to_hub:
                print(f"Pushed to {push_adapter(adapter_dir, config.hub_repo)}", flush=True)
        trainer.accelerator.wait_for_everyone()
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        _finish_wandb(config)
        if keeper.signal == signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)  # everything is saved: end as SIGTERM would have
    if keeper.signal is not None:
        raise KeyboardInterrupt  # the run finished and was saved while a stop was asked for
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

def build_parser() -> argparse.ArgumentParser:
    """The CLI: one option per ``TrainConfig`` field (same names, dashes), plus evaluation options."""
    parser = argparse.ArgumentParser(
        prog="training.py", description="GRPO training on GSM8K with length-aware rewards (then evaluation).",
        epilog="Without a GPU the CPU smoke configuration runs (see --smoke/--no-smoke). Multi-GPU: "
               "accelerate launch --config_file configs/accelerate_2gpu.yaml training.py --method group")
    runtime.add_dataclass_options(parser, TrainConfig)
    parser.add_argument("--eval", dest="run_eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the adapter with evaluation.py after training (default: on)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="test questions to evaluate (default: all; smoke: 8)")
    parser.add_argument("--eval-backend", default="auto", help="evaluation backend (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a configuration error (default: one line)")
    return parser


def config_from_args(namespace: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**runtime.dataclass_values(TrainConfig, namespace))


def evaluate_adapter(result: TrainResult, limit: int | None = None, backend: str = "auto",
                     reuse_model: bool = True) -> dict[str, Any] | None:
    """Evaluate a finished run's adapter with ``evaluation.evaluate_run``, results in ``<output_dir>/eval``; None
    when the evaluation module is absent. ``reuse_model`` evaluates the trained model still in memory (no reload)."""
    try:
        import evaluation
    except ImportError:
        print("evaluation.py not found: skipping evaluation", flush=True)
        return None
    model = result.model if reuse_model else None
    return evaluation.evaluate_run(result.output_dir, model=model, tokenizer=result.tokenizer, compare=False,
                                   limit=limit, backend=backend)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """``python training.py [options]``: train, then evaluate the adapter (main process only)."""
    namespace = build_parser().parse_args(argv)
    with runtime.one_line_errors(namespace.debug, prog="training.py"):
        config = config_from_args(namespace)
        result = train(config)
        if runtime.rank() == 0:
            plot_training_curves(result.output_dir)
            done = "re-used" if result.reused else f"{result.train_seconds:.0f} s"
            print(f"Adapter: {result.adapter_dir}  ({done}, {result.global_step} steps)", flush=True)
            if namespace.run_eval:  # a re-used run's saved results are reported, not computed again
                evaluate_adapter(result, limit=namespace.eval_limit, backend=namespace.eval_backend)
    return result


if __name__ == "__main__":
    main()
