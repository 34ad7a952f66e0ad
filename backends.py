"""Backends: TRL + PEFT or Unsloth, the GRPOConfig arguments both train with, and the Colab path's start-up stages
with a defined fallback at each (``UNSLOTH_STAGES``), the effective trainer arguments and the first-minutes report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runtime
from config import BACKENDS, LORA_TARGETS, TrainConfig
from rollouts import vllm_problem

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
        return "import", f"Unsloth did not import ({type(error).__name__}: {runtime.first_line(error)})"
    import trl

    if "Unsloth" not in trl.GRPOTrainer.__name__:
        try:
            from unsloth import PatchFastRL

            PatchFastRL("GRPO", FastLanguageModel)
        except Exception as error:
            return "patch", f"Unsloth could not patch TRL ({type(error).__name__}: {runtime.first_line(error)})"
        if "Unsloth" not in trl.GRPOTrainer.__name__:
            return "patch", "Unsloth imported but did not patch TRL's GRPOTrainer"
    return None


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


def load_trl_model(config: TrainConfig, tokenizer, precision: str):
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
    return f"{type(error).__name__}: {runtime.first_line(error)}"


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


def vllm_may_run(config: TrainConfig) -> bool:
    """Whether vLLM could generate this run's rollouts (installed, a CUDA GPU, a real model, a rollout setting
    that allows it): decides Unsloth's standby mode, which must be set before unsloth is imported."""
    return config.rollout in ("auto", "vllm") and vllm_problem(config) is None


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
    return (f"Unsloth's vLLM failed at stage '{stage}' ({why}): going on with Unsloth without fast inference, "
            "generating with Unsloth's own generate (rollout 'generate')")


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
    return runtime.jsonable(trainer.args.to_dict())


def compare_arguments(first: dict[str, Any], second: dict[str, Any],
                      ignore: Sequence[str] = RUN_SPECIFIC_ARGUMENTS) -> dict[str, Any]:
    """How two sets of trainer arguments differ, compared as JSON values: ``different`` maps each argument both
    have with different values to ``[first, second]``; ``only_first``/``only_second`` list the arguments one
    side lacks (e.g. Unsloth's own fields). ``ignore``: arguments expected to differ (paths, names)."""
    first, second = runtime.jsonable(first), runtime.jsonable(second)
    shared = sorted((set(first) & set(second)) - set(ignore))
    return {"different": {name: [first[name], second[name]] for name in shared if first[name] != second[name]},
            "only_first": sorted(set(first) - set(second) - set(ignore)),
            "only_second": sorted(set(second) - set(first) - set(ignore))}


def stack_versions() -> dict[str, str]:
    """The installed versions of ``runtime.library_versions``, absent libraries left out."""
    return {name: version for name, version in runtime.library_versions().items() if version}


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
            runtime.write_json(self.record_path, record)
        run = _wandb_run()
        if run is not None:
            run.config.update({"first_minutes": runtime.jsonable(self.fields)}, allow_val_change=True)
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



