"""results.py: loading run folders, the comparison table, pairing with the baseline, and the plots.

The run folders are written by hand in tmp_path with known values, laid out as training and evaluation lay
them out: ``<run>/run_config.json``, ``<run>/adapter/run_config.json`` (training time), evaluation files in
``<run>/eval/``, ``<run>/adapter/`` or a folder of their own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import metrics
import results

STEPS = [2, 3, 4, 8]
REFERENCE = [50, 60, 70, 80]


def records(correct, lengths, format_ok=None, limit=512):
    format_ok = format_ok or [True] * len(correct)
    return [{"index": i, "question": f"q{i}", "gold": str(i), "completion": "...", "extracted": str(i),
             "correct": ok, "format_ok": fmt, "length": n, "limit": limit, "out_of_limit": limit - n <= 3,
             "steps": s, "reference_length": ref}
            for i, (ok, n, fmt, s, ref) in enumerate(zip(correct, lengths, format_ok, STEPS, REFERENCE))]


def write_eval(folder: Path, rows, adapter=None, budget=None, mode=None) -> Path:
    results_path, summary_path = metrics.result_paths(folder, budget, mode or "limit")
    folder.mkdir(parents=True, exist_ok=True)
    results_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "adapter": adapter, "metrics": metrics.compute_metrics(rows),
               "generation": {"budget": budget, "budget_mode": mode},
               # As written on another machine (e.g. Colab): the absolute path does not exist here.
               "files": {"results": f"/content/drive/MyDrive/elsewhere/{results_path.name}",
                         "summary": str(summary_path)}}
    summary_path.write_text(json.dumps(summary), encoding="utf-8")
    return summary_path


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


@pytest.fixture()
def outputs(tmp_path) -> Path:
    root = tmp_path / "outputs"
    # The untrained model (Initial_evaluation): its own folder, no adapter.
    write_eval(root / "eval-Qwen2.5-0.5B-Instruct", records([False, True, False, False], [200, 150, 512, 100],
                                                            format_ok=[True, True, False, False]))
    # Baseline: evaluated by training into <run>/eval, training time in adapter/run_config.json.
    write_json(root / "Baseline" / "run_config.json", {"config": {"method": "baseline"}})
    write_json(root / "Baseline" / "adapter" / "run_config.json",
               {"config": {"method": "baseline"}, "train_seconds": 3600.0, "train_seconds_total": 3725.0})
    write_eval(root / "Baseline" / "eval", records([True, True, False, True], [100, 120, 140, 80]),
               adapter="outputs/Baseline/adapter")
    write_eval(root / "Baseline" / "eval", records([True, False, False, True], [40, 50, 60, 70]),
               adapter="outputs/Baseline/adapter", budget="steps", mode="limit")
    # Method 2: evaluated into the adapter folder; training time only in sessions.jsonl (two sessions).
    write_json(root / "Group_method" / "run_config.json", {"config": {"method": "group"}})
    (root / "Group_method" / "sessions.jsonl").write_text(
        '{"end_step": 10, "seconds": 100.0}\n{"end_step": 20, "seconds": 200.5}\n', encoding="utf-8")
    write_eval(root / "Group_method" / "adapter", records([True, True, True, False], [60, 90, 100, 300]),
               adapter="outputs/Group_method/adapter")
    return root


def by_name(rows):
    return {row["name"]: row for row in rows}


def test_find_runs_loads_every_run_with_its_method_and_training_time(outputs):
    runs = results.find_runs(outputs)
    assert [r.name for r in runs] == ["untrained", "baseline", "group", "baseline [budget steps, limit]"]
    assert [r.method for r in runs] == ["untrained", "baseline", "group", "baseline"]
    assert [r.train_seconds for r in runs] == [None, 3725.0, 300.5, 3725.0]
    assert all(len(r.records) == 4 for r in runs)
    assert [r.name for r in results.find_runs(outputs, include_budgets=False)] == ["untrained", "baseline", "group"]


def test_the_table_reports_each_runs_metrics(outputs):
    rows = by_name(results.comparison_table(results.find_runs(outputs), include_study=False))
    assert set(rows) == {"untrained", "baseline", "group", "baseline [budget steps, limit]"}
    baseline = rows["baseline"]
    assert baseline["accuracy"] == 0.75 and baseline["n"] == 4 and baseline["correct"] == 3
    assert (baseline["accuracy_ci_low"], baseline["accuracy_ci_high"]) == metrics.wilson_interval(3, 4)
    assert baseline["mean_length"] == 110.0
    assert baseline["efficiency"] == pytest.approx((50 + 60 + 80) / (100 + 120 + 80))
    assert baseline["train_seconds"] == 3725.0
    untrained = rows["untrained"]
    assert (untrained["accuracy"], untrained["format_accuracy"], untrained["out_of_limit_rate"]) == (0.25, 0.5, 0.25)
    assert untrained["efficiency"] == pytest.approx(60 / 150)
    assert rows["group"]["mean_length"] == 137.5
    assert rows["baseline [budget steps, limit]"]["budget"] == "steps"


def test_the_studys_published_numbers_are_labelled_reference_rows(outputs):
    rows = results.comparison_table(results.find_runs(outputs))
    study = [row for row in rows if row["source"] == results.STUDY_SOURCE]
    assert [row["name"] for row in study] == ["study: untrained", "study: baseline", "study: group",
                                              "study: group_ans_len"]
    numbers = {row["name"]: (row["accuracy"], row["format_accuracy"], row["mean_length"]) for row in study}
    assert numbers == {"study: untrained": (0.0955, 0.6634, 144.9), "study: baseline": (0.3450, None, 124.1),
                       "study: group": (0.3495, None, 121.6), "study: group_ans_len": (0.3541, None, 122.8)}
    for row in study:  # the published percentage is the count over 1319 questions
        assert round(100 * row["correct"] / 1319, 2) == round(100 * row["accuracy"], 2)
        assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == metrics.wilson_interval(row["correct"], 1319)
    text = results.format_table(rows)
    assert "study (published)" in text and "reference only" in text
    assert "75.00% [" in text and "1 h 02 min" in text and "5 min" in text


def test_each_run_is_paired_with_the_baseline(outputs):
    pairs = {p["run"]: p for p in results.paired_against_baseline(results.find_runs(outputs), n_boot=200)}
    # The unbudgeted baseline is the reference of every unbudgeted run and of the budgeted baseline.
    assert set(pairs) == {"untrained", "group", "baseline [budget steps, limit]"}
    assert {p["baseline"] for p in pairs.values()} == {"baseline"}
    group = pairs["group"]  # group misses question 3, baseline misses question 2
    assert group["mcnemar"] == {"a_only": 1, "b_only": 1, "p_value": 1.0}
    assert group["accuracy_diff"]["estimate"] == 0.0
    assert group["length_diff"]["estimate"] == pytest.approx(137.5 - 110.0)
    untrained = pairs["untrained"]  # baseline alone right on questions 0 and 3: p = 2 / 2^2
    assert untrained["mcnemar"] == {"a_only": 2, "b_only": 0, "p_value": 0.5}
    assert untrained["accuracy_diff"]["estimate"] == pytest.approx(-0.5)
    text = results.format_pairs(list(pairs.values()))
    assert "-50.00 [" in text and "0.5" in text


def test_a_budgeted_run_is_paired_with_the_baseline_under_the_same_budget(outputs):
    write_eval(outputs / "Group_method" / "adapter", records([True, True, True, True], [30, 30, 30, 30]),
               adapter="outputs/Group_method/adapter", budget="steps", mode="limit")
    pairs = {p["run"]: p for p in results.paired_against_baseline(results.find_runs(outputs), n_boot=200)}
    assert pairs["group [budget steps, limit]"]["baseline"] == "baseline [budget steps, limit]"


def test_a_chosen_baseline_and_no_baseline(outputs):
    runs = results.find_runs(outputs)
    pairs = results.paired_against_baseline(runs, baseline="group", n_boot=200)
    assert {p["baseline"] for p in pairs} == {"group"} and len(pairs) == 3
    with pytest.raises(ValueError, match="no run named 'grup'"):
        results.paired_against_baseline(runs, baseline="grup")
    no_baseline = [r for r in runs if r.method != "baseline"]
    assert results.paired_against_baseline(no_baseline) == []
    assert "No baseline run" in results.format_pairs([])


def test_same_named_runs_are_told_apart_by_their_folder(outputs, tmp_path):
    write_json(tmp_path / "smoke" / "Baseline-smoke" / "run_config.json", {"config": {"method": "baseline"}})
    write_eval(tmp_path / "smoke" / "Baseline-smoke" / "eval", records([True] * 4, [10, 20, 30, 40]),
               adapter="x")
    names = [r.name for r in results.find_runs([outputs, tmp_path / "smoke", outputs / "Baseline"])]
    assert "baseline (Baseline)" in names and "baseline (Baseline-smoke)" in names
    assert len(names) == 5  # the Baseline folder given twice is loaded once


def test_clear_errors_for_missing_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.find_runs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no evaluation summary"):
        results.find_runs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no evaluation summaries"):
        results.load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not Colab"):
        results.find_runs("MyDrive/length-rl")


def test_load_run_reads_one_summary_and_its_sibling_results(outputs):
    run = results.load_run(outputs / "Baseline" / "eval" / "eval_summary_budget-steps-limit.json")
    assert run.budget == "steps" and [r["length"] for r in run.records] == [40, 50, 60, 70]
    assert results.load_run(outputs / "Group_method" / "adapter", name="mine").name == "mine"


def test_pareto_front_keeps_only_runs_nothing_beats_on_both_accuracy_and_length():
    rows = [{"name": "a", "accuracy": 0.30, "mean_length": 100}, {"name": "b", "accuracy": 0.35, "mean_length": 120},
            {"name": "c", "accuracy": 0.34, "mean_length": 130}, {"name": "d", "accuracy": 0.30, "mean_length": 110}]
    assert results.pareto_front(rows) == ["a", "b"]


def test_durations_read_like_a_person_would_write_them():
    assert [results.format_duration(s) for s in (None, 40, 720, 3725)] == ["-", "40 s", "12 min", "1 h 02 min"]


def test_the_table_becomes_a_dataframe(outputs):
    rows = results.comparison_table(results.find_runs(outputs))
    frame = results.to_frame(rows)
    assert list(frame["name"]) == [row["name"] for row in rows]
    assert frame.loc[frame["name"] == "baseline", "accuracy"].item() == 0.75


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_save_non_empty_pngs(outputs, tmp_path):
    runs = results.find_runs(outputs)
    figure = results.plot_pareto(runs, tmp_path / "plots" / "pareto.png")
    assert _is_png(tmp_path / "plots" / "pareto.png")
    labels = {text.get_text() for text in figure.axes[0].get_legend().get_texts()}
    assert {"baseline", "study: baseline (published)", "Pareto front (runs)"} <= labels
    results.plot_length_distributions(runs, tmp_path / "plots" / "lengths.png")
    assert _is_png(tmp_path / "plots" / "lengths.png")
    figure = results.plot_step_buckets(runs, tmp_path / "plots" / "steps.png")
    assert _is_png(tmp_path / "plots" / "steps.png")
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["2", "3", "4", "8+"]


def test_report_does_everything_in_one_call(outputs, tmp_path, capsys):
    out = results.report(outputs, out_dir=tmp_path / "report", n_boot=200)
    printed = capsys.readouterr().out
    assert "Accuracy [95% CI]" in printed and "McNemar p" in printed and "study: group_ans_len" in printed
    assert len(out["runs"]) == 4 and len(out["pairs"]) == 3
    for filename in results.PLOT_FILES.values():
        assert _is_png(tmp_path / "report" / filename)


def test_the_notebook_table_has_the_text_tables_cells_and_sets_the_studys_rows_apart(outputs):
    rows = results.comparison_table(results.find_runs(outputs))
    styler = results.table_frame(rows)
    frame = styler.data
    assert list(frame["Method"]) == [row["name"] for row in rows]
    baseline = frame[frame["Method"] == "baseline"].iloc[0]
    assert baseline["Accuracy"] == "75.00%" and baseline["Training time"] == "1 h 02 min"
    # Every formatted cell of the notebook table is in the text table too.
    text = results.format_table(rows)
    for _, row in frame.iterrows():
        line = next(line for line in text.splitlines() if line.startswith(row["Method"] + " "))
        assert all(cell in line for cell in row if cell)
    html = styler.to_html()
    css = html[:html.index("</style>")]
    assert "font-style: italic" in css
    # The style sheet styles exactly the cells of the study's rows: every column of rows 4 to 7.
    styled = {(int(r), int(c)) for r, c in re.findall(r"_row(\d+)_col(\d+)", css)}
    study = {i for i, row in enumerate(rows) if row["source"] == results.STUDY_SOURCE}
    assert study == {4, 5, 6, 7}
    assert styled == {(r, c) for r in study for c in range(len(frame.columns))}
    assert "Gray rows" in html


def test_the_notebook_pairs_table_has_the_text_tables_cells(outputs):
    pairs = results.paired_against_baseline(results.find_runs(outputs), n_boot=200)
    frame = results.pairs_frame(pairs).data
    assert list(frame.columns) == ["Run", "vs", "n", "Δ accuracy [95% CI]", "McNemar p", "Δ mean length [95% CI]"]
    assert len(frame) == len(pairs) == 3
    untrained = frame[frame["Run"] == "untrained"].iloc[0]
    assert untrained["McNemar p"] == "0.5" and untrained["Δ accuracy [95% CI]"].startswith("-50.00 [")
    text = results.format_pairs(pairs)
    for _, row in frame.iterrows():
        line = next(line for line in text.splitlines() if line.startswith(row["Run"] + " "))
        assert all(cell in line for cell in row)
def test_command_line_reports_runs_and_names_a_bad_folder_in_one_line(outputs, tmp_path):
    script = Path(results.__file__).resolve()
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(script), str(outputs / "Baseline"), str(outputs / "Group_method"),
                           "--out-dir", str(tmp_path / "cli"), "--n-boot", "200", "--no-include-study"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "McNemar p" in done.stdout and "study:" not in done.stdout
    assert all(_is_png(tmp_path / "cli" / filename) for filename in results.PLOT_FILES.values())
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "nowhere")], capture_output=True,
                             text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"results.py: error: {str(tmp_path / 'nowhere')!r} does not exist"]
