"""Results across runs: one comparison table, paired tests against the baseline, and the study's plots.

A run is one evaluation of one model on the GSM8K test split: the ``eval_summary*.json`` and
``eval_results*.jsonl`` files that ``evaluation.py`` writes (in ``<run>/eval/``, ``<run>/adapter/`` or a folder
of its own), plus what training left beside them: ``run_config.json`` (the method) and the training time
(``adapter/run_config.json``'s ``train_seconds_total``, else ``sessions.jsonl``). Budgeted evaluations
(``eval_summary_budget-<kind>-<mode>.json``) are runs of their own. Files and statistics come from ``metrics.py``
(Wilson intervals, paired bootstrap, McNemar); nothing is recomputed differently here, and nothing here needs a
model (this module does not import evaluation or training).

Notebook::

    runs = results.find_runs(["outputs", "MyDrive/length-rl"])
    rows = results.comparison_table(runs)           # + the study's published numbers, labelled
    print(results.format_table(rows))                # or runtime.show(results.table_frame(rows)): a table
    print(results.format_pairs(results.paired_against_baseline(runs)))
    runtime.show(results.plot_pareto(runs, "outputs/results/pareto.png"))

or everything at once: ``results.report(["outputs"], out_dir="outputs/results")``; from a shell:
``python results.py RUN_DIR... [--out-dir outputs/results] [--no-include-study]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import data
import metrics
import rewards
import runtime

STUDY_TEST_QUESTIONS = 1319
# The study's published results on the 1319 test questions (greedy decoding). ``correct`` is the count behind
# the published percentage (126 / 1319 = 9.55%), used for its Wilson interval; None: not published.
STUDY_RESULTS: tuple[dict[str, Any], ...] = (
    {"name": "untrained", "method": None, "correct": 126, "accuracy": 0.0955, "format_accuracy": 0.6634,
     "mean_length": 144.9},
    {"name": "baseline", "method": "baseline", "correct": 455, "accuracy": 0.3450, "format_accuracy": None,
     "mean_length": 124.1},
    {"name": "group", "method": "group", "correct": 461, "accuracy": 0.3495, "format_accuracy": None,
     "mean_length": 121.6},
    {"name": "group_ans_len", "method": "group_ans_len", "correct": 467, "accuracy": 0.3541,
     "format_accuracy": None, "mean_length": 122.8},
)
STUDY_SOURCE = "study (published)"
RUN_SOURCE = "this project"
UNTRAINED = "untrained"
_SUMMARY_GLOB = "eval_summary*.json"
# Folders that hold a run's evaluation files inside the run's own folder.
_EVAL_SUBFOLDERS = ("eval", "adapter")


@dataclass
class Run:
    """One evaluated model: its summary, its per-question records and what training recorded."""

    name: str
    method: str | None
    summary_path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    folder: Path
    train_seconds: float | None = None
    budget: str | None = None
    budget_mode: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary["metrics"]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def _resolve(path: str | os.PathLike) -> Path:
    """A local path, or a Google Drive path (``MyDrive/...``, ``/content/drive/...``; mounted in Colab)."""
    text = str(path)
    try:
        drive = runtime.drive_path(text)
    except runtime.ConfigError:
        raise FileNotFoundError(f"{text!r} is a Google Drive path, but this is not Colab: copy the run folders "
                                "locally and pass that path") from None
    return drive if drive is not None else Path(text).expanduser()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _run_root(summary_folder: Path) -> Path:
    return summary_folder.parent if summary_folder.name in _EVAL_SUBFOLDERS else summary_folder


def _training_record(folder: Path) -> tuple[str | None, float | None, dict[str, Any]]:
    """(method, training seconds, run config) from the files training wrote in or above ``folder``."""
    method, seconds, config = None, None, {}
    places = [folder, folder.parent] if folder.name in _EVAL_SUBFOLDERS else [folder]
    for place in places:
        for candidate in (place / "run_config.json", place / "adapter" / "run_config.json"):
            record = _read_json(candidate) if candidate.is_file() else None
            if not record:
                continue
            if method is None and isinstance(record.get("config"), dict):
                config = record["config"]
                method = config.get("method")
            if seconds is None:
                for key in ("train_seconds_total", "train_seconds"):
                    if isinstance(record.get(key), (int, float)):
                        seconds = float(record[key])
                        break
    if seconds is None:
        for place in places:
            sessions = place / "sessions.jsonl"
            if sessions.is_file():
                seconds = math.fsum(float(s.get("seconds", 0)) for _, s in data.iter_jsonl(sessions))
                break
    return method, seconds, config


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """One run from its summary JSON, or from a folder holding ``eval_summary.json`` (or one budgeted summary).

    The per-question file is the summary's sibling (``metrics.result_paths``), so a run folder copied from
    Drive still loads. ``name`` defaults to the method (``"untrained"`` without an adapter), plus the budget.
    """
    path = _resolve(path)
    if path.is_dir():
        plain = path / metrics.SUMMARY_FILE
        found = [plain] if plain.is_file() else sorted(path.glob(_SUMMARY_GLOB))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise FileNotFoundError(f"{str(path)!r} holds {what} evaluation summaries ({_SUMMARY_GLOB}); pass one "
                                    "summary file, or use find_runs to load every run under a folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation summary at {str(path)!r}")
    summary = metrics.load_summary(path)
    if "metrics" not in summary:
        raise runtime.ConfigError(f"{path} is not an evaluation summary (it has no 'metrics')")
    generation = summary.get("generation") or {}
    budget, mode = generation.get("budget"), generation.get("budget_mode")
    results_path = metrics.result_paths(path.parent, budget, mode or "limit")[0]
    records = metrics.load_records(results_path if results_path.is_file() else path)
    method, seconds, config = _training_record(path.parent)
    if method is None and summary.get("adapter") is None:
        method = UNTRAINED
    label = name or method or _run_root(path.parent).name
    if budget:
        label += f" [budget {budget}, {mode}]"
    return Run(name=label, method=method, summary_path=path, summary=summary, records=records,
               folder=_run_root(path.parent), train_seconds=seconds, budget=budget, budget_mode=mode,
               run_config=config)


def _order(run: Run) -> tuple:
    methods = list(rewards.METHODS)
    if run.method == UNTRAINED:
        rank = -1
    else:
        rank = methods.index(run.method) if run.method in methods else len(methods)
    return (run.budget is not None, run.budget or "", run.budget_mode or "", rank, run.name, str(run.summary_path))


def find_runs(root_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
              include_budgets: bool = True) -> list[Run]:
    """Every run under one or more folders (searched recursively) or summary files; Drive paths work in Colab.

    Runs are ordered untrained, then ``rewards.METHODS`` order, budgeted runs last. Two runs with the same
    name (e.g. a smoke and a full baseline) are told apart by their run folder's name.
    """
    if isinstance(root_or_paths, (str, os.PathLike)):
        root_or_paths = [root_or_paths]
    if root_or_paths is None or not (root_or_paths := list(root_or_paths)):
        raise runtime.ConfigError("find_runs needs a folder, a summary file, or a list of them")
    summaries: list[Path] = []
    for item in root_or_paths:
        path = _resolve(item)
        if path.is_file():
            summaries.append(path)
        elif path.is_dir():
            found = sorted(path.rglob(_SUMMARY_GLOB))
            if not found:
                raise FileNotFoundError(f"no evaluation summary ({_SUMMARY_GLOB}) under {str(path)!r}")
            summaries.extend(found)
        else:
            raise FileNotFoundError(f"{str(path)!r} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in summaries))
    runs = [load_run(p) for p in unique]
    if not include_budgets:
        runs = [r for r in runs if r.budget is None]
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.name} ({run.folder.name})"
    return sorted(runs, key=_order)


# --------------------------------------------------------------------------------------------------
# The comparison table
# --------------------------------------------------------------------------------------------------

def _run_row(run: Run) -> dict[str, Any]:
    m = run.metrics
    return {
        "name": run.name, "method": run.method, "source": RUN_SOURCE, "budget": run.budget,
        "budget_mode": run.budget_mode, "n": m["n"], "correct": m["accuracy"]["count"],
        "accuracy": m["accuracy"]["value"], "accuracy_ci_low": m["accuracy"]["ci_low"],
        "accuracy_ci_high": m["accuracy"]["ci_high"], "format_accuracy": m["format_accuracy"]["value"],
        "mean_length": m["mean_length"]["value"], "out_of_limit_rate": m["out_of_limit_rate"]["value"],
        "efficiency": m.get("model_efficiency"), "train_seconds": run.train_seconds,
    }


def study_rows() -> list[dict[str, Any]]:
    """The study's published results as table rows (Wilson interval from the published count)."""
    rows = []
    for entry in STUDY_RESULTS:
        low, high = metrics.wilson_interval(entry["correct"], STUDY_TEST_QUESTIONS)
        rows.append({
            "name": f"study: {entry['name']}", "method": entry["method"], "source": STUDY_SOURCE, "budget": None,
            "budget_mode": None, "n": STUDY_TEST_QUESTIONS, "correct": entry["correct"],
            "accuracy": entry["accuracy"], "accuracy_ci_low": low, "accuracy_ci_high": high,
            "format_accuracy": entry["format_accuracy"], "mean_length": entry["mean_length"],
            "out_of_limit_rate": None, "efficiency": None, "train_seconds": None,
        })
    return rows


def comparison_table(runs: Sequence[Run], include_study: bool = True) -> list[dict[str, Any]]:
    """One row per run (then the study's published rows, labelled ``source = "study (published)"``):
    method, accuracy with its 95% Wilson interval, format accuracy, mean length, out-of-limit rate,
    efficiency (reference tokens / response tokens over correct answers) and training time.

    Plain dicts of numbers (fractions, tokens, seconds); ``format_table`` prints them, ``to_frame`` makes a
    pandas DataFrame.
    """
    rows = [_run_row(run) for run in runs]
    return rows + (study_rows() if include_study else [])


def to_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The rows as a pandas DataFrame (pandas comes with ``datasets`` and with Colab)."""
    import pandas as pd

    return pd.DataFrame(list(rows))


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_duration(seconds: float | None) -> str:
    """``"2 h 05 min"``, ``"12 min"``, ``"40 s"``; ``"-"`` when unknown."""
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cells[i])) for cells in (header, *rows)) for i in range(len(header))]
    # Text columns (the first two) flush left, numbers flush right.
    lines = ["  ".join(str(cell).ljust(w) if i < 2 else str(cell).rjust(w)
                       for i, (cell, w) in enumerate(zip(cells, widths))) for cells in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _table_cells(row: Mapping[str, Any]) -> dict[str, str]:
    # One formatting for the text table and the notebook table.
    interval = (f"[{100 * row['accuracy_ci_low']:.2f}, {100 * row['accuracy_ci_high']:.2f}]"
                if row.get("accuracy_ci_low") is not None else "")
    return {"Method": row["name"], "Source": row["source"], "n": str(row["n"]),
            "Accuracy": metrics.format_percent(row["accuracy"]), "95% CI": interval,
            "Format": metrics.format_percent(row["format_accuracy"]), "Mean length": _number(row["mean_length"]),
            "Out-of-limit": metrics.format_percent(row["out_of_limit_rate"]),
            "Efficiency": _number(row["efficiency"], 3),
            "Training time": format_duration(row["train_seconds"])}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table as fixed-width text; the study's rows are marked as published references."""
    header = ("Method", "Source", "n", "Accuracy [95% CI]", "Format", "Mean length", "Out-of-limit",
              "Efficiency", "Training time")
    body = []
    for row in rows:
        cells = _table_cells(row)
        accuracy = f"{cells['Accuracy']} {cells['95% CI']}".rstrip()
        body.append((cells["Method"], cells["Source"], cells["n"], accuracy,
                     *(cells[column] for column in header[4:])))
    text = _text_table(header, body)
    if any(row["source"] == STUDY_SOURCE for row in rows):
        text += (f"\nRows marked '{STUDY_SOURCE}' are the study's reported numbers on {STUDY_TEST_QUESTIONS} test "
                 "questions (reference only, not rerun here); '-': not reported.")
    return text


STUDY_ROW_STYLE = "color: #6a6a6a; font-style: italic; background-color: #f4f4f4"


def table_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The comparison table for notebooks: the cells of ``format_table`` (percentages, the 95% interval in
    points, durations) as a pandas Styler whose ``.data`` is the DataFrame; the study's published rows are
    set apart in gray italics. ``to_frame`` gives the raw numbers instead."""
    import pandas as pd

    frame = pd.DataFrame([_table_cells(row) for row in rows])
    published = [row["source"] == STUDY_SOURCE for row in rows]
    styler = frame.style.hide(axis="index").apply(
        lambda column: [STUDY_ROW_STYLE if study else "" for study in published], axis=0)
    if any(published):
        styler = styler.set_caption(f"Gray rows: the study's reported numbers on {STUDY_TEST_QUESTIONS} test "
                                    "questions (reference only, not rerun here); '-': not reported.")
    return styler


# --------------------------------------------------------------------------------------------------
# Paired comparison against the baseline
# --------------------------------------------------------------------------------------------------

def _baseline_for(run: Run, baselines: Sequence[Run]) -> Run | None:
    # Same budget first; a budgeted baseline itself is compared with the unbudgeted one (the budget's effect).
    others = [b for b in baselines if b.summary_path != run.summary_path]
    same = [b for b in others if (b.budget, b.budget_mode) == (run.budget, run.budget_mode)]
    plain = [b for b in others if b.budget is None]
    return (same or plain or [None])[0]


def paired_against_baseline(runs: Sequence[Run], baseline: str | Run | None = None, n_boot: int | None = None,
                            seed: int = 0) -> list[dict[str, Any]]:
    """``metrics.compare_runs(baseline, run)`` for every other run (differences are run - baseline).

    The baseline is ``baseline`` (a run or its name) or else the run of method ``"baseline"`` evaluated under
    the same budget, or else the unbudgeted one (so a budgeted baseline is compared with the unbudgeted
    baseline). Each result also has ``run`` and ``baseline`` (names). Empty when there is no baseline run.
    """
    if isinstance(baseline, str):
        chosen = [r for r in runs if r.name == baseline]
        if not chosen:
            raise runtime.ConfigError(f"no run named {baseline!r}; runs: {[r.name for r in runs]}")
        baselines = chosen
    elif isinstance(baseline, Run):
        baselines = [baseline]
    else:
        baselines = [r for r in runs if r.method == "baseline"]
    results = []
    for run in runs:
        reference = baselines[0] if baseline is not None else _baseline_for(run, baselines)
        if reference is None or run is reference or run.summary_path == reference.summary_path:
            continue
        comparison = metrics.compare_runs(reference.records, run.records, seed=seed,
                                          n_boot=n_boot or metrics.DEFAULT_N_BOOT, labels=(reference.name, run.name))
        results.append({"run": run.name, "baseline": reference.name, **comparison})
    return results


def format_pairs(pairs: Sequence[Mapping[str, Any]]) -> str:
    """The paired comparisons as one table: accuracy and length differences (run - baseline), McNemar p."""
    if not pairs:
        return "No baseline run found: nothing to compare against."
    header = ("Run", "vs", "n", "Δ accuracy [95% CI]", "McNemar p", "Δ mean length [95% CI]")
    body = [tuple(_pair_cells(pair).values()) for pair in pairs]
    return (_text_table(header, body) + "\n" + PAIRS_NOTE)


PAIRS_NOTE = ("Paired by question (paired bootstrap intervals, McNemar's exact test on the questions that only one "
              "of the two runs answers correctly).")


def _pair_cells(pair: Mapping[str, Any]) -> dict[str, str]:
    # One formatting for the text table and the notebook table.
    accuracy, length = pair["accuracy_diff"], pair["length_diff"]
    return {"Run": pair["run"], "vs": pair["baseline"], "n": str(pair["n"]),
            "Δ accuracy [95% CI]": f"{100 * accuracy['estimate']:+.2f} [{100 * accuracy['ci_low']:+.2f}, "
                                   f"{100 * accuracy['ci_high']:+.2f}] pts",
            "McNemar p": f"{pair['mcnemar']['p_value']:.3g}",
            "Δ mean length [95% CI]": f"{length['estimate']:+.1f} [{length['ci_low']:+.1f}, "
                                      f"{length['ci_high']:+.1f}]"}


def pairs_frame(pairs: Sequence[Mapping[str, Any]]) -> Any:
    """The paired comparisons for notebooks: the cells of ``format_pairs`` as a pandas Styler (``.data`` is the
    DataFrame), captioned with how the pairs were tested."""
    import pandas as pd

    frame = pd.DataFrame([_pair_cells(pair) for pair in pairs])
    return frame.style.hide(axis="index").set_caption(PAIRS_NOTE)


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no GUI backend needed; notebooks display the returned Figure)
# --------------------------------------------------------------------------------------------------

def _save(figure: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the rows no other row beats on both counts (at least as accurate AND at most as long, and
    strictly better on one), ordered by mean length."""
    front = []
    for row in rows:
        dominated = any(
            other is not row and other["accuracy"] >= row["accuracy"] and other["mean_length"] <= row["mean_length"]
            and (other["accuracy"] > row["accuracy"] or other["mean_length"] < row["mean_length"])
            for other in rows)
        if not dominated:
            front.append(row)
    return [row["name"] for row in sorted(front, key=lambda r: (r["mean_length"], -r["accuracy"]))]


def plot_pareto(runs: Sequence[Run], path: str | os.PathLike | None = None, include_study: bool = True) -> Any:
    """Accuracy against mean length, one point per run with its 95% intervals, the Pareto front of the runs
    as a line, and the study's published results as hollow reference markers."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5), layout="constrained")
    axes = figure.add_subplot()
    rows = comparison_table(runs, include_study=False)
    for run, row in zip(runs, rows):
        length = run.metrics["mean_length"]
        axes.errorbar(row["mean_length"], 100 * row["accuracy"],
                      xerr=[[row["mean_length"] - length["ci_low"]], [length["ci_high"] - row["mean_length"]]],
                      yerr=[[100 * (row["accuracy"] - row["accuracy_ci_low"])],
                            [100 * (row["accuracy_ci_high"] - row["accuracy"])]],
                      fmt="o", capsize=3, label=row["name"])
    if rows:
        front = {name: i for i, name in enumerate(pareto_front(rows))}
        on_front = sorted((r for r in rows if r["name"] in front), key=lambda r: front[r["name"]])
        axes.plot([r["mean_length"] for r in on_front], [100 * r["accuracy"] for r in on_front], color="black",
                  linestyle=":", linewidth=1, label="Pareto front (runs)")
    if include_study:
        # Legend entries rather than text labels: the study's methods lie within a few tokens of each other.
        for row, marker in zip(study_rows(), "DsP^v<>"):
            axes.scatter(row["mean_length"], 100 * row["accuracy"], marker=marker, s=45, facecolors="none",
                         edgecolors="gray", label=f"{row['name']} (published)")
    axes.set_xlabel("mean response length (tokens)  ← shorter")
    axes.set_ylabel("accuracy (%)  ↑ better")
    axes.set_title("GSM8K test: accuracy vs length" + (" (gray: study, published)" if include_study else ""))
    axes.grid(alpha=0.3)
    if rows or include_study:
        axes.legend(fontsize=8)
    return _save(figure, path)


def plot_length_distributions(runs: Sequence[Run], path: str | os.PathLike | None = None) -> Any:
    """One box per run (quartiles, 5-95% whiskers) of its response lengths, with the mean as a diamond."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to plot")
    figure = Figure(figsize=(max(6.0, 1.5 + 1.0 * len(runs)), 4.8), layout="constrained")
    axes = figure.add_subplot()
    lengths = [[int(r["length"]) for r in run.records] for run in runs]
    # Vertical boxes: the default orientation on every matplotlib version (``vert`` is being renamed).
    axes.boxplot(lengths, whis=(5, 95), showfliers=False, showmeans=True,
                 meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"})
    axes.set_xticks(range(1, len(runs) + 1), [run.name for run in runs], rotation=20, ha="right")
    axes.set_ylabel("response length (tokens)")
    axes.set_title("Response lengths per run")
    axes.set_xlabel("box: quartiles · whiskers: 5-95% · diamond: mean", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_step_buckets(runs: Sequence[Run], path: str | os.PathLike | None = None) -> Any:
    """Accuracy (with 95% intervals) and mean length per step-count bucket, one line per run."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to plot")
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    accuracy_axes, length_axes = figure.subplots(1, 2)
    labels = sorted({row["steps"] for run in runs for row in run.metrics["by_steps"]},
                    key=lambda s: int(str(s).rstrip("+")))
    position = {label: i for i, label in enumerate(labels)}
    for run in runs:
        rows = run.metrics["by_steps"]
        x = [position[row["steps"]] for row in rows]
        accuracy = [100 * row["accuracy"] for row in rows]
        errors = [[a - 100 * row["ci_low"] for a, row in zip(accuracy, rows)],
                  [100 * row["ci_high"] - a for a, row in zip(accuracy, rows)]]
        accuracy_axes.errorbar(x, accuracy, yerr=errors, marker="o", capsize=3, label=run.name)
        length_axes.plot(x, [row["mean_length"] for row in rows], marker="o", label=run.name)
    for axes, ylabel in ((accuracy_axes, "accuracy (%)"), (length_axes, "mean response length (tokens)")):
        axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel("solution steps of the question")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    accuracy_axes.set_title("Accuracy per step bucket")
    length_axes.set_title("Length per step bucket")
    length_axes.legend(fontsize=8)
    return _save(figure, path)


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------

PLOT_FILES = {"pareto": "pareto.png", "lengths": "length_distributions.png", "steps": "step_buckets.png"}


def report(root_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
           out_dir: str | os.PathLike | None = None, include_study: bool = True,
           n_boot: int | None = None) -> dict[str, Any]:
    """Find the runs, show the comparison table and the paired comparisons, and draw the three plots (saved as
    PNGs under ``out_dir`` when given). In a notebook the tables render as tables and the plots show below them
    (``runtime.show``); elsewhere the tables print as text. Returns ``runs``, ``rows``, ``pairs`` and
    ``figures``."""
    runs = find_runs(root_or_paths)
    rows = comparison_table(runs, include_study=include_study)
    pairs = paired_against_baseline(runs, n_boot=n_boot)
    runtime.show(table_frame(rows), text=format_table(rows) + "\n")
    if pairs:
        runtime.show(pairs_frame(pairs), text=format_pairs(pairs))
    else:
        print(format_pairs(pairs), flush=True)
    folder = Path(out_dir) if out_dir is not None else None
    figures = {
        "pareto": plot_pareto(runs, folder / PLOT_FILES["pareto"] if folder else None, include_study),
        "lengths": plot_length_distributions(runs, folder / PLOT_FILES["lengths"] if folder else None),
        "steps": plot_step_buckets(runs, folder / PLOT_FILES["steps"] if folder else None),
    }
    for figure in figures.values():
        runtime.show(figure)
    return {"runs": runs, "rows": rows, "pairs": pairs, "figures": figures}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

@dataclass
class ReportOptions:
    """``report``'s settings as the command line's options (``python results.py --help``)."""

    out_dir: str | None = field(default="outputs/results", metadata={"help": "folder for the PNG plots"})
    include_study: bool = field(default=True, metadata={"help": "add the study's published numbers as rows"})
    n_boot: int | None = field(default=None, metadata={
        "help": f"bootstrap resamples of the paired comparisons (default: {metrics.DEFAULT_N_BOOT})"})


def build_parser() -> argparse.ArgumentParser:
    """``RUN_DIR...`` plus one option per ``ReportOptions`` field, built as training.py's and evaluation.py's."""
    parser = argparse.ArgumentParser(
        prog="results.py", description="Compare evaluated runs: one table with 95%% intervals, paired tests "
                                       "against the baseline, and the plots.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders (searched for evaluation summaries) or summary files")
    runtime.add_dataclass_options(parser, ReportOptions)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python results.py RUN_DIR... [options]``: print the table and the paired comparisons, save the plots."""
    namespace = build_parser().parse_args(argv)
    options = ReportOptions(**runtime.dataclass_values(ReportOptions, namespace))
    with runtime.one_line_errors(namespace.debug, prog="results.py"):
        return report(namespace.runs, **dataclasses.asdict(options))


if __name__ == "__main__":
    main()
