"""analysis.py: the data study's numbers on the real train split, the CLI's JSON, histograms, trimmed_max."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
import runtime

REPO = Path(__file__).resolve().parent.parent

# The study's published per-step rows (Questions, Mean, Min, Max, Variance, Trimmed Max (97.5%)).
STUDY_STEP_ROWS = {
    "2": (1960, 72.71, 29, 172, 333.36, 112),
    "9": (13, 240.31, 92, 367, 9781.40, 367),
}
STEP_KEYS = {"questions", "mean", "min", "max", "variance", "trimmed_max"}


@pytest.fixture(scope="module", autouse=True)
def _cli_in_background(tmp_path_factory):
    """``python analysis.py`` on the full train split, started as this module starts so that its interpreter
    start-up and tokenization overlap the in-process tests (CI has 2 cores); ``cli_run`` waits for it.
    Without the local assets nothing starts, and the tests that need them skip through their fixtures.
    """
    try:
        gsm8k, tokenizer_dir = runtime.gsm8k_dir(), runtime.find_local("qwen-tokenizer", "QWEN_TOKENIZER")
    except FileNotFoundError:  # a wrong $GSM8K_DIR/$QWEN_TOKENIZER: the conftest fixtures report it
        gsm8k = tokenizer_dir = None
    if gsm8k is None or tokenizer_dir is None:
        yield None
        return
    out = tmp_path_factory.mktemp("cli")
    command = [sys.executable, "analysis.py", "--json", str(out / "stats" / "stats.json"),
               "--gsm8k-dir", str(gsm8k), "--tokenizer", str(tokenizer_dir), "--plots", str(out / "plots")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, out
    if process.poll() is None:  # a failing or interrupted module must not leave the child running
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def cli_run(_cli_in_background, gsm8k_dir, tokenizer_dir) -> dict:
    process, out = _cli_in_background
    stdout, stderr = process.communicate(timeout=300)
    return {"returncode": process.returncode, "stdout": stdout, "stderr": stderr,
            "json": out / "stats" / "stats.json", "plots": out / "plots"}


@pytest.fixture(scope="module")
def table(tokenizer, gsm8k_dir):
    return analysis.token_length_table(tokenizer, gsm8k_dir)


@pytest.fixture(scope="module")
def stats(table):
    return analysis.statistics_from_table(table)


@pytest.fixture()
def small_gsm8k(gsm8k_dir, tmp_path) -> Path:
    """The first 60 train questions, so end-to-end runs stay fast."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    lines = (Path(gsm8k_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder


def test_table_covers_the_whole_train_split(table):
    assert {len(column) for column in table.values()} == {7473}


def test_length_summaries_match_the_study(stats):
    answer, question = stats["answer_tokens"], stats["question_tokens"]
    assert (round(answer["mean"], 4), answer["min"], answer["max"]) == (121.7933, 29, 453)
    assert (round(question["mean"], 4), question["min"], question["max"]) == (59.6473, 12, 212)


def test_correlations_match_the_study(stats):
    assert round(stats["corr_question_answer"], 4) == 0.5258
    assert round(stats["corr_steps_answer"], 4) == 0.7711


def test_step_table_matches_the_study(stats):
    assert list(stats["steps"]) == [str(step) for step in range(2, 10)]
    assert sum(row["questions"] for row in stats["steps"].values()) == 7473
    for step, (questions, mean, low, high, variance, trimmed) in STUDY_STEP_ROWS.items():
        row = stats["steps"][step]
        assert set(row) == STEP_KEYS
        assert row["questions"] == questions
        assert round(row["mean"], 2) == mean
        assert (row["min"], row["max"]) == (low, high)
        assert round(row["variance"], 2) == variance
        assert row["trimmed_max"] == trimmed


def test_per_step_rows_are_consistent_with_the_table(table, stats):
    # Recompute one middle row by brute force from the table: the grouping must not mix steps.
    lengths = sorted(length for length, steps in zip(table["reference_length"], table["steps"], strict=True)
                     if steps == 5)
    row = stats["steps"]["5"]
    assert row["questions"] == len(lengths)
    assert (row["min"], row["max"]) == (lengths[0], lengths[-1])
    mean = sum(lengths) / len(lengths)
    assert row["variance"] == pytest.approx(sum((x - mean) ** 2 for x in lengths) / (len(lengths) - 1))
    assert row["trimmed_max"] == lengths[len(lengths) - 1 - math.floor(0.025 * len(lengths))]
    for later, earlier in zip(list(stats["steps"].values())[1:], stats["steps"].values()):
        assert later["mean"] > earlier["mean"]  # the study's point: more steps, longer solutions


def test_format_report_prints_rounded_summary_and_aligned_table(stats):
    report = analysis.format_report(stats)
    assert "mean 121.7933, min 29, max 453" in report
    assert "mean 59.6473, min 12, max 212" in report
    assert "0.5258" in report and "0.7711" in report
    lines = report.splitlines()
    header = next(line for line in lines if "Trimmed Max (97.5%)" in line)
    table_lines = lines[lines.index(header):]
    assert len(table_lines) == 1 + 8
    assert len({len(line) for line in table_lines}) == 1  # right-aligned columns
    assert table_lines[1].split() == ["2", "1960", "72.71", "29", "172", "333.36", "112"]
    assert table_lines[-1].split() == ["9", "13", "240.31", "92", "367", "9781.40", "367"]


def test_plot_histograms_writes_non_empty_pngs(table, tmp_path):
    paths = analysis.plot_histograms(table, tmp_path / "plots")
    assert [path.name for path in paths] == list(analysis.HISTOGRAM_FILES.values())
    for path in paths:
        content = path.read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5000


def test_cli_writes_the_study_json(cli_run, stats):
    assert cli_run["returncode"] == 0, cli_run["stderr"]
    assert "Trimmed Max (97.5%)" in cli_run["stdout"]
    assert "IPython" not in cli_run["stdout"]  # the CLI never tries to display figures
    written = json.loads(cli_run["json"].read_text())
    assert set(written) == {"answer_tokens", "question_tokens", "corr_question_answer", "corr_steps_answer",
                            "steps"}
    assert set(written["answer_tokens"]) == set(written["question_tokens"]) == {"mean", "min", "max"}
    assert list(written["steps"]) == [str(step) for step in range(2, 10)]
    assert all(set(row) == STEP_KEYS for row in written["steps"].values())
    assert round(written["answer_tokens"]["mean"], 4) == 121.7933
    assert written["steps"]["2"]["trimmed_max"] == 112
    assert round(written["steps"]["9"]["variance"], 2) == 9781.40
    # The same numbers as the library computes in-process (JSON floats round-trip exactly).
    assert written == stats


def test_cli_writes_the_histograms_and_the_step_plot(cli_run):
    assert cli_run["returncode"] == 0, cli_run["stderr"]
    paths = sorted(cli_run["plots"].iterdir())
    assert [path.name for path in paths] == sorted([*analysis.HISTOGRAM_FILES.values(), analysis.STEP_PLOT_FILE])
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in paths)


def test_cli_reports_a_missing_gsm8k_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analysis.main(["--gsm8k-dir", str(tmp_path / "nowhere"), "--json", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "nowhere" in error and "does not exist" in error
    assert not (tmp_path / "s.json").exists()


def test_run_analysis_prints_and_saves_everything(small_gsm8k, tokenizer, tmp_path, capsys):
    stats = analysis.run_analysis(small_gsm8k, tokenizer, out_dir=tmp_path / "out")
    printed = capsys.readouterr().out
    # Outside a notebook: the whole report as text, nothing displayed (Data_analysis.ipynb's test counts the
    # inline table and plots).
    assert analysis.format_report(stats) in printed
    assert "<Figure" not in printed and "DataFrame" not in printed
    saved = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert saved == stats
    assert sum(row["questions"] for row in saved["steps"].values()) == 60
    for name in (*analysis.HISTOGRAM_FILES.values(), analysis.STEP_PLOT_FILE):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_table_frame_holds_the_studys_rounded_rows(stats):
    frame = analysis.step_table_frame(stats)
    assert list(frame.index) == [str(step) for step in range(2, 10)]
    assert list(frame.columns) == list(analysis.STEP_TABLE_HEADER[1:])
    assert list(frame.loc["2"]) == ["1960", "72.71", "29", "172", "333.36", "112"]
    assert list(frame.loc["9"]) == ["13", "240.31", "92", "367", "9781.40", "367"]
    # The same cells as the text report, row for row.
    text_rows = analysis.format_report(stats).splitlines()[-8:]
    assert [line.split() for line in text_rows] == [[step, *frame.loc[step]] for step in frame.index]


def test_length_by_steps_plot_has_one_box_per_step_and_marks_the_trimmed_max(table, stats, tmp_path):
    figure = analysis.plot_length_by_steps(table, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes[0]
    labels = [label.get_text().split("\n") for label in axes.get_xticklabels()]
    assert [label[0] for label in labels] == [str(step) for step in range(2, 10)]
    assert labels[0][1] == "(n = 1960)"
    # The red marks sit at each step count's trimmed max: 112 for 2 steps, 367 for 9.
    marks = next(c for c in axes.collections if c.get_label().startswith("trimmed max"))
    heights = [y for _, y in marks.get_offsets()]
    assert heights == [row["trimmed_max"] for row in stats["steps"].values()]
    assert heights[0] == 112 and heights[-1] == 367
    assert "r = 0.77" in axes.get_title()


def test_histogram_figures_are_the_saved_histograms(table):
    figures = analysis.histogram_figures(table, bins=20)
    assert list(figures) == list(analysis.HISTOGRAM_FILES.values())
    answer = figures[analysis.HISTOGRAM_FILES["reference_length"]].axes[0]
    assert sum(patch.get_height() for patch in answer.patches) == len(table["reference_length"])
    assert "n = 7473" in answer.get_title()


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        (range(1, 41), 0.025, 39),  # 40 values: floor(1.0) = 1 dropped
        (range(1, 40), 0.025, 39),  # 39 values: floor(0.975) = 0 dropped, plain max
        (range(1, 81), 0.025, 78),  # 80 values: 2 dropped
        ([7, 3, 9, 1], 0.0, 9),
        ([5, 100, 1, 100], 0.25, 100),  # one copy of the max is dropped, the other remains
        ([4, 10, 2, 8, 6, 1, 9, 3, 7, 5], 0.5, 5),  # unsorted input
        ([3.5], 0.025, 3.5),
    ],
)
def test_trimmed_max(values, fraction, expected):
    assert analysis.trimmed_max(values, fraction) == expected


def test_trimmed_max_default_fraction_and_floating_point_edge():
    assert analysis.trimmed_max(range(1, 121)) == 117  # 0.025 * 120 = 3 dropped, not 2
    assert analysis.trimmed_max(list(range(1, 14))) == 13  # the study's 13 nine-step answers keep their max


@pytest.mark.parametrize(("values", "fraction"), [([], 0.025), ([1, 2], 1.0), ([1, 2], -0.1)])
def test_trimmed_max_rejects_bad_input(values, fraction):
    with pytest.raises(ValueError):
        analysis.trimmed_max(values, fraction)


def test_statistics_from_table_rejects_ragged_columns():
    with pytest.raises(ValueError, match="equally long"):
        analysis.statistics_from_table({"steps": [2, 3], "question_length": [10, 20],
                                        "reference_length": [50]})
