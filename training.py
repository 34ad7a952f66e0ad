r"""GRPO training of Qwen2.5-0.5B-Instruct on GSM8K with the length-aware rewards of ``rewards.METHODS``.

One builder serves the four training notebooks, the command line and multi-GPU runs::

    import training
    result = training.train(training.TrainConfig(method="group", lam=0.5))
    training.plot_training_curves(result.output_dir)
    summary = training.evaluate_adapter(result)   # evaluation.evaluate_run on the run folder

    python training.py --method group [--lam 0.3 ...]          # train, then evaluate (evaluation.py)
    python training.py                                          # no GPU: the CPU smoke configuration
    accelerate launch --config_file configs/accelerate_2gpu.yaml training.py --method group

This module holds the run's checks, the live view and ``RewardMonitor`` (the step's numbers are
``metrics.batch_metrics``), checkpoints and run records, the ``train`` flow, the curves and the CLI. The settings
are ``config.TrainConfig`` (re-exported here), the rollout generator and the one ``GRPOTrainer`` subclass are in
``rollouts.py``, the backends with Unsloth's stages and the first-minutes report in ``backends.py``; the evaluation
after training is ``evaluation.evaluate_run``.

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
(``backends.PINNED_ARGUMENTS``); ``run_config.json`` records the effective ones and the model repo really loaded. Every
stage of Unsloth's start (``backends.UNSLOTH_STAGES``) has a defined fallback: go on without vLLM, or stop in the first
minutes with one line naming the stage and the change (``StageFailure``). When training begins, a first-minutes
block (``backends.format_first_minutes``) says which GPU, precision, backend and rollout generator run and why,
and after step 2 the seconds a step and the projected hours against a Colab session.

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
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import data
import metrics
import rewards
import runtime
from backends import (
    FirstMinutesReport,
    compare_arguments,
    effective_arguments,
    first_minutes_fields,
    first_step_failure,
    grpo_arguments,
    load_trl_model,
    resolve_backend,
    resolve_precision,
    start_unsloth,
    trainer_failure,
    vllm_may_run,
)
from config import (  # noqa: F401
    BACKENDS,
    CHECKPOINT_MARKER,
    LOG_WRITE_SECONDS,
    LORA_TARGETS,
    PRECISIONS,
    RESUME_MAY_CHANGE,
    ROLLOUTS,
    RUN_IDENTITY,
    SMOKE_STEPS,
    TrainConfig,
    TrainResult,
    smoke_config,
    smoke_overrides,
)
from rollouts import ROLLOUT_LABELS, check_rollout, resolve_rollout, startup_line, trainer_class

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

def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer's state saved in a checkpoint (``trainer_state.json``: step, max steps, log history)."""
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


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
        state = _trainer_state(folder)
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
    return runtime.write_json(folder / CHECKPOINT_MARKER, {"step": _checkpoint_step(folder), "files": files,
                                                           "written": time.strftime("%Y-%m-%d %H:%M:%S")})


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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_same_run(output_dir: Path, config: TrainConfig, saved: dict[str, Any]) -> None:
    """Every RUN_IDENTITY field must equal the saved run's: resuming with another value would mix two runs."""
    current = runtime.jsonable(dataclasses.asdict(config))
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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in data.iter_jsonl(path)] if path.is_file() else []


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    runtime.write_atomic(path, "".join(json.dumps(runtime.jsonable(row)) + "\n" for row in rows))


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
            runtime.write_json(output_dir / "log_history.json", state.log_history)
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
    state = _trainer_state(checkpoint)
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
    runtime.write_json(output_dir / "log_history.json", state["log_history"])
    runtime.write_json(adapter_dir / "run_config.json",
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
    now = runtime.jsonable(dataclasses.asdict(config))
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
        planned = _trainer_state(resume_from).get("max_steps")
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
    backend, reason = resolve_backend(config.backend, use_vllm=vllm_may_run(config))
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
        model, peft_config = load_trl_model(config, tokenizer, precision)
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
        runtime.write_json(output_dir / "run_config.json", run)
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
            runtime.write_json(adapter_dir / "run_config.json",  # written last: it marks the run finished
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
    return _trainer_state(checkpoint)["log_history"]


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
