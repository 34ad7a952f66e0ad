"""Stand-in for unsloth 2026.10.9, which cannot run here (no GPU): the calls training.py makes, Unsloth's rewrites of
the GRPO arguments as the pinned source applies them, and a failure at exactly one stage of the start-up.

Tests put ``tests/standins`` on ``sys.path`` and choose the failing stage with ``$STANDIN_UNSLOTH_FAIL``:
``import``, ``patch``, ``load``, ``engine``, ``generate``, ``trainer`` or ``first_step`` (empty: nothing fails);
``load`` fails loading with fast inference only, ``load_any`` every load.
The model is the tiny random Qwen2 (``runtime.build_tiny_qwen2``), or a local model folder; ``fast_inference``
attaches a stand-in vLLM engine. ``CALLS`` records the keyword arguments of every ``from_pretrained`` call.

The rewrite rules below are copied in substance (not in code) from the pinned source, each citing its file and
function; only the rules that apply to TRL 0.22.2's GRPOConfig and to this project's calls are kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAIL = os.environ.get("STANDIN_UNSLOTH_FAIL", "")
if FAIL == "import":
    raise ImportError("stand-in: Unsloth cannot find a supported GPU")

import torch  # noqa: E402
import trl  # noqa: E402
import trl.trainer.grpo_config  # noqa: E402
import trl.trainer.grpo_trainer  # noqa: E402

import runtime  # noqa: E402

__version__ = "2026.10.9"
CALLS: list[dict[str, Any]] = []
_TRL_CONFIG = trl.GRPOConfig
_TRL_TRAINER = trl.GRPOTrainer

# --------------------------------------------------------------------------------------------------
# Rewrite rules
# --------------------------------------------------------------------------------------------------

# unsloth/models/rl.py, _patch_trl_rl_trainers_impl: ``replacements`` rewrite the defaults in the signature of the
# generated config's __init__ (a regex over TRL's own signature, so only fields TRL 0.22.2's GRPOConfig has:
# padding_free, max_seq_length and vllm_importance_sampling_correction are not among them). An argument passed
# explicitly keeps its value. transformers < 5: warmup_ratio (>= 5: warmup_steps).
CONFIG_DEFAULTS: dict[str, Any] = {
    "output_dir": None, "logging_nan_inf_filter": False, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2, "weight_decay": 0.001, "seed": 3407, "optim": "adamw_8bit",
    "learning_rate": 5e-05, "per_device_eval_batch_size": 4, "eval_accumulation_steps": 2,
    "torch_empty_cache_steps": 250, "logging_steps": 1, "num_generations": 8, "vllm_mode": "colocate",
    "generation_kwargs": {}, "bf16": False, "fp16": False, "report_to": "none", "include_tokens_per_second": False,
    "include_num_input_tokens_seen": False, "auto_find_batch_size": False, "dataloader_pin_memory": True,
    "warmup_ratio": 0.1,
    # The same function, ``if trainer_file == "grpo_trainer"``: None means "unset", resolved below.
    "loss_type": None, "beta": None, "mask_truncated_completions": None,
}
# Fields the generated config adds to TRL's (rl.py: the RLConfig template's own fields, and max_seq_length_pre's
# context parallel fields for grpo_trainer), with their defaults.
UNSLOTH_FIELDS: dict[str, Any] = {
    "vllm_sampling_params": None, "unsloth_num_chunks": -1, "unsloth_logit_chunk_multiplier": None,
    "unsloth_grpo_mini_batch": None, "context_parallel_size": 1, "context_parallel_backend": "ulysses",
}


def config_arguments(passed: dict[str, Any]) -> dict[str, Any]:
    """The GRPOConfig keyword arguments after Unsloth's config rules (rl.py, _patch_trl_rl_trainers_impl)."""
    arguments = {**CONFIG_DEFAULTS, **passed}
    # "Resolve the None loss_type / beta sentinels": TRL >= 0.22 -> dapo; beta 0.0 for dapo / dr_grpo, else 0.001.
    default_loss = arguments["loss_type"] is None
    if default_loss:
        arguments["loss_type"] = "dapo"
    if arguments["beta"] is None:
        arguments["beta"] = 0.0 if str(arguments["loss_type"]).lower() in ("dapo", "dr_grpo") else 0.001
    # check_dr_grpo: an explicit dapo gets the paper's settings; an unset mask becomes False.
    if arguments["loss_type"] == "dapo" and not default_loss:
        if arguments["mask_truncated_completions"] is None:
            arguments["mask_truncated_completions"] = True
        if arguments.get("epsilon_high") is None:
            arguments["epsilon_high"] = 0.28
    if arguments["mask_truncated_completions"] is None:
        arguments["mask_truncated_completions"] = False
    # check_num_generations: without steps_per_generation/generation_batch_size the batch is resized to whole groups.
    if arguments.get("steps_per_generation") is None and arguments.get("generation_batch_size") is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        total = arguments["gradient_accumulation_steps"] * world * arguments["per_device_train_batch_size"]
        if total % arguments["num_generations"]:
            arguments["per_device_train_batch_size"] = arguments["num_generations"]
    if not 0 < arguments.get("temperature", 1.0) < 10:  # check_temperature
        raise ValueError("Unsloth: Please set a positive non-zero temperature less than 10")
    # rl_replacements.py, grpo_config_fix_vllm_top_k (RL_CONFIG_CHANGES["grpo_trainer"]).
    if arguments.get("use_vllm") and arguments.get("top_k") in (None, 0):
        arguments["top_k"] = -1
    return arguments


def trainer_rewrites(args: Any, model: Any) -> None:
    """Unsloth's trainer-side changes to ``args``, made in UnslothGRPOTrainer.__init__ before TRL's."""
    # rl.py, patch_functions: "vllm_setter", when the model carries a vLLM engine (TRL >= 0.18: colocate).
    if hasattr(model, "vllm_engine") and hasattr(args, "use_vllm"):
        args.use_vllm = True
        if getattr(args, "top_k", -1) in (None, 0):
            args.top_k = -1
        args.vllm_mode = "colocate"
    # rl.py, _patch_trl_rl_trainers_impl, "mixed_precision": training precision from the model's dtype.
    dtype = model.get_input_embeddings().weight.dtype
    float16, bfloat16 = dtype == torch.float16, dtype == torch.bfloat16
    use_bf16, use_fp16 = bool(args.bf16), bool(args.fp16)
    if float16 and use_bf16:
        raise TypeError("Unsloth: Model is in float16 precision but you want to use bfloat16 precision.")
    if bfloat16 and use_fp16:
        raise TypeError("Unsloth: Model is in bfloat16 precision but you want to use float16 precision.")
    user_float32 = bool(getattr(model, "_unsloth_user_float32", False))
    if not use_bf16 and not use_fp16 and not (dtype == torch.float32 and user_float32):
        bf16 = not float16 and runtime.supports_bf16()
        args.fp16, args.bf16 = not bf16, bf16
    # The same function, "eval_changes": evaluation follows the training precision unless one was set.
    if not args.bf16_full_eval and not args.fp16_full_eval:
        args.bf16_full_eval, args.fp16_full_eval = args.bf16, args.fp16
    # models/_gc_config_default.py, honour_gradient_checkpointing_off: a model without checkpointing turns the
    # config's default True off; a config that asked for it explicitly keeps it.
    if getattr(model, "_unsloth_gradient_checkpointing", None) is False and not getattr(args, "_explicit_gc", True):
        args.gradient_checkpointing = False


# --------------------------------------------------------------------------------------------------
# The patched TRL classes
# --------------------------------------------------------------------------------------------------

class UnslothGRPOConfig(_TRL_CONFIG):
    """TRL's GRPOConfig with Unsloth's defaults and fields (``config_arguments``)."""

    def __init__(self, **kwargs: Any):
        extra = {name: kwargs.pop(name, default) for name, default in UNSLOTH_FIELDS.items()}
        explicit_gc = "gradient_checkpointing" in kwargs
        super().__init__(**config_arguments(kwargs))
        for name, value in extra.items():
            setattr(self, name, value)
        self.__dict__["_explicit_gc"] = explicit_gc

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **{name: getattr(self, name) for name in UNSLOTH_FIELDS}}


class UnslothGRPOTrainer(_TRL_TRAINER):
    """TRL's GRPOTrainer after Unsloth's ``trainer_rewrites``; fails where ``$STANDIN_UNSLOTH_FAIL`` says."""

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: Any = None, **kwargs: Any):
        if FAIL == "trainer":
            raise RuntimeError("stand-in: UnslothGRPOTrainer could not compile its GRPO loss")
        trainer_rewrites(args, model)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any):
        if FAIL == "first_step" and self.state.global_step == 0:
            raise torch.OutOfMemoryError("stand-in: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a "
                                         "total capacity of 14.74 GiB of which 1.05 GiB is free.")
        return super().training_step(*args, **kwargs)


def _install() -> None:
    # rl.py, _patch_trl_rl_trainers_impl: trl, trl.trainer and the trainer/config modules all get the new classes.
    for module in (trl, trl.trainer, trl.trainer.grpo_trainer):
        module.GRPOTrainer = UnslothGRPOTrainer
    for module in (trl, trl.trainer, trl.trainer.grpo_config, trl.trainer.grpo_trainer):
        module.GRPOConfig = UnslothGRPOConfig


def PatchFastRL(algorithm: str | None = None, FastLanguageModel: Any = None) -> None:
    """rl.py, PatchFastRL -> patch_trl_rl_trainers: a failure is logged, not raised ("training will use trl's own
    trainer instead", _patch_trl_rl_trainers), so a failed patch leaves TRL as it was."""
    if FAIL == "patch":
        print("Unsloth: Could not build the patched trl.trainer.grpo_trainer (stand-in)")
        return
    _install()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

class _Completion:
    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids


class _RequestOutput:
    def __init__(self, token_ids: list[int]):
        self.outputs = [_Completion(token_ids)]


class StandInEngine:
    """Where Unsloth's vLLM engine would be (unsloth_zoo vllm_utils.load_vllm); generation returns vLLM-shaped
    outputs of fixed tokens, or fails at the ``generate`` stage."""

    def __init__(self, gpu_memory_utilization: float):
        self.gpu_memory_utilization = gpu_memory_utilization

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True, lora_request: Any = None):
        if FAIL == "generate":
            raise RuntimeError("stand-in: FlashInfer sampler failed in BatchPrefillWithPagedKVCache: invalid argument")
        return [_RequestOutput([16, 17]) for _ in (prompts if isinstance(prompts, list) else [prompts])]


def load_vllm(gpu_memory_utilization: float) -> StandInEngine:
    """unsloth_zoo vllm_utils.load_vllm: the engine start (the ``engine`` stage)."""
    if FAIL == "engine":
        raise RuntimeError("stand-in: vLLM engine core failed to start (_dummy_sampler_run)")
    return StandInEngine(gpu_memory_utilization)


def _mapped(model_name: str) -> str:
    # models/loader.py, FastLanguageModel.from_pretrained -> get_model_name: Hub ids move to Unsloth's copies.
    if Path(model_name).exists() or model_name == runtime.TINY_MODEL or "/" not in model_name:
        return model_name
    return "unsloth/" + model_name.split("/")[-1]


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str = "unsloth/Llama-3.2-1B-Instruct", max_seq_length: int = 2048,
                        dtype: Any = None, load_in_4bit: bool = True, fast_inference: bool = False,
                        max_lora_rank: int = 64, gpu_memory_utilization: float = 0.5,
                        use_exact_model_name: bool = False, on_model_resolved: Any = None, **kwargs: Any):
        CALLS.append({"model_name": model_name, "max_seq_length": max_seq_length, "dtype": dtype,
                      "load_in_4bit": load_in_4bit, "fast_inference": fast_inference,
                      "max_lora_rank": max_lora_rank, "gpu_memory_utilization": gpu_memory_utilization,
                      "use_exact_model_name": use_exact_model_name, **kwargs})
        resolved = model_name if use_exact_model_name else _mapped(model_name)
        if on_model_resolved is not None:
            on_model_resolved(resolved)
        if FAIL == "load_any" or (fast_inference and FAIL == "load"):
            raise OSError(f"stand-in: {resolved} has no model.safetensors")
        engine = load_vllm(gpu_memory_utilization) if fast_inference else None
        tokenizer = runtime.load_tokenizer()
        if Path(model_name).is_dir():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_name)
        else:
            model = runtime.build_tiny_qwen2(tokenizer)
        if dtype is not None:
            model = model.to(dtype)
            model._unsloth_user_float32 = dtype == torch.float32
        if engine is not None:
            model.vllm_engine = engine
            model.fast_generate = engine.generate
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: Any, r: int = 16, target_modules: Any = None, lora_alpha: int = 16,
                       lora_dropout: float = 0.0, use_gradient_checkpointing: Any = "unsloth",
                       random_state: int = 3407, **kwargs: Any):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(random_state)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                      target_modules=list(target_modules), task_type="CAUSAL_LM"))
        peft_model._unsloth_gradient_checkpointing = use_gradient_checkpointing
        return peft_model


# models/llama.py ends with PatchFastRL(FastLanguageModel = FastLlamaModel): ``import unsloth`` patches TRL.
PatchFastRL(FastLanguageModel=FastLanguageModel)
