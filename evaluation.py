r"""Evaluation on the 1319 GSM8K test questions, for every notebook and for training's final cells.

One call runs a model (optionally with a LoRA adapter) on the test split, scores each completion with the
scoring contract of ``rewards.py`` (so evaluation and reward never disagree), writes a per-question JSONL
file and a summary JSON beside the adapter, and returns the summary::

    summary = evaluation.evaluate(evaluation.EvalConfig(adapter="outputs/group/adapter"))
    evaluation.print_summary(summary)           # "Accuracy: 9.55% (126 of 1319)" ...
    evaluation.print_comparison(evaluation.compare_runs("outputs/baseline/eval", "outputs/group/eval"))

Metrics (``compute_metrics``), over the questions evaluated:

- accuracy: ``rewards.is_correct`` (the study's metric), with a Wilson 95% interval;
- format accuracy: ``rewards.is_format_ok``; lenient accuracy (diagnostic only): ``rewards.lenient_answer``,
  the last number anywhere in the completion, equals the gold number;
- response length in generated tokens, counting the stop token when one was produced (as TRL's
  ``completion_ids`` do for the length rewards): mean (normal 95% interval) and percentiles;
- out-of-limit rate: completions with :math:`\mathrm{limit} - \mathrm{length} \le 3` (they hit their token
  limit or ended within 3 tokens of it); the limit is the question's own, budgeted or not;
- accuracy and mean length per step-count bucket (``2`` ... ``7``, ``8+``);
- model efficiency: :math:`\sum_{i \in C} \mathrm{ref}_i \,/\, \sum_{i \in C} \mathrm{len}_i` over the set
  :math:`C` of correctly answered questions, with :math:`\mathrm{ref}_i` the token length of the reference
  solution (``data.add_length_columns``); None when nothing is correct.

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

Comparing two runs (``compare_runs``): paired by question index; accuracy difference with a paired bootstrap
95% interval, McNemar's exact test, mean length difference with a paired bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import data
import decoding
import rewards
import runtime

RESULTS_FILE = "eval_results.jsonl"
SUMMARY_FILE = "eval_summary.json"
BACKENDS = ("auto", "vllm", "unsloth", "hf", "hf-generate")
BUDGET_MODES = ("limit", "prompt", "both")
OUT_OF_LIMIT_MARGIN = rewards.OUT_OF_LIMIT_MARGIN
CONFIDENCE = 0.95
DEFAULT_N_BOOT = 10_000
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
# Step-count buckets: GSM8K test questions have 2 to 11 solution steps; 8 and more are few, so pooled.
STEP_BUCKET_CAP = 8


class AdapterError(ValueError):
    """A LoRA adapter that is missing, is not an adapter, or does not fit the base model."""


# ==================================================================================================
# Configuration
# ==================================================================================================

@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and how; every field has a default that reproduces the study's evaluation.

    ``model``: Hub id or local folder (or a ``.gguf`` file); ``runtime.TINY_MODEL`` means
    ``runtime.build_tiny_qwen2(tokenizer, seed=0)``. ``adapter``: None, a local folder, a Google Drive folder
    (``/content/drive/...`` or ``MyDrive/...``) or a Hub repo id. ``output_dir``: None → the adapter's folder
    (local or Drive), else ``outputs/eval-<name>``. ``limit``: evaluate the first N questions (a seeded random
    N with ``shuffle=True``). ``seed``: sampling (``temperature > 0``), subset shuffling and bootstrap.
    ``budget``: a ``budgets.KINDS`` name; ``budget_mode`` ``"limit"`` caps each question's new tokens at its
    budget, ``"prompt"`` adds "Use no more than N tokens." to the question, ``"both"`` does both.
    ``redo``: run again even when results with the same settings exist.
    """

    model: str = runtime.MODEL_ID
    adapter: str | None = None
    backend: str = "auto"
    max_new_tokens: int = 512
    temperature: float = 0.0
    batch_size: int | None = None
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    output_dir: str | None = None
    redo: bool = False
    gsm8k_dir: str | None = None
    tokenizer: str | None = None
    budget: str | None = None
    budget_mode: str = "limit"
    dtype: str | None = None
    load_in_4bit: bool = False
    gpu_memory_utilization: float = 0.6
    progress: bool = True
    # None: follow runtime.smoke_mode() (no GPU, or LENGTHRL_SMOKE=1); see smoke_config.
    smoke: bool | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.budget is not None:
            import budgets  # one spelling per kind: aliases must not make separate result files

            self.budget = budgets.budget_kind(self.budget)
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {list(BUDGET_MODES)}, got {self.budget_mode!r}")
        for name in ("max_new_tokens", "batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_new_tokens is None:
            raise ValueError("max_new_tokens must be a positive integer, got None")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be None, 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not self.model:
            raise ValueError("model must name a Hub id, a local folder or runtime.TINY_MODEL")


def result_paths(output_dir: str | os.PathLike, budget: str | None = None,
                 budget_mode: str = "limit") -> tuple[Path, Path]:
    """(per-question JSONL, summary JSON) in ``output_dir``; budgeted runs get their own names."""
    folder = Path(output_dir)
    if budget is None:
        return folder / RESULTS_FILE, folder / SUMMARY_FILE
    tag = f"budget-{_slug(budget)}-{budget_mode}"
    return folder / f"eval_results_{tag}.jsonl", folder / f"eval_summary_{tag}.json"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "run"


# ==================================================================================================
# Statistics
# ==================================================================================================

def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    r"""Wilson score interval for a proportion of ``k`` successes in ``n`` trials.

    .. math:: \frac{\hat p + \frac{z^2}{2n} \pm z\sqrt{\frac{\hat p(1-\hat p)}{n} + \frac{z^2}{4n^2}}}
              {1 + \frac{z^2}{n}}, \qquad \hat p = k/n

    with :math:`z` the normal quantile of ``(1 + confidence) / 2`` (1.96 for 95%).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer between 0 and n={n}, got {k!r}")
    z = _z(confidence)
    p = k / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At k = 0 (k = n) the bound is exactly 0 (1); say so instead of leaving a rounding residue.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    r"""Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (one run right, the other wrong).

    Under the null hypothesis each discordant pair goes either way with probability 1/2:

    .. math:: p = \min\Bigl(1,\ 2 \sum_{i=0}^{\min(b,c)} \binom{b+c}{i} 2^{-(b+c)}\Bigr)

    computed with exact integers; 1.0 when there is no discordant pair.
    """
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                     confidence: float = CONFIDENCE) -> dict[str, float]:
    r"""Paired bootstrap of the mean difference :math:`\bar b - \bar a` over paired observations.

    Each of ``n_boot`` resamples draws the n pairs with replacement (the same indices for ``a`` and ``b``);
    the interval is the percentile interval of the resampled differences. Returns ``estimate``, ``ci_low``,
    ``ci_high``, ``n`` and ``n_boot``.
    """
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"a and b must be paired 1-D sequences, got shapes {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    differences = y - x
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    n = differences.size
    chunk = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = differences[indices].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"estimate": float(differences.mean()), "ci_low": float(low), "ci_high": float(high),
            "n": int(n), "n_boot": int(n_boot)}


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    r"""(mean, low, high): normal interval :math:`\bar x \pm z\, s/\sqrt n` (sample standard deviation)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = _z(confidence) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# ==================================================================================================
# Scoring and metrics
# ==================================================================================================

def score_completion(text: str, gold: Any) -> dict[str, Any]:
    """The per-question scores of one completion, all from ``rewards.py``'s scoring contract."""
    return {
        "extracted": rewards.extract_answer(text),
        "correct": rewards.is_correct(text, gold),
        "format_ok": rewards.is_format_ok(text),
        "lenient": rewards.lenient_answer(text),
        "lenient_correct": rewards.is_lenient_correct(text, gold),
    }


def step_bucket(steps: int) -> str:
    """The step-count bucket label: the count itself, or ``"8+"`` from ``STEP_BUCKET_CAP`` on."""
    return f"{STEP_BUCKET_CAP}+" if steps >= STEP_BUCKET_CAP else str(int(steps))


def _proportion(k: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(k, n)
    return {"value": k / n, "count": k, "n": n, "ci_low": low, "ci_high": high, "ci_method": "wilson"}


def compute_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every metric of the module docstring from per-question records (as written to the JSONL file).

    Each record needs ``correct``, ``format_ok``, ``length``, ``steps``; ``lenient_correct``,
    ``out_of_limit`` (else computed from ``limit``) and ``reference_length`` are used when present.
    """
    import numpy as np

    if not records:
        raise ValueError("no records to compute metrics from")
    n = len(records)
    lengths = [int(r["length"]) for r in records]
    correct = [bool(r["correct"]) for r in records]
    out_of_limit = [bool(r["out_of_limit"]) if "out_of_limit" in r else rewards.is_out_of_limit(r["length"], r["limit"])
                    for r in records]
    mean, low, high = mean_interval(lengths)
    metrics: dict[str, Any] = {
        "n": n,
        "accuracy": _proportion(sum(correct), n),
        "format_accuracy": _proportion(sum(bool(r["format_ok"]) for r in records), n),
        "lenient_accuracy": _proportion(sum(bool(r.get("lenient_correct")) for r in records), n),
        "out_of_limit_rate": _proportion(sum(out_of_limit), n),
        "mean_length": {"value": mean, "ci_low": low, "ci_high": high, "ci_method": "normal"},
        "length_percentiles": {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(lengths, PERCENTILES))},
        "min_length": min(lengths),
        "max_length": max(lengths),
        "generated_tokens": sum(lengths),
    }
    metrics["length_percentiles"]["max"] = float(max(lengths))
    right = [r for r, ok in zip(records, correct) if ok]
    metrics["model_efficiency"] = None
    if right and all(r.get("reference_length") is not None for r in right):
        metrics["model_efficiency"] = rewards.model_efficiency(
            [r["reference_length"] for r in right], [r["length"] for r in right], [True] * len(right))
    buckets: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        buckets.setdefault(step_bucket(int(record["steps"])), []).append(record)
    metrics["by_steps"] = []
    for label in sorted(buckets, key=lambda s: int(s.rstrip("+"))):
        group = buckets[label]
        k = sum(bool(r["correct"]) for r in group)
        low_b, high_b = wilson_interval(k, len(group))
        metrics["by_steps"].append({
            "steps": label, "n": len(group), "correct": k, "accuracy": k / len(group),
            "ci_low": low_b, "ci_high": high_b,
            "mean_length": math.fsum(int(r["length"]) for r in group) / len(group),
        })
    return metrics


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_count(name: str, metric: Mapping[str, Any]) -> str:
    """``"Accuracy: 9.55% (126 of 1319)"``, the way the study prints counts."""
    return f"{name}: {_percent(metric['value'])} ({metric['count']} of {metric['n']})"


# ==================================================================================================
# Files
# ==================================================================================================

def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_records(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write per-question records as JSON lines."""
    lines = (json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
    return runtime.write_atomic(path, "".join(lines))


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-question records from a JSONL file, a summary JSON (its results file) or an output folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RESULTS_FILE
    elif path.suffix == ".json" and path.exists():
        summary = json.loads(path.read_text(encoding="utf-8"))
        results = summary.get("files", {}).get("results")
        if not results:
            raise ValueError(f"{path} is not an evaluation summary (it names no results file)")
        # The results file beside the summary first: a run folder copied from Drive keeps its old absolute path.
        beside = path.parent / Path(results).name
        path = beside if beside.exists() or not Path(results).is_absolute() else Path(results)
    if not path.exists():
        raise FileNotFoundError(f"no evaluation results at {str(path)!r}")
    return [record for _, record in data.iter_jsonl(path)]


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """An evaluation summary from its JSON file or from an output folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"no evaluation summary at {str(path)!r}")
    return json.loads(path.read_text(encoding="utf-8"))


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


def _drive_path(text: str) -> Path | None:
    """``/content/drive/...``, ``drive/...`` or ``MyDrive/...`` as a mounted Drive path (None otherwise)."""
    if Path(text).expanduser().exists():
        return None  # a local folder, even one named drive/ or MyDrive/
    for prefix, base in (("/content/drive/", "/content/drive"), ("drive/", "/content/drive"),
                         ("MyDrive/", "/content/drive/MyDrive")):
        if text.startswith(prefix):
            path = Path(base) / text[len(prefix):]
            if not (runtime.DRIVE_MOUNT / "MyDrive").exists():
                if not runtime.in_colab():
                    raise AdapterError(f"adapter {text!r} is a Google Drive path, but this is not Colab "
                                       "(copy the adapter folder locally and pass that path)")
                runtime.mount_drive()
            return path
    return None


def resolve_adapter(adapter: str | os.PathLike, base_model: str = runtime.MODEL_ID) -> tuple[Path, bool]:
    """(local folder of the adapter, whether it is the user's own folder rather than a Hub download).

    Accepts a local folder, a Google Drive folder (mounted on demand in Colab) or a Hub repo id. Raises
    ``AdapterError`` / ``FileNotFoundError`` naming the adapter and the base model it was expected to fit.
    """
    text = str(adapter)
    path = _drive_path(text) or Path(text).expanduser()
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


def _torch_dtype(config: EvalConfig):
    import torch

    if config.dtype is not None:
        return getattr(torch, config.dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[runtime.default_precision()]


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

    dtype = _torch_dtype(config)
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

def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


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
            raise ValueError("backend='vllm' loads its own model; pass no model (or use backend='hf')")
        if not has_vllm:
            raise ValueError("backend='vllm' needs the vllm package (pip install vllm)")
        if config.model == runtime.TINY_MODEL:
            raise ValueError("backend='vllm' cannot run runtime.TINY_MODEL; use backend='hf'")
    if config.backend == "unsloth" and model is not None and not _has_vllm_engine(model):
        raise ValueError("backend='unsloth' needs an Unsloth model loaded with fast_inference=True "
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
    return Path("outputs") / f"eval-{_slug(Path(str(name)).name)}"


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


SMOKE_QUESTIONS = 8
SMOKE_NEW_TOKENS = 32


def smoke_config(config: EvalConfig) -> EvalConfig:
    """``config`` for the CPU smoke mode: the tiny random Qwen2 (unless an adapter names its own base model, as a
    smoke training run's does), at most 8 questions and 32 new tokens. Idempotent."""
    return dataclasses.replace(
        config,
        model=runtime.TINY_MODEL if config.adapter is None else config.model,
        limit=min(config.limit or SMOKE_QUESTIONS, SMOKE_QUESTIONS),
        max_new_tokens=min(config.max_new_tokens, SMOKE_NEW_TOKENS),
        smoke=True,
    )


def resolve_config(config: EvalConfig | None) -> EvalConfig:
    """The configuration ``evaluate`` runs: the smoke configuration when asked or when ``runtime.smoke_mode()``."""
    config = config or EvalConfig()
    smoke = runtime.smoke_mode() if config.smoke is None else config.smoke
    if smoke and config.smoke is not True:
        print(f"Smoke mode: {SMOKE_QUESTIONS} questions, {SMOKE_NEW_TOKENS} new tokens"
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
    results_path, summary_path = result_paths(output_dir, config.budget, config.budget_mode)
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
                  **score_completion(text, row["gold"]), "length": len(ids), "limit": limit,
                  "finish": "stop" if ids and ids[-1] in eos_set else "length",
                  "out_of_limit": rewards.is_out_of_limit(len(ids), limit), "steps": row["steps"],
                  "reference_length": row["reference_length"]}
        if config.budget is not None:
            record["budget"] = budget
        records.append(record)
    metrics = compute_metrics(records)
    generated = metrics["generated_tokens"]
    summary = {
        "model": str(config.model), "adapter": config.adapter,
        "adapter_path": str(adapter_dir) if adapter_dir is not None else None,
        "model_passed_in": model_passed_in, "backend": backend, "backend_reason": reason,
        "generation_info": info,
        "metrics": metrics,
        "generation": {"decoding": "greedy" if config.temperature == 0 else "sampling",
                       "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                       "batch_size": info.get("batch_size", config.batch_size),
                       "dtype": _model_dtype(model) or config.dtype,
                       "budget": config.budget, "budget_mode": config.budget_mode if config.budget else None,
                       "stop_token_ids": eos, "system_prompt": data.SYSTEM_PROMPT,
                       "chat_template": "tokenizer's (data.render_prompt)"},
        "settings": settings, "limit": config.limit, "shuffle": config.shuffle, "seed": config.seed,
        "versions": runtime.library_versions(), "git_commit": _git_commit(), "device": _device_name(),
        "timing": {"wall_s": None, "generation_s": generation_s, "generated_tokens": generated,
                   "tokens_per_s": generated / generation_s if generation_s > 0 else None},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {"results": str(results_path), "summary": str(summary_path)},
    }
    save_records(records, results_path)
    summary["timing"]["wall_s"] = time.perf_counter() - started
    runtime.write_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    print(f"Wrote {results_path} and {summary_path.name}", flush=True)
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
        return (f"{format_count(name, metric)}, 95% CI {_percent(metric['ci_low'])} to "
                f"{_percent(metric['ci_high'])}")

    lines.append(with_ci("Accuracy", m["accuracy"]))
    lines.append(with_ci("Format accuracy", m["format_accuracy"]))
    lines.append(with_ci("Lenient accuracy (diagnostic: last number anywhere)", m["lenient_accuracy"]))
    length = m["mean_length"]
    lines.append(f"Mean response length: {length['value']:.1f} tokens, 95% CI {length['ci_low']:.1f} to "
                 f"{length['ci_high']:.1f}")
    percentiles = " · ".join(f"{k} {v:g}" for k, v in m["length_percentiles"].items())
    lines.append(f"Length percentiles: {percentiles}")
    lines.append(with_ci(f"Out-of-limit rate (within {OUT_OF_LIMIT_MARGIN} tokens of the limit)",
                         m["out_of_limit_rate"]))
    efficiency = m.get("model_efficiency")
    lines.append("Model efficiency: " + (f"{efficiency:.3f} (reference tokens / response tokens over the "
                                         f"{m['accuracy']['count']} correct answers)"
                                         if efficiency is not None else "n/a (no correct answer)"))
    lines.append(f"{'steps':>7} {'n':>6} {'accuracy':>18} {'mean length':>12}")
    for row in m["by_steps"]:
        accuracy = f"{_percent(row['accuracy'])} ({row['correct']})"
        lines.append(f"{row['steps']:>7} {row['n']:>6} {accuracy:>18} {row['mean_length']:>12.1f}")
    timing = summary.get("timing") or {}
    if timing.get("generation_s"):
        rate = timing.get("tokens_per_s") or 0
        lines.append(f"Generated {timing['generated_tokens']:,} tokens in {timing['generation_s']:.1f} s "
                     f"({rate:,.0f} tokens/s); total {timing.get('wall_s') or 0:.1f} s")
    files = summary.get("files") or {}
    if files.get("results"):
        lines.append(f"Per-question results: {files['results']}")
    print("\n".join(lines), file=out, flush=True)


def _records(source: Any) -> list[dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        return load_records(source)
    return [dict(r) for r in source]


def compare_runs(records_or_path_a: Any, records_or_path_b: Any, seed: int = 0, n_boot: int = DEFAULT_N_BOOT,
                 labels: tuple[str, str] = ("A", "B"), confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Compare two runs question by question (paired by ``index``); differences are B − A.

    Reports both accuracies, the accuracy difference with a paired bootstrap interval, McNemar's exact test
    on the discordant questions (``a_only``: A right and B wrong; ``b_only``: the reverse), and the mean
    length difference with a paired bootstrap interval. Questions present in one run only are left out and
    counted.
    """
    a = {int(r["index"]): r for r in _records(records_or_path_a)}
    b = {int(r["index"]): r for r in _records(records_or_path_b)}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two runs share no question index: nothing to compare")
    correct_a = [float(bool(a[i]["correct"])) for i in common]
    correct_b = [float(bool(b[i]["correct"])) for i in common]
    length_a = [float(a[i]["length"]) for i in common]
    length_b = [float(b[i]["length"]) for i in common]
    a_only = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    b_only = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = len(common)
    return {
        "labels": list(labels), "n": n, "only_in_a": len(set(a) - set(b)), "only_in_b": len(set(b) - set(a)),
        "accuracy_a": sum(correct_a) / n, "accuracy_b": sum(correct_b) / n,
        "correct_a": int(sum(correct_a)), "correct_b": int(sum(correct_b)),
        "accuracy_diff": paired_bootstrap(correct_a, correct_b, n_boot=n_boot, seed=seed, confidence=confidence),
        "mcnemar": {"a_only": a_only, "b_only": b_only, "p_value": mcnemar_exact(a_only, b_only)},
        "mean_length_a": sum(length_a) / n, "mean_length_b": sum(length_b) / n,
        "length_diff": paired_bootstrap(length_a, length_b, n_boot=n_boot, seed=seed + 1, confidence=confidence),
        "confidence": confidence,
    }


def print_comparison(result: Mapping[str, Any], file: Any = None) -> None:
    """Print ``compare_runs``'s result."""
    out = file or sys.stdout
    name_a, name_b = result["labels"]
    accuracy, length, test = result["accuracy_diff"], result["length_diff"], result["mcnemar"]
    level = f"{100 * result.get('confidence', CONFIDENCE):g}%"
    lines = [f"{name_b} vs {name_a} on {result['n']} paired questions"]
    if result["only_in_a"] or result["only_in_b"]:
        lines[0] += f" ({result['only_in_a']} only in {name_a}, {result['only_in_b']} only in {name_b}, left out)"
    lines.append(f"Accuracy: {name_a} {_percent(result['accuracy_a'])} ({result['correct_a']} of {result['n']}), "
                 f"{name_b} {_percent(result['accuracy_b'])} ({result['correct_b']} of {result['n']}); "
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
            results.name.replace(RESULTS_FILE.split(".")[0], "length_histogram").replace(".jsonl", ".png"))
        records = results

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    if isinstance(records, Mapping):
        runs = {label: _records(value) for label, value in records.items()}
        largest = max((max(int(r["length"]) for r in run) for run in runs.values() if run), default=1)
        edges = [largest * i / bins for i in range(bins + 1)]
        for label, run in runs.items():
            mean = sum(int(r["length"]) for r in run) / max(1, len(run))
            axes.hist([int(r["length"]) for r in run], bins=edges, histtype="step", linewidth=1.5,
                      label=f"{label} (mean {mean:.0f})")
        limits = [int(r.get("limit", 0)) for run in runs.values() for r in run]
    else:
        run = _records(records)
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
