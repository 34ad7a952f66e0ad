r"""Statistics, scoring and metrics of evaluation and training, the result files they are read from, and the
paired comparison of two runs. Pure functions (numpy at most): ``evaluation``, ``training`` and ``results`` all
compute their numbers here, so a number means the same everywhere.

Per-question metrics (``compute_metrics``), over the questions evaluated:

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

Per-step training metrics (``batch_metrics``) use the same definitions over one GRPO step's completions, plus the
question-vs-response and reference-vs-response length correlations (Pearson's r) and ``whole_group_fraction``.

Comparing two runs (``compare_runs``): paired by question index; accuracy difference with a paired bootstrap
95% interval, McNemar's exact test, mean length difference with a paired bootstrap interval.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import data
import rewards
import runtime

RESULTS_FILE = "eval_results.jsonl"
SUMMARY_FILE = "eval_summary.json"
OUT_OF_LIMIT_MARGIN = rewards.OUT_OF_LIMIT_MARGIN
CONFIDENCE = 0.95
DEFAULT_N_BOOT = 10_000
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
# Step-count buckets: GSM8K test questions have 2 to 11 solution steps; 8 and more are few, so pooled.
STEP_BUCKET_CAP = 8


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


def format_percent(value: float | None) -> str:
    """``0.0955`` -> ``"9.55%"``, the way the study prints fractions; ``"-"`` for an unknown value."""
    return "-" if value is None else f"{100 * value:.2f}%"


def format_count(name: str, metric: Mapping[str, Any]) -> str:
    """``"Accuracy: 9.55% (126 of 1319)"``, the way the study prints counts."""
    return f"{name}: {format_percent(metric['value'])} ({metric['count']} of {metric['n']})"


# ==================================================================================================
# Training: the metrics of one GRPO step
# ==================================================================================================

def correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r of two equally long sequences (``statistics.correlation``); None when undefined (fewer than
    2 points, or one sequence without spread)."""
    if len(xs) != len(ys):
        raise ValueError(f"correlation needs sequences of equal length, got {len(xs)} and {len(ys)}")
    try:
        r = statistics.correlation([float(x) for x in xs], [float(y) for y in ys])
    except statistics.StatisticsError:
        return None
    return max(-1.0, min(1.0, r))


def out_of_limit(lengths: Sequence[int], limit: int, margin: int = OUT_OF_LIMIT_MARGIN) -> float:
    """Fraction of completions that reached the token limit or ended within ``margin`` tokens of it."""
    if not lengths:
        raise ValueError("out_of_limit needs at least one completion")
    return sum(1 for n in lengths if rewards.is_out_of_limit(n, limit, margin)) / len(lengths)


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
        # What method 1 minimises, in tokens: unlike its reward (scaled within each group) it is comparable
        # across steps, so it shows whether lengths approach the reference solutions'.
        "mean_reference_deviation": sum(abs(o - g) for o, g in zip(lengths, reference_lengths)) / n,
        "out_of_limit": out_of_limit(lengths, limit),
        "model_efficiency": rewards.model_efficiency(reference_lengths, lengths, correct),
        "question_vs_response_length_correlation": correlation(question_lengths, lengths),
        "answer_vs_response_length_correlation": correlation(reference_lengths, lengths),
    }
    return {name: float(value) for name, value in metrics.items() if value is not None}


def whole_group_fraction(records: Sequence[Mapping[str, Any]], num_generations: int) -> float:
    """Fraction of (process, question) groups holding exactly ``num_generations`` completions (1.0 = all whole)."""
    counts: dict[tuple[Any, Any], int] = {}
    for record in records:
        key = (record.get("process", 0), record["group"])
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise ValueError("whole_group_fraction needs at least one completion")
    return sum(1 for count in counts.values() if count == num_generations) / len(counts)


# ==================================================================================================
# Result files (written by evaluation.evaluate, read by results.py)
# ==================================================================================================

def result_paths(output_dir: str | os.PathLike, budget: str | None = None,
                 budget_mode: str = "limit") -> tuple[Path, Path]:
    """(per-question JSONL, summary JSON) in ``output_dir``; budgeted runs get their own names."""
    folder = Path(output_dir)
    if budget is None:
        return folder / RESULTS_FILE, folder / SUMMARY_FILE
    tag = f"budget-{slug(budget)}-{budget_mode}"
    return folder / f"eval_results_{tag}.jsonl", folder / f"eval_summary_{tag}.json"


def slug(text: str) -> str:
    """``text`` reduced to characters safe in a file name (runs of others become ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "run"


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


def save_summary(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write an evaluation summary as indented JSON (atomically: an interrupted run leaves no half file)."""
    return runtime.write_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """An evaluation summary from its JSON file or from an output folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"no evaluation summary at {str(path)!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def run_records(source: Any) -> list[dict[str, Any]]:
    """A run's per-question records: as given (any iterable of mappings), or loaded from a path (``load_records``)."""
    if isinstance(source, (str, os.PathLike)):
        return load_records(source)
    return [dict(r) for r in source]


# ==================================================================================================
# Comparing two runs
# ==================================================================================================

def compare_runs(records_or_path_a: Any, records_or_path_b: Any, seed: int = 0, n_boot: int = DEFAULT_N_BOOT,
                 labels: tuple[str, str] = ("A", "B"), confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Compare two runs question by question (paired by ``index``); differences are B − A.

    Reports both accuracies, the accuracy difference with a paired bootstrap interval, McNemar's exact test
    on the discordant questions (``a_only``: A right and B wrong; ``b_only``: the reverse), and the mean
    length difference with a paired bootstrap interval. Questions present in one run only are left out and
    counted.
    """
    a = {int(r["index"]): r for r in run_records(records_or_path_a)}
    b = {int(r["index"]): r for r in run_records(records_or_path_b)}
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
