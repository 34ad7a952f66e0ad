"""GSM8K data study: token lengths of questions and solutions, and how they grow with the step count.

Definitions (they reproduce the study's published numbers exactly on the 7473 train questions):

- Tokens: the Qwen2.5 tokenizer on the raw text, no special tokens (``data.token_lengths``).
- Answer length: tokens of the whole ``answer`` field, ``#### N`` line included; this is
  ``data.add_length_columns``'s ``reference_length`` (mean 121.7933; the body before ``####`` alone would
  give 117.06). Question length: tokens of the question (``question_length``, mean 59.6473).
- Steps: ``data.count_steps``, solution lines before ``####`` with blank lines counted (1960 two-step
  questions; skipping blank lines gives 1961 and r = 0.7712 instead of 0.7711).
- Correlations: Pearson's r, ``sum(dx*dy) / sqrt(sum(dx^2) * sum(dy^2))`` with ``d = value - mean``.
- Per-step variance: the sample variance, ``sum((x - mean)^2) / (n - 1)`` (step 9: 9781.40; the population
  variance would give 9028.98).
- Trimmed max (97.5%): ``trimmed_max``: drop the ``k = floor(0.025 * n)`` longest answers (whole answers,
  never more than 2.5%), then take the max (step 2: n = 1960, k = 49 -> 112; step 9: n = 13, k = 0 -> 367).
  Other readings fail: ``k = ceil(0.025 n)`` gives 350 for step 9, ``numpy.percentile(.., 97.5)`` (linear)
  gives 361.9; ``k = round(0.025 n)`` also gives 112 and 367 but can drop more than 2.5% (steps 3, 5, 7
  then read 162, 255, 349 instead of 163, 258, 350).

The per-step table covers every step count present in the split; for train that is exactly 2..9.

Notebook: ``stats = analysis.run_analysis()``. CLI:
``python analysis.py --json OUT [--gsm8k-dir D] [--tokenizer T] [--plots DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import data
import runtime

TRIM_FRACTION = 0.025
DEFAULT_OUT_DIR = "outputs/data_analysis"
HISTOGRAM_FILES = {
    "reference_length": "answer_length_hist.png",
    "question_length": "question_length_hist.png",
}
_HISTOGRAM_LABELS = {"reference_length": "Answer (solution) tokens", "question_length": "Question tokens"}


def trimmed_max(values: Iterable[float], fraction: float = TRIM_FRACTION) -> float:
    """Largest value after dropping the ``k = floor(fraction * n)`` largest of the ``n`` values.

    Only whole values are dropped and never more than ``fraction`` of them, so a group of fewer than
    ``1 / fraction`` values (40 for 2.5%) keeps its plain max. Equals ``numpy.percentile(values,
    100 * (1 - fraction), method="higher")`` on the study's data.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("trimmed_max needs at least one value")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    # The small epsilon keeps e.g. 0.025 * 40 from landing just below 1 in floating point.
    dropped = math.floor(fraction * len(ordered) + 1e-9)
    return ordered[len(ordered) - 1 - dropped]


def token_length_table(tokenizer: Any = None, gsm8k_dir: str | os.PathLike | None = None,
                       split: str = "train") -> dict[str, list[int]]:
    """Per-question columns ``steps``, ``question_length`` and ``reference_length`` (answer tokens).

    Tokenizes once; ``statistics_from_table`` and ``plot_histograms`` both work from this table.
    """
    dataset = data.add_length_columns(data.load_gsm8k(split, gsm8k_dir), runtime.resolve_tokenizer(tokenizer))
    return {column: list(dataset[column]) for column in ("steps", "question_length", "reference_length")}


def _summary(values: Sequence[int]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def step_statistics(lengths: Sequence[int], fraction: float = TRIM_FRACTION) -> dict[str, float | None]:
    """One row of the per-step table: count, mean, min, max, sample variance and trimmed max of lengths."""
    return {
        "questions": len(lengths),
        "mean": statistics.fmean(lengths),
        "min": min(lengths),
        "max": max(lengths),
        # Sample variance (n - 1): the study's definition; a single-question group has none (JSON null).
        "variance": statistics.variance(lengths) if len(lengths) > 1 else None,
        "trimmed_max": trimmed_max(lengths, fraction),
    }


def statistics_from_table(table: dict[str, Sequence[int]]) -> dict[str, Any]:
    """The study's statistics (the JSON structure) from a ``token_length_table``; full precision floats."""
    answers, questions, steps = table["reference_length"], table["question_length"], table["steps"]
    if not answers or not len(answers) == len(questions) == len(steps):
        raise ValueError("the length table needs equally long, non-empty columns")
    by_step: dict[int, list[int]] = {}
    for count, length in zip(steps, answers, strict=True):
        by_step.setdefault(count, []).append(length)
    return {
        "answer_tokens": _summary(answers),
        "question_tokens": _summary(questions),
        "corr_question_answer": statistics.correlation(questions, answers),
        "corr_steps_answer": statistics.correlation(steps, answers),
        "steps": {str(count): step_statistics(by_step[count]) for count in sorted(by_step)},
    }


def compute_statistics(tokenizer: Any = None, gsm8k_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The study's statistics on the GSM8K train split (see the module docstring for the definitions)."""
    return statistics_from_table(token_length_table(tokenizer, gsm8k_dir))


def format_report(stats: dict[str, Any]) -> str:
    """The study's printed summary and per-step table, rounded as the study prints them."""
    lines = []
    for key, label in (("answer_tokens", "Answer tokens"), ("question_tokens", "Question tokens")):
        part = stats[key]
        lines.append(f"{label + ':':<17} mean {part['mean']:.4f}, min {part['min']}, max {part['max']}")
    lines.append(f"Pearson r (question length vs answer length): {stats['corr_question_answer']:.4f}")
    lines.append(f"Pearson r (step count vs answer length):      {stats['corr_steps_answer']:.4f}")
    lines.append("")
    header = ("Steps", "Questions", "Mean", "Min", "Max", "Variance", "Trimmed Max (97.5%)")
    rows = [
        (step, f"{row['questions']}", f"{row['mean']:.2f}", f"{row['min']}", f"{row['max']}",
         "-" if row["variance"] is None else f"{row['variance']:.2f}", f"{row['trimmed_max']}")
        for step, row in stats["steps"].items()
    ]
    widths = [max(len(cells[i]) for cells in (header, *rows)) for i in range(len(header))]
    for cells in (header, *rows):
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def plot_histograms(table: dict[str, Sequence[int]], out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
                    bins: int = 50) -> list[Path]:
    """Histograms of answer and question token lengths as PNG files; returns their paths."""
    # The object API needs no GUI backend, so this works the same headless, in a CLI and in Colab.
    from matplotlib.figure import Figure

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for column, filename in HISTOGRAM_FILES.items():
        values = table[column]
        figure = Figure(figsize=(7, 4), layout="constrained")
        axes = figure.subplots()
        axes.hist(values, bins=bins, color="tab:blue", edgecolor="white")
        mean = statistics.fmean(values)
        axes.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f}")
        axes.set_xlabel(f"{_HISTOGRAM_LABELS[column]} (Qwen2.5 tokenizer)")
        axes.set_ylabel("Questions")
        axes.set_title(f"GSM8K: {_HISTOGRAM_LABELS[column].lower()} (n = {len(values)} questions)")
        axes.legend()
        path = folder / filename
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules or runtime.in_colab()


def run_analysis(gsm8k_dir: str | os.PathLike | None = None, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = DEFAULT_OUT_DIR,
                 json_path: str | os.PathLike | None = None, show: bool | None = None) -> dict[str, Any]:
    """The whole study in one call: tokenize once, print the report, save histograms and the JSON.

    PNGs go to ``out_dir`` (None: no plots); the JSON to ``json_path``, by default
    ``out_dir/statistics.json``. ``show`` (default: when running in a notebook) displays the histograms.
    """
    table = token_length_table(tokenizer, gsm8k_dir)
    stats = statistics_from_table(table)
    print(format_report(stats))
    paths = [] if out_dir is None else plot_histograms(table, out_dir)
    if json_path is None and out_dir is not None:
        json_path = Path(out_dir) / "statistics.json"
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        print(f"\nStatistics written to {json_path}")
    if paths:
        print("Histograms written to " + ", ".join(str(path) for path in paths))
    if paths and (_in_notebook() if show is None else show):
        from IPython.display import Image, display

        for path in paths:
            display(Image(filename=str(path)))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GSM8K train-split length statistics (the data study).")
    parser.add_argument("--json", metavar="OUT", help="write the statistics as JSON to this file")
    parser.add_argument("--gsm8k-dir", metavar="D",
                        help="folder with train.jsonl (default: $GSM8K_DIR, shared/gsm8k, else the Hub)")
    parser.add_argument("--tokenizer", metavar="T",
                        help="Qwen tokenizer folder (default: $QWEN_TOKENIZER, shared/qwen-tokenizer, "
                             "else the Hub)")
    parser.add_argument("--plots", metavar="DIR", help="also write the histogram PNGs to this folder")
    args = parser.parse_args(argv)
    try:
        run_analysis(gsm8k_dir=args.gsm8k_dir, tokenizer=args.tokenizer, out_dir=args.plots,
                     json_path=args.json, show=False)
    except (FileNotFoundError, ValueError) as error:  # bad paths or data: a message, not a traceback
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
