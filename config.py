"""A training run's settings: ``TrainConfig`` (one field per Colab form field and CLI option), the smoke preset,
and the run identity (which settings may change when a run resumes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import data
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


