r"""Evaluation on the 1319 GSM8K test questions, for every notebook, for training's final cells and the CLI.

One call runs a model (optionally with a LoRA adapter) on the test split, scores each completion with the
scoring contract of ``rewards.py`` (so evaluation and reward never disagree), writes a per-question JSONL
file and a summary JSON beside the adapter, and returns the summary; ``evaluate_run`` does the same for a
training run's adapter (its settings read from the run's ``run_config.json``) and pairs it with the baseline::

    summary = evaluation.evaluate(evaluation.EvalConfig(adapter="outputs/group/adapter"))
    evaluation.print_summary(summary)           # "Accuracy: 9.55% (126 of 1319)" ...
    summary = evaluation.evaluate_run("outputs/Group_method")  # + "baseline_comparison" when the baseline is there

    python evaluation.py --adapter outputs/Group_method [--limit 100] [--backend hf] [--budget steps]

The metrics, their intervals and the paired comparison are ``metrics.py``'s (``metrics.compute_metrics``,
``metrics.compare_runs``); this module generates, records and prints.

Generation uses the training prompt (``data.prompt_messages`` + ``data.render_prompt``), greedy decoding by
default, at most 512 new tokens. Backends:

- ``"vllm"``: ``vllm.LLM`` with a ``LoRARequest`` (where vLLM is installed);
- ``"unsloth"``: an Unsloth model's ``fast_generate`` (vLLM inside) with its LoRA request (Colab);
- ``"hf"``: the project's Hugging Face decoder (``decoding.generate_token_ids``): a fixed-shape KV cache, one
  slot per sequence, finished slots refilled at once with the next prompts (continuous batching), the
  decode step replayed as a CUDA graph on GPUs; models it cannot drive fall back to ``"hf-generate"``;
- ``"hf-generate"``: batched ``model.generate`` (prompts sorted by length, left padding, stop at EOS);
- ``"auto"``: an Unsloth model passed in → ``"unsloth"``; any other model passed in → ``"hf"``; otherwise
  ``"vllm"`` when installed with a GPU, else ``"hf"``. The choice and its reason are printed and saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import data
import decoding
import metrics
import rewards
import runtime

BACKENDS = ("auto", "vllm", "unsloth", "hf", "hf-generate")
BUDGET_MODES = ("limit", "prompt", "both")


class AdapterError(runtime.ConfigError):
    """A LoRA adapter that is missing, is not an adapter, or does not fit the base model."""


# ==================================================================================================
# Configuration
# ==================================================================================================

@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and how; every field has a default that reproduces the study's evaluation. The fields'
    help texts are also the command line's (``python evaluation.py --help``)."""

    model: str = field(default=runtime.MODEL_ID, metadata={
        "help": f"Hub id, local folder or .gguf file of the base model; {runtime.TINY_MODEL!r} = tiny random Qwen2"})
    adapter: str | None = field(default=None, metadata={
        "help": "LoRA adapter: a local or Google Drive folder (/content/drive/..., MyDrive/...) or a Hub repo id"})
    backend: str = field(default="auto", metadata={"help": f"one of {BACKENDS}"})
    max_new_tokens: int = field(default=512, metadata={"help": "token limit of each answer"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; else sampling temperature"})
    batch_size: int | None = field(default=None, metadata={"help": "sequences at a time (default: what fits)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N test questions only"})
    shuffle: bool = field(default=False, metadata={"help": "with limit: a seeded random N questions instead"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, the shuffled subset and the bootstrap"})
    output_dir: str | None = field(default=None, metadata={
        "help": "results folder (default: the adapter's folder, else outputs/eval-<model>)"})
    redo: bool = field(default=False, metadata={"help": "run again even when results with these settings exist"})
    gsm8k_dir: str | None = field(default=None, metadata={"help": "local GSM8K folder (default: found or Hub)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder (default: the adapter's, else found by runtime.py)"})
    budget: str | None = field(default=None, metadata={
        "help": "per-question length budget, one of budgets.KINDS ('steps', 'reference', 'question')"})
    budget_mode: str = field(default="limit", metadata={
        "help": f"one of {BUDGET_MODES}: the budget as token limit, stated in the prompt, or both"})
    dtype: str | None = field(default=None, metadata={
        "help": "bfloat16, float16 or float32 (default: bf16 where supported, fp16 on other GPUs, fp32 on CPU)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit weights (Unsloth backend)"})
    gpu_memory_utilization: float = field(default=0.6, metadata={"help": "GPU share for vLLM"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    smoke: bool | None = field(default=None, metadata={
        "help": "CPU smoke preset (8 questions, 32 new tokens); default: when runtime.smoke_mode() (no GPU)"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise runtime.ConfigError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.budget is not None:
            import budgets  # one spelling per kind: aliases must not make separate result files

            self.budget = budgets.budget_kind(self.budget)
        if self.budget_mode not in BUDGET_MODES:
            raise runtime.ConfigError(f"budget_mode must be one of {list(BUDGET_MODES)}, got {self.budget_mode!r}")
        for name in ("max_new_tokens", "batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise runtime.ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_new_tokens is None:
            raise runtime.ConfigError("max_new_tokens must be a positive integer, got None")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise runtime.ConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise runtime.ConfigError(f"dtype must be None, 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise runtime.ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not self.model:
            raise runtime.ConfigError("model must name a Hub id, a local folder or runtime.TINY_MODEL")


# ==================================================================================================
# Generation: vLLM and Unsloth
# ==================================================================================================

def _sampling_params(limits: list[int], eos: list[int], temperature: float, seed: int) -> list[Any]:
    from vllm import SamplingParams

    return [SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                           max_tokens=m, stop_token_ids=list(eos), seed=seed + i if temperature > 0 else None,
                           detokenize=False)
            for i, m in enumerate(limits)]


def _vllm_outputs(outputs: Sequence[Any], eos: list[int], limits: list[int]) -> list[list[int]]:
    return [decoding.trim(list(o.outputs[0].token_ids), eos, m) for o, m in zip(outputs, limits)]


def _lora_rank(adapter_dir: Path | None) -> int:
    if adapter_dir is None:
        return 16
    rank = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))
    return next(size for size in (8, 16, 32, 64, 128, 256, 512) if size >= rank)


def _generate_vllm(config: EvalConfig, prompts: list[list[int]], limits: list[int], eos: list[int],
                   adapter_dir: Path | None, info: dict[str, Any]) -> list[list[int]]:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    total = max(len(p) + m for p, m in zip(prompts, limits))
    # The precision every path takes from the GPU (runtime.default_precision): fp16 on a T4, where vLLM refuses bf16.
    dtype = config.dtype or {"bf16": "bfloat16", "fp16": "float16"}.get(runtime.default_precision(), "auto")
    llm = LLM(model=config.model, dtype=dtype, seed=config.seed,
              enable_lora=adapter_dir is not None, max_lora_rank=_lora_rank(adapter_dir),
              max_model_len=runtime.round_up(total, 64), gpu_memory_utilization=config.gpu_memory_utilization)
    request = LoRARequest("adapter", 1, str(adapter_dir)) if adapter_dir is not None else None
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           _sampling_params(limits, eos, config.temperature, config.seed),
                           lora_request=request, use_tqdm=config.progress)
    info.update({"method": "vllm.LLM"})
    return _vllm_outputs(outputs, eos, limits)


def _generate_unsloth(config: EvalConfig, model: Any, prompts: list[list[int]], limits: list[int],
                      eos: list[int], adapter_dir: Path | None, info: dict[str, Any]) -> list[list[int]]:
    """Unsloth's ``fast_generate`` (its vLLM engine). Its LoRA weights reach vLLM only through a LoRA request:
    the adapter folder, or (a trained PEFT model without one) the model's adapter saved to a temporary folder."""
    import tempfile

    temporary = None
    if adapter_dir is None and hasattr(model, "peft_config"):
        temporary = tempfile.TemporaryDirectory(prefix="eval-lora-")
        saver = getattr(model, "save_lora", None) or model.save_pretrained
        saver(temporary.name)
        adapter_dir = Path(temporary.name)
    try:
        request = None
        if adapter_dir is not None:
            loader = getattr(model, "load_lora", None)
            if loader is not None:
                request = loader(str(adapter_dir))
            else:
                from vllm.lora.request import LoRARequest

                request = LoRARequest("adapter", 1, str(adapter_dir))
        outputs = model.fast_generate([{"prompt_token_ids": p} for p in prompts],
                                      sampling_params=_sampling_params(limits, eos, config.temperature, config.seed),
                                      lora_request=request, use_tqdm=config.progress)
    finally:
        if temporary is not None:
            temporary.cleanup()
    info.update({"method": "unsloth.fast_generate"})
    return _vllm_outputs(outputs, eos, limits)


# ==================================================================================================
# Models, tokenizers and adapters
# ==================================================================================================

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _local_path(text: str) -> Path:
    """Where ``text`` is on this machine: its mounted Google Drive path (``runtime.drive_path``), else itself."""
    try:
        drive = runtime.drive_path(text)
    except runtime.ConfigError as error:
        raise AdapterError(f"adapter {error}") from None
    return drive or Path(text).expanduser()


def resolve_adapter(adapter: str | os.PathLike, base_model: str = runtime.MODEL_ID) -> tuple[Path, bool]:
    """(local folder of the adapter, whether it is the user's own folder rather than a Hub download).

    Accepts a local folder, a Google Drive folder (mounted on demand in Colab) or a Hub repo id. Raises
    ``AdapterError`` / ``FileNotFoundError`` naming the adapter and the base model it was expected to fit.
    """
    text = str(adapter)
    path = _local_path(text)
    local = True
    if not path.exists():
        if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(repo_id=text))
                local = False
            except Exception as error:  # offline, unknown repo, no access: all say the same
                raise AdapterError(
                    f"LoRA adapter {text!r} (for base model {base_model!r}) is neither a local folder nor a "
                    f"Hub repo that could be downloaded: {type(error).__name__}: {error}") from None
        else:
            raise FileNotFoundError(f"LoRA adapter folder {text!r} does not exist "
                                    f"(expected an adapter for base model {base_model!r})")
    if not path.is_dir() or not (path / "adapter_config.json").exists():
        checkpoints = sorted(p.name for p in path.glob("checkpoint-*")) if path.is_dir() else []
        hint = f"; it holds {', '.join(checkpoints[-3:])} (pass one of those)" if checkpoints else ""
        raise AdapterError(f"{str(path)!r} has no adapter_config.json: not a LoRA adapter folder "
                           f"(expected an adapter for base model {base_model!r}){hint}")
    return path, local


def _normalise_model_name(name: str | None) -> str:
    name = (name or "").rstrip("/").split("/")[-1].lower()
    for suffix in ("-unsloth-bnb-4bit", "-bnb-4bit", "-unsloth"):
        name = name.removesuffix(suffix)
    return name


def attach_adapter(model: Any, adapter_dir: str | os.PathLike, base_model: str = runtime.MODEL_ID,
                   merge: bool = True) -> Any:
    """``model`` with the LoRA adapter of ``adapter_dir`` loaded (merged into the weights when ``merge``).

    An adapter that does not fit (other architecture or size, missing weights) raises ``AdapterError``
    naming the folder and ``base_model``; an adapter saved for a differently named base model is a warning.
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    expected = f"LoRA adapter {str(adapter_dir)!r} does not fit base model {base_model!r}"
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as error:
        raise AdapterError(f"{expected}: its adapter_config.json cannot be read ({error})") from None
    trained_on = getattr(peft_config, "base_model_name_or_path", None)
    if trained_on and base_model != runtime.TINY_MODEL and \
            _normalise_model_name(trained_on) != _normalise_model_name(base_model):
        warnings.warn(f"adapter {str(adapter_dir)!r} was saved for base model {trained_on!r}, evaluating it on "
                      f"{base_model!r}", stacklevel=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except Exception as error:  # size mismatch, missing target modules, ...
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = " ".join(lines[:2])[:400] if lines else type(error).__name__
            trained = f"the adapter says it was trained on {trained_on!r}" if trained_on else \
                "the adapter does not name its base model"
            raise AdapterError(f"{expected} ({trained}): {detail}") from None
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise AdapterError(f"{expected}: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return peft_model.merge_and_unload() if merge else peft_model


def load_tokenizer(config: EvalConfig, adapter_dir: Path | None = None) -> Any:
    """The tokenizer for ``config``: ``config.tokenizer``, else the adapter's own (saved by training, so
    its chat template is the one trained with), else the GGUF file's, else ``runtime.load_tokenizer``."""
    if config.tokenizer is not None:
        return runtime.load_tokenizer(config.tokenizer, model_name=config.model)
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").exists():
        return runtime.load_tokenizer(adapter_dir, model_name=config.model)
    if str(config.model).endswith(".gguf"):
        from transformers import AutoTokenizer

        path = Path(config.model).expanduser()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    local = Path(str(config.model)).expanduser()
    if local.is_dir() and (local / "tokenizer_config.json").exists():
        return runtime.load_tokenizer(local, model_name=config.model)
    return runtime.load_tokenizer(model_name=config.model)


def load_model(config: EvalConfig, tokenizer: Any, adapter_dir: Path | None = None) -> Any:
    """The transformers model of ``config`` on the GPU when there is one, adapter merged, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = runtime.torch_dtype(config.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.model == runtime.TINY_MODEL:
        model = runtime.build_tiny_qwen2(tokenizer, seed=0)
    elif str(config.model).endswith(".gguf"):
        path = Path(config.model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, config.model)
    return model.eval()


# ==================================================================================================
# Evaluate
# ==================================================================================================

def _model_dtype(model: Any) -> str | None:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return None


def _model_eos_ids(config: EvalConfig, tokenizer: Any) -> list[int]:
    """Stop tokens for a model not loaded here (vLLM): its generation_config.json's and the tokenizer's."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(config.model)
    except Exception:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    holder = type("Holder", (), {"generation_config": generation_config})()
    return decoding.eos_ids(holder, tokenizer)


def _pick_backend(config: EvalConfig, model: Any) -> tuple[str, str]:
    """(backend, reason) for ``config.backend == "auto"``; explicit choices are checked here too."""
    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if config.backend == "auto":
        if model is not None and _has_vllm_engine(model):
            return "unsloth", "the model passed in is an Unsloth model with a vLLM engine"
        if model is not None:
            return "hf", "a transformers model was passed in"
        if config.model == runtime.TINY_MODEL or str(config.model).endswith(".gguf"):
            return "hf", "vLLM cannot load this model"
        if has_vllm and torch.cuda.is_available():
            return "vllm", "vLLM is installed and a GPU is present"
        return "hf", "vLLM is not installed" if not has_vllm else "no GPU for vLLM"
    if config.backend == "vllm":
        if model is not None:
            raise runtime.ConfigError("backend='vllm' loads its own model; pass no model (or use backend='hf')")
        if not has_vllm:
            raise runtime.ConfigError("backend='vllm' needs the vllm package (pip install vllm)")
        if config.model == runtime.TINY_MODEL:
            raise runtime.ConfigError("backend='vllm' cannot run runtime.TINY_MODEL; use backend='hf'")
    if config.backend == "unsloth" and model is not None and not _has_vllm_engine(model):
        raise runtime.ConfigError("backend='unsloth' needs an Unsloth model loaded with fast_inference=True "
                                  "(it has no vLLM engine); use backend='hf'")
    return config.backend, "requested"


def _has_vllm_engine(model: Any) -> bool:
    """An Unsloth model loaded with ``fast_inference=True``. Without it Unsloth still gives the model a
    ``fast_generate``, one that refuses vLLM's arguments (unsloth 2026.10.9 models/llama.py: ``fast_generate =
    make_fast_generate_wrapper(model.generate)``), so that attribute proves nothing."""
    return getattr(model, "vllm_engine", None) is not None


def _load_unsloth(config: EvalConfig, adapter_dir: Path | None, total: int) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # type: ignore[import-not-found]

    return FastLanguageModel.from_pretrained(
        model_name=config.model, max_seq_length=runtime.round_up(total, 64), load_in_4bit=config.load_in_4bit,
        fast_inference=True, max_lora_rank=_lora_rank(adapter_dir),
        gpu_memory_utilization=config.gpu_memory_utilization,
        use_exact_model_name=True)  # the base the adapter was trained on, not Unsloth's copy of it


def _generate_fast(backend: str, config: EvalConfig, model: Any, prompts: list[list[int]], limits: list[int],
                   tokenizer: Any, adapter_dir: Path | None, info: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """(completions, stop tokens) from vLLM (``backend="vllm"``) or Unsloth's vLLM engine (``"unsloth"``; the
    model is loaded here when none was passed in)."""
    info["t4_vllm_environment"] = runtime.t4_vllm_environment()  # before vllm or unsloth is imported
    if backend == "vllm":
        eos = _model_eos_ids(config, tokenizer)
        return _generate_vllm(config, prompts, limits, eos, adapter_dir, info), eos
    if model is None:
        model, _ = _load_unsloth(config, adapter_dir, max(len(p) + m for p, m in zip(prompts, limits)))
    eos = decoding.eos_ids(model, tokenizer)
    return _generate_unsloth(config, model, prompts, limits, eos, adapter_dir, info), eos


def _default_output_dir(config: EvalConfig, adapter_dir: Path | None, adapter_is_local: bool) -> Path:
    if config.output_dir is not None:
        return Path(config.output_dir).expanduser()
    if adapter_dir is not None and adapter_is_local:
        return adapter_dir
    name = config.adapter if config.adapter is not None else config.model
    return Path("outputs") / f"eval-{metrics.slug(Path(str(name)).name)}"


def _settings(config: EvalConfig, adapter_dir: Path | None, adapter_is_local: bool, n_test: int) -> dict[str, Any]:
    """What determines the results (not how fast they were made): results are reused only when equal.

    A model passed to ``evaluate`` is identified by ``config.model`` and ``config.adapter`` like one loaded
    from them, so the evaluation made at the end of training is reused by a later one of the saved adapter.
    """
    if config.adapter is None or adapter_dir is None:
        adapter = None
    else:
        # The weights' fingerprint, not the path: results travel with their adapter (e.g. Drive → local), and
        # two runs' folders both called "adapter" are still told apart.
        adapter = _adapter_fingerprint(adapter_dir) or (adapter_dir.name if adapter_is_local else str(config.adapter))
    return {
        "model": str(config.model), "adapter": adapter,
        "max_new_tokens": config.max_new_tokens, "temperature": float(config.temperature),
        "limit": config.limit, "shuffle": config.shuffle,
        "seed": config.seed if (config.shuffle or config.temperature > 0) else None,
        "budget": config.budget, "budget_mode": config.budget_mode if config.budget else None,
        "system_prompt": data.SYSTEM_PROMPT, "test_questions": n_test,
    }


def _adapter_fingerprint(adapter_dir: Path) -> str | None:
    """``sha256:<16 hex>`` of the adapter's weights file; None when there is none."""
    import hashlib

    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.exists():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return f"sha256:{digest.hexdigest()[:16]}"
    return None


def _select(n_test: int, config: EvalConfig) -> list[int]:
    indices = list(range(n_test))
    if config.shuffle:
        random.Random(config.seed).shuffle(indices)
    if config.limit is not None:
        indices = sorted(indices[:config.limit])
    return indices


def _budgets(config: EvalConfig, dataset: Any, tokenizer: Any) -> list[int]:
    import budgets  # a colleague's module; imported only when a budget is asked for

    values = budgets.compute_budgets(config.budget, dataset, tokenizer, gsm8k_dir=config.gsm8k_dir)
    if len(values) != len(dataset):
        raise ValueError(f"budgets.compute_budgets returned {len(values)} budgets for {len(dataset)} questions")
    return [max(1, int(v)) for v in values]


def smoke_config(config: EvalConfig) -> EvalConfig:
    """``config`` for the CPU smoke mode: the tiny random Qwen2 (unless an adapter names its own base model, as a
    smoke training run's does), at most ``runtime.SMOKE_QUESTIONS`` questions and ``runtime.SMOKE_NEW_TOKENS``
    new tokens. Idempotent."""
    return dataclasses.replace(
        config,
        model=runtime.TINY_MODEL if config.adapter is None else config.model,
        limit=min(config.limit or runtime.SMOKE_QUESTIONS, runtime.SMOKE_QUESTIONS),
        max_new_tokens=min(config.max_new_tokens, runtime.SMOKE_NEW_TOKENS),
        smoke=True,
    )


def resolve_config(config: EvalConfig | None) -> EvalConfig:
    """The configuration ``evaluate`` runs: the smoke configuration when asked or when ``runtime.smoke_mode()``."""
    config = config or EvalConfig()
    smoke = runtime.wants_smoke(config.smoke)
    if smoke and config.smoke is not True:
        print(f"Smoke mode: {runtime.SMOKE_QUESTIONS} questions, {runtime.SMOKE_NEW_TOKENS} new tokens"
              + (", tiny random Qwen2" if config.adapter is None else ""), flush=True)
    return smoke_config(config) if smoke else config


def evaluate(config: EvalConfig | None = None, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Evaluate on the GSM8K test split; write ``eval_results.jsonl`` and ``eval_summary.json``; return the
    summary (see ``print_summary``).

    With ``model`` (e.g. right after training: a transformers/PEFT model, or an Unsloth model with
    ``fast_generate``), that model is evaluated as it is; ``config.adapter`` then only names where its adapter
    lives (output folder; Unsloth's LoRA request). Without a model and without a GPU (or with
    ``LENGTHRL_SMOKE=1``) the smoke preset runs (``resolve_config``). Results already on disk with the same settings are
    returned without generating again, unless ``config.redo``.
    """
    started = time.perf_counter()
    # A model passed in is evaluated as configured by its caller; otherwise no GPU means the smoke preset.
    config = resolve_config(config) if model is None else (config or EvalConfig())
    adapter_dir, adapter_is_local = (None, False)
    if config.adapter is not None:
        adapter_dir, adapter_is_local = resolve_adapter(config.adapter, config.model)
    full = data.load_gsm8k("test", config.gsm8k_dir)
    settings = _settings(config, adapter_dir, adapter_is_local, len(full))
    model_passed_in = model is not None
    output_dir = _default_output_dir(config, adapter_dir, adapter_is_local)
    results_path, summary_path = metrics.result_paths(output_dir, config.budget, config.budget_mode)
    if not config.redo and results_path.exists() and summary_path.exists():
        existing = json.loads(summary_path.read_text(encoding="utf-8"))
        if existing.get("settings") == settings:
            print(f"Found results with the same settings in {summary_path} (EvalConfig(redo=True) runs again)",
                  flush=True)
            return existing
        changed = sorted(k for k in set(settings) | set(existing.get("settings", {}))
                         if settings.get(k) != existing.get("settings", {}).get(k))
        print(f"Results in {summary_path} were made with other settings ({', '.join(changed)}); running again",
              flush=True)

    if tokenizer is None:
        tokenizer = load_tokenizer(config, adapter_dir)
    indices = _select(len(full), config)
    # Length columns for the evaluated questions only (a smoke run tokenizes 8, not 1319); budgets.py computes
    # what it needs for the whole split itself.
    subset = data.add_length_columns(full.select(indices), tokenizer)
    budgets_all = _budgets(config, full, tokenizer) if config.budget else None
    question_budgets = [budgets_all[i] for i in indices] if budgets_all else [None] * len(indices)
    limit_mode = config.budget is not None and config.budget_mode in ("limit", "both")
    prompt_mode = config.budget is not None and config.budget_mode in ("prompt", "both")
    limits = [min(b, config.max_new_tokens) if limit_mode else config.max_new_tokens for b in question_budgets]
    texts = [data.render_prompt(tokenizer, data.prompt_messages(q, budget=b if prompt_mode else None))
             for q, b in zip(subset["question"], question_budgets)]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]

    backend, reason = _pick_backend(config, model)
    print(f"Backend: {backend} ({reason}); {len(indices)} questions, "
          f"{'greedy' if config.temperature == 0 else f'temperature {config.temperature}'}, "
          f"at most {config.max_new_tokens} new tokens", flush=True)
    info: dict[str, Any] = {}
    generation_started = time.perf_counter()
    completions = None
    if backend in ("vllm", "unsloth"):
        try:
            completions, eos = _generate_fast(backend, config, model, prompts, limits, tokenizer, adapter_dir, info)
        except Exception as error:  # vLLM's engine start or generation: the hf backend gives the same results
            reason = f"{backend} failed ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]})"
            print(f"Backend: hf ({reason})", flush=True)
            info = {"fallback_from": backend, "fallback_error": f"{type(error).__name__}: {error}"[:2000]}
            backend = "hf"
    if completions is None:
        if model is None:
            model = load_model(config, tokenizer, adapter_dir)
        eos = decoding.eos_ids(model, tokenizer)
        decode = decoding.DecodeSettings(
            method="generate" if backend == "hf-generate" else "auto", temperature=config.temperature,
            seed=config.seed, batch_size=config.batch_size, eos_token_ids=tuple(eos),
            pad_token_id=tokenizer.pad_token_id, progress=config.progress, desc="GSM8K test")
        completions = decoding.generate_token_ids(model, prompts, limits, decode, info=info)
    generation_s = time.perf_counter() - generation_started

    decoded = tokenizer.batch_decode(completions, skip_special_tokens=True)
    eos_set = set(eos)
    records = []
    for row, index, ids, text, limit, budget in zip(subset, indices, completions, decoded, limits,
                                                    question_budgets):
        record = {"index": index, "question": row["question"], "gold": row["gold"], "completion": text,
                  **metrics.score_completion(text, row["gold"]), "length": len(ids), "limit": limit,
                  "finish": "stop" if ids and ids[-1] in eos_set else "length",
                  "out_of_limit": rewards.is_out_of_limit(len(ids), limit), "steps": row["steps"],
                  "reference_length": row["reference_length"]}
        if config.budget is not None:
            record["budget"] = budget
        records.append(record)
    scores = metrics.compute_metrics(records)
    generated = scores["generated_tokens"]
    summary = {
        "model": str(config.model), "adapter": config.adapter,
        "adapter_path": str(adapter_dir) if adapter_dir is not None else None,
        "model_passed_in": model_passed_in, "backend": backend, "backend_reason": reason,
        "generation_info": info,
        "metrics": scores,
        "generation": {"decoding": "greedy" if config.temperature == 0 else "sampling",
                       "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                       "batch_size": info.get("batch_size", config.batch_size),
                       "dtype": _model_dtype(model) or config.dtype,
                       "budget": config.budget, "budget_mode": config.budget_mode if config.budget else None,
                       "stop_token_ids": eos, "system_prompt": data.SYSTEM_PROMPT,
                       "chat_template": "tokenizer's (data.render_prompt)"},
        "settings": settings, "limit": config.limit, "shuffle": config.shuffle, "seed": config.seed,
        "versions": runtime.library_versions(), "git_commit": runtime.git_commit(), "device": runtime.device_name(),
        "timing": {"wall_s": None, "generation_s": generation_s, "generated_tokens": generated,
                   "tokens_per_s": generated / generation_s if generation_s > 0 else None},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {"results": str(results_path), "summary": str(summary_path)},
    }
    metrics.save_records(records, results_path)
    summary["timing"]["wall_s"] = time.perf_counter() - started
    metrics.save_summary(summary, summary_path)
    print(f"Wrote {results_path} and {summary_path.name}", flush=True)
    return summary


def _saved_run_config(adapter_dir: Path) -> dict[str, Any]:
    """The training configuration saved beside an adapter (``run_config.json``'s ``config``); {} without one."""
    path = adapter_dir / "run_config.json"
    return json.loads(path.read_text(encoding="utf-8")).get("config", {}) if path.is_file() else {}


def evaluate_run(run: str | os.PathLike | None = None, method: str | None = None, save_to_drive: bool = False,
                 model: Any = None, tokenizer: Any = None, compare: bool = True, **settings: Any) -> dict[str, Any]:
    """Evaluate the adapter a training run saved (the Eval notebooks, the end of training, the CLI), print the
    summary, then compare it with the baseline run.

    ``run``: a run folder (one holding ``adapter/``; results go to its ``eval/``), an adapter folder (local or
    Google Drive; results beside it) or a Hub repo id. None: the run folder of ``method``
    (``runtime.run_dir(method, save_to_drive, smoke)``, the smoke folder in smoke mode). The base model, tokenizer,
    GSM8K folder and token limit come from the adapter's ``run_config.json`` when there is one; ``settings`` are
    further ``EvalConfig`` fields (``limit``, ``backend``, ``redo``, ``budget``, ...; None leaves a field as the run
    has it). ``model``/``tokenizer``: the trained model still in memory, evaluated as it is (``evaluate``).

    With ``compare``, for a run folder of a method other than the baseline, when the baseline run beside it
    (``runtime.run_folder("baseline")``) has results under the same budget, the paired comparison is printed and
    returned under ``"baseline_comparison"``.
    """
    smoke = runtime.smoke_mode()
    if run is None:
        if method is None:
            raise runtime.ConfigError("evaluate_run needs a run folder, an adapter or a method")
        run_dir: Path | None = runtime.run_dir(method, save_to_drive, smoke)
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no trained adapter in {run_dir / 'adapter'}: run the {run_dir.name} training "
                                    "notebook first, or give the adapter's folder or Hub repo id")
    else:
        path = _local_path(str(run))
        run_dir = path if (path / "adapter" / "adapter_config.json").is_file() else None
    adapter_dir = run_dir / "adapter" if run_dir is not None else _local_path(str(run))
    saved = _saved_run_config(adapter_dir)
    method = method or saved.get("method")
    values: dict[str, Any] = {
        "model": saved.get("model", runtime.TINY_MODEL if smoke else runtime.MODEL_ID),
        "adapter": str(adapter_dir) if run_dir is not None else str(run),
        "output_dir": str(run_dir / "eval") if run_dir is not None else None,
        # A smoke run is evaluated on the smoke number of questions, also when its model is passed in.
        "limit": runtime.SMOKE_QUESTIONS if saved.get("smoke") else None,
    }
    for name, key in (("max_new_tokens", "max_completion_length"), ("gsm8k_dir", "gsm8k_dir"),
                      ("tokenizer", "tokenizer")):
        if saved.get(key) is not None:
            values[name] = saved[key]
    values.update({name: value for name, value in settings.items() if value is not None})
    config = EvalConfig(**values)
    summary = evaluate(config, model=model, tokenizer=tokenizer if model is not None else None)
    print_summary(summary)
    if compare and run_dir is not None and method not in (None, "baseline"):
        baseline_dir = run_dir.parent / runtime.run_folder("baseline", smoke=bool(saved.get("smoke", smoke)))
        baseline_results = metrics.result_paths(baseline_dir / "eval", config.budget, config.budget_mode)[0]
        if baseline_results.is_file():
            comparison = metrics.compare_runs(baseline_results, summary["files"]["results"],
                                              labels=("baseline", method))
            print_comparison(comparison)
            summary = {**summary, "baseline_comparison": comparison, "baseline_results": str(baseline_results)}
    return summary


# ==================================================================================================
# Reporting
# ==================================================================================================

def print_summary(summary: Mapping[str, Any], file: Any = None) -> None:
    """Print a summary the way the study reports results ("Accuracy: 9.55% (126 of 1319)" ...)."""
    out = file or sys.stdout
    m = summary["metrics"]
    generation = summary.get("generation", {})
    what = str(summary.get("model"))
    if summary.get("adapter"):
        what += f" + adapter {summary['adapter']}"
    decoding = generation.get("decoding", "greedy")
    if decoding != "greedy":
        decoding = f"temperature {generation.get('temperature')}"
    budget = f", budget {generation['budget']} ({generation['budget_mode']})" if generation.get("budget") else ""
    lines = [f"GSM8K test: {what} (backend {summary.get('backend')}, {decoding}, "
             f"at most {generation.get('max_new_tokens')} new tokens{budget})"]

    def with_ci(name: str, metric: Mapping[str, Any]) -> str:
        return (f"{metrics.format_count(name, metric)}, 95% CI {metrics.format_percent(metric['ci_low'])} to "
                f"{metrics.format_percent(metric['ci_high'])}")

    lines.append(with_ci("Accuracy", m["accuracy"]))
    lines.append(with_ci("Format accuracy", m["format_accuracy"]))
    lines.append(with_ci("Lenient accuracy (diagnostic: last number anywhere)", m["lenient_accuracy"]))
    length = m["mean_length"]
    lines.append(f"Mean response length: {length['value']:.1f} tokens, 95% CI {length['ci_low']:.1f} to "
                 f"{length['ci_high']:.1f}")
    percentiles = " · ".join(f"{k} {v:g}" for k, v in m["length_percentiles"].items())
    lines.append(f"Length percentiles: {percentiles}")
    lines.append(with_ci(f"Out-of-limit rate (within {metrics.OUT_OF_LIMIT_MARGIN} tokens of the limit)",
                         m["out_of_limit_rate"]))
    efficiency = m.get("model_efficiency")
    lines.append("Model efficiency: " + (f"{efficiency:.3f} (reference tokens / response tokens over the "
                                         f"{m['accuracy']['count']} correct answers)"
                                         if efficiency is not None else "n/a (no correct answer)"))
    # In a notebook the per-step buckets follow as a rendered table; elsewhere as text, here.
    as_table = file is None and runtime.in_notebook()
    if not as_table:
        lines.append(f"{'steps':>7} {'n':>6} {'accuracy':>18} {'95% CI':>16} {'mean length':>12}")
        for cells in _step_bucket_cells(m["by_steps"]):
            lines.append(f"{cells['steps']:>7} {cells['n']:>6} {cells['accuracy']:>18} {cells['95% CI']:>16} "
                         f"{cells['mean length']:>12}")
    timing = summary.get("timing") or {}
    if timing.get("generation_s"):
        rate = timing.get("tokens_per_s") or 0
        lines.append(f"Generated {timing['generated_tokens']:,} tokens in {timing['generation_s']:.1f} s "
                     f"({rate:,.0f} tokens/s); total {timing.get('wall_s') or 0:.1f} s")
    files = summary.get("files") or {}
    if files.get("results"):
        lines.append(f"Per-question results: {files['results']}")
    print("\n".join(lines), file=out, flush=True)
    if as_table:
        runtime.show(step_bucket_frame(summary))


def _step_bucket_cells(by_steps: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    # One formatting for the text table and the notebook table.
    return [{"steps": str(row["steps"]), "n": str(row["n"]),
             "accuracy": f"{metrics.format_percent(row['accuracy'])} ({row['correct']})",
             "95% CI": f"{metrics.format_percent(row['ci_low'])}–{metrics.format_percent(row['ci_high'])}",
             "mean length": f"{row['mean_length']:.1f}"} for row in by_steps]


def step_bucket_frame(summary: Mapping[str, Any]) -> Any:
    """The per-step buckets of an ``evaluate`` summary as a pandas DataFrame for notebooks: one row per
    step-count bucket, with questions, accuracy (correct count), its 95% Wilson interval and mean length."""
    import pandas as pd

    return pd.DataFrame(_step_bucket_cells(summary["metrics"]["by_steps"])).set_index("steps")


def print_comparison(result: Mapping[str, Any], file: Any = None) -> None:
    """Print ``compare_runs``'s result."""
    out = file or sys.stdout
    name_a, name_b = result["labels"]
    accuracy, length, test = result["accuracy_diff"], result["length_diff"], result["mcnemar"]
    level = f"{100 * result.get('confidence', metrics.CONFIDENCE):g}%"
    percent = metrics.format_percent
    lines = [f"{name_b} vs {name_a} on {result['n']} paired questions"]
    if result["only_in_a"] or result["only_in_b"]:
        lines[0] += f" ({result['only_in_a']} only in {name_a}, {result['only_in_b']} only in {name_b}, left out)"
    lines.append(f"Accuracy: {name_a} {percent(result['accuracy_a'])} ({result['correct_a']} of {result['n']}), "
                 f"{name_b} {percent(result['accuracy_b'])} ({result['correct_b']} of {result['n']}); "
                 f"difference {100 * accuracy['estimate']:+.2f} points, {level} CI "
                 f"{100 * accuracy['ci_low']:+.2f} to {100 * accuracy['ci_high']:+.2f} (paired bootstrap)")
    lines.append(f"McNemar exact test: {test['a_only']} right only in {name_a}, {test['b_only']} right only in "
                 f"{name_b}; p = {test['p_value']:.4g}")
    lines.append(f"Mean length: {name_a} {result['mean_length_a']:.1f}, {name_b} {result['mean_length_b']:.1f} "
                 f"tokens; difference {length['estimate']:+.1f}, {level} CI {length['ci_low']:+.1f} to "
                 f"{length['ci_high']:+.1f}")
    print("\n".join(lines), file=out, flush=True)


def plot_length_histogram(records: Any, path: str | os.PathLike | None = None, title: str | None = None,
                          bins: int = 40) -> Any:
    """Histogram of response lengths, correct and incorrect stacked, with the token limit marked.

    ``records``: a run's records or results path, an ``evaluate`` summary (the PNG is then saved beside its
    results as ``length_histogram.png`` unless ``path`` says otherwise), or a mapping ``{label: records or path}``
    to overlay several runs. Returns the matplotlib ``Figure`` (displayed by notebooks); saves a PNG when ``path``.
    """
    from matplotlib.figure import Figure

    if isinstance(records, Mapping) and "files" in records:  # an evaluate() summary
        results = Path(records["files"]["results"])
        path = path if path is not None else results.with_name(
            results.name.replace(metrics.RESULTS_FILE.split(".")[0], "length_histogram").replace(".jsonl", ".png"))
        records = results

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    if isinstance(records, Mapping):
        runs = {label: metrics.run_records(value) for label, value in records.items()}
        largest = max((max(int(r["length"]) for r in run) for run in runs.values() if run), default=1)
        edges = [largest * i / bins for i in range(bins + 1)]
        for label, run in runs.items():
            mean = sum(int(r["length"]) for r in run) / max(1, len(run))
            axes.hist([int(r["length"]) for r in run], bins=edges, histtype="step", linewidth=1.5,
                      label=f"{label} (mean {mean:.0f})")
        limits = [int(r.get("limit", 0)) for run in runs.values() for r in run]
    else:
        run = metrics.run_records(records)
        if not run:
            raise ValueError("no records to plot")
        right = [int(r["length"]) for r in run if r["correct"]]
        wrong = [int(r["length"]) for r in run if not r["correct"]]
        axes.hist([right, wrong], bins=bins, stacked=True, color=["tab:green", "tab:gray"],
                  label=[f"correct ({len(right)})", f"incorrect ({len(wrong)})"])
        limits = [int(r.get("limit", 0)) for r in run]
    if limits and max(limits) > 0 and len(set(limits)) == 1:
        axes.axvline(limits[0], color="tab:red", linestyle="--", linewidth=1, label=f"limit ({limits[0]})")
    axes.set_xlabel("response length (tokens)")
    axes.set_ylabel("questions")
    axes.set_title(title or "Response lengths on GSM8K test")
    axes.legend()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def plot_against_baseline(summary: Mapping[str, Any], path: str | os.PathLike | None = None) -> Any:
    """Response lengths of this run overlaid on the baseline's, or None when there is no baseline to compare.

    ``summary``: what ``evaluate_run`` returns; it names the baseline's results file
    (``baseline_results``) and the two labels (``baseline_comparison``) when the baseline's results exist. The PNG
    is saved beside this run's results as ``length_vs_baseline.png`` unless ``path`` says otherwise.
    """
    baseline = summary.get("baseline_results")
    if not baseline:
        return None
    results = Path(summary["files"]["results"])
    baseline_label, label = summary["baseline_comparison"]["labels"]
    return plot_length_histogram({baseline_label: baseline, label: results},
                                 path if path is not None else results.with_name("length_vs_baseline.png"),
                                 title=f"Response lengths on GSM8K test: {label} vs {baseline_label}")
# ==================================================================================================
# Command line
# ==================================================================================================

def build_parser() -> argparse.ArgumentParser:
    """The CLI: one option per ``EvalConfig`` field (same names, dashes), as training.py's."""
    parser = argparse.ArgumentParser(
        prog="evaluation.py",
        description="Evaluate a model, or a training run's LoRA adapter, on the GSM8K test split.",
        epilog="--adapter also takes a training run's folder (RUN_DIR, holding adapter/): the model, tokenizer and "
               "token limit then come from its run_config.json, results go to RUN_DIR/eval, and the run is compared "
               "with the baseline run beside it. Without a GPU the CPU smoke preset runs.")
    runtime.add_dataclass_options(parser, EvalConfig, defaults=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python evaluation.py [--adapter PATH|RUN_DIR] [options]``: evaluate, print the summary (and the comparison)."""
    namespace = build_parser().parse_args(argv)
    settings = runtime.dataclass_values(EvalConfig, namespace)
    with runtime.one_line_errors(namespace.debug, prog="evaluation.py"):
        if settings.get("adapter") is not None:
            return evaluate_run(settings.pop("adapter"), **settings)
        summary = evaluate(EvalConfig(**settings))
        print_summary(summary)
        return summary


if __name__ == "__main__":
    main()
