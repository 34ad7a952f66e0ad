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
STEP_PLOT_FILE = "answer_length_by_steps.png"
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


STEP_TABLE_HEADER = ("Steps", "Questions", "Mean", "Min", "Max", "Variance", "Trimmed Max (97.5%)")


def format_summary(stats: dict[str, Any]) -> str:
    """The study's printed length summaries and correlations (the report without the per-step table)."""
    lines = []
    for key, label in (("answer_tokens", "Answer tokens"), ("question_tokens", "Question tokens")):
        part = stats[key]
        lines.append(f"{label + ':':<17} mean {part['mean']:.4f}, min {part['min']}, max {part['max']}")
    lines.append(f"Pearson r (question length vs answer length): {stats['corr_question_answer']:.4f}")
    lines.append(f"Pearson r (step count vs answer length):      {stats['corr_steps_answer']:.4f}")
    return "\n".join(lines)


def _step_rows(stats: dict[str, Any]) -> list[tuple[str, ...]]:
    # One rounding (the study's) for the text table and the notebook table.
    return [
        (step, f"{row['questions']}", f"{row['mean']:.2f}", f"{row['min']}", f"{row['max']}",
         "-" if row["variance"] is None else f"{row['variance']:.2f}", f"{row['trimmed_max']}")
        for step, row in stats["steps"].items()
    ]


def format_report(stats: dict[str, Any]) -> str:
    """The study's printed summary and per-step table, rounded as the study prints them."""
    lines = [format_summary(stats), ""]
    rows = _step_rows(stats)
    widths = [max(len(cells[i]) for cells in (STEP_TABLE_HEADER, *rows)) for i in range(len(STEP_TABLE_HEADER))]
    for cells in (STEP_TABLE_HEADER, *rows):
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def step_table_frame(stats: dict[str, Any]) -> Any:
    """The per-step table for notebooks: ``format_report``'s rows, rounded as the study prints them, as a pandas
    DataFrame indexed by step count."""
    import pandas as pd

    return pd.DataFrame(_step_rows(stats), columns=STEP_TABLE_HEADER).set_index("Steps")


def histogram_figures(table: dict[str, Sequence[int]], bins: int = 50) -> dict[str, Any]:
    """Histograms of answer and question token lengths, ``{file name: matplotlib Figure}``."""
    # The object API needs no GUI backend, so this works the same headless, in a CLI and in Colab.
    from matplotlib.figure import Figure

    figures = {}
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
        figures[filename] = figure
    return figures


def _save_figures(figures: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, figure in figures.items():
        figure.savefig(folder / filename, dpi=120)
        paths.append(folder / filename)
    return paths


def plot_histograms(table: dict[str, Sequence[int]], out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
                    bins: int = 50) -> list[Path]:
    """Histograms of answer and question token lengths as PNG files; returns their paths."""
    return _save_figures(histogram_figures(table, bins), out_dir)


def plot_length_by_steps(table: dict[str, Sequence[int]], path: str | os.PathLike | None = None,
                         fraction: float = TRIM_FRACTION) -> Any:
    """Answer length by step count: one box per step count (quartiles, whiskers at 1.5 IQR, outliers as dots)
    with its trimmed max (the step-aware budget) marked in red. Returns the Figure; saves a PNG when ``path``."""
    from matplotlib.figure import Figure

    by_step: dict[int, list[int]] = {}
    for count, length in zip(table["steps"], table["reference_length"], strict=True):
        by_step.setdefault(count, []).append(length)
    if not by_step:
        raise ValueError("the length table is empty: nothing to plot")
    steps = sorted(by_step)
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.boxplot([by_step[s] for s in steps], showmeans=True,
                 flierprops={"marker": ".", "markersize": 3, "alpha": 0.4},
                 meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"})
    positions = range(1, len(steps) + 1)
    axes.scatter(positions, [trimmed_max(by_step[s], fraction) for s in steps], marker="_", s=400,
                 linewidths=2, color="tab:red", zorder=3, label=f"trimmed max ({100 * (1 - fraction):g}%)")
    axes.set_xticks(list(positions), [f"{s}\n(n = {len(by_step[s])})" for s in steps])
    axes.set_xlabel("solution steps")
    axes.set_ylabel("answer tokens (Qwen2.5 tokenizer)")
    r = statistics.correlation(table["steps"], table["reference_length"]) if len(steps) > 1 else float("nan")
    axes.set_title(f"GSM8K: answer length by step count (Pearson r = {r:.2f})")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper left")
    if path is not None:
        _save_figures({Path(path).name: figure}, Path(path).parent)
    return figure


def run_analysis(gsm8k_dir: str | os.PathLike | None = None, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = DEFAULT_OUT_DIR,
                 json_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole study in one call: tokenize once, report, save the plots and the JSON.

    The report is text on the command line; in a notebook the per-step table renders as a table and the two
    histograms and the length-by-step-count plot show inline (``runtime.show``). PNGs go to ``out_dir`` (None:
    none are saved); the JSON to ``json_path``, by default ``out_dir/statistics.json``.
    """
    table = token_length_table(tokenizer, gsm8k_dir)
    stats = statistics_from_table(table)
    if runtime.in_notebook():
        print(format_summary(stats), flush=True)
        runtime.show(step_table_frame(stats))
    else:
        print(format_report(stats))
    figures = {}
    if out_dir is not None or runtime.in_notebook():
        figures = {**histogram_figures(table), STEP_PLOT_FILE: plot_length_by_steps(table)}
    paths = [] if out_dir is None else _save_figures(figures, out_dir)
    if json_path is None and out_dir is not None:
        json_path = Path(out_dir) / "statistics.json"
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        print(f"\nStatistics written to {json_path}")
    if paths:
        print("Plots written to " + ", ".join(str(path) for path in paths), flush=True)
    for figure in figures.values():
        runtime.show(figure)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GSM8K train-split length statistics (the data study).")
    parser.add_argument("--json", metavar="OUT", help="write the statistics as JSON to this file")
    parser.add_argument("--gsm8k-dir", metavar="D",
                        help="folder with train.jsonl (default: $GSM8K_DIR, shared/gsm8k, else the Hub)")
    parser.add_argument("--tokenizer", metavar="T",
                        help="Qwen tokenizer folder (default: $QWEN_TOKENIZER, shared/qwen-tokenizer, "
                             "else the Hub)")
    parser.add_argument("--plots", metavar="DIR",
                        help="also write the plots (histograms, length by step count) as PNGs to this folder")
    args = parser.parse_args(argv)
    try:
        run_analysis(gsm8k_dir=args.gsm8k_dir, tokenizer=args.tokenizer, out_dir=args.plots,
                     json_path=args.json)
    except (FileNotFoundError, ValueError) as error:  # bad paths or data: a message, not a traceback
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
