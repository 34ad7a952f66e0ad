"""metrics.py: statistics against scipy, scores and metrics on hand-built completions, the per-step training
metrics against numpy, result files and the paired comparison of two runs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

import metrics
import rewards

# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (126, 1319), (3, 7), (1, 1), (500, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = metrics.wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="n must be"):
        metrics.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k must be"):
        metrics.wilson_interval(11, 10)


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 5), (7, 3), (40, 74), (1, 1), (250, 300), (12, 0)])
def test_mcnemar_exact_matches_scipy_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert metrics.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        metrics.mcnemar_exact(-1, 3)


def test_paired_bootstrap_matches_scipy():
    rng = np.random.default_rng(7)
    a = rng.normal(200, 60, size=300)
    b = a - 25 + rng.normal(0, 40, size=300)  # paired: b depends on a
    ours = metrics.paired_bootstrap(a, b, n_boot=20_000, seed=3)
    theirs = stats.bootstrap((b - a,), np.mean, n_resamples=20_000, method="percentile",
                             rng=np.random.default_rng(11)).confidence_interval
    standard_error = np.std(b - a, ddof=1) / math.sqrt(len(a))
    assert ours["estimate"] == pytest.approx(float(np.mean(b - a)))
    # Monte Carlo error of a percentile endpoint with 20,000 resamples is about 0.02 standard errors.
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=0.1 * standard_error)
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=0.1 * standard_error)
    assert metrics.paired_bootstrap(a, b, n_boot=2000, seed=5) == metrics.paired_bootstrap(a, b, n_boot=2000,
                                                                                                 seed=5)


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired"):
        metrics.paired_bootstrap([1, 2, 3], [1, 2])


def test_mean_interval_is_the_normal_interval():
    values = [3.0, 5.0, 9.0, 1.0, 7.0]
    mean, low, high = metrics.mean_interval(values)
    half = 1.959963984540054 * np.std(values, ddof=1) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((5.0, 5.0 - half, 5.0 + half))


# ---------------------------------------------------------------------------------------------------------
# Metrics on hand-built completions
# ---------------------------------------------------------------------------------------------------------

HAND_BUILT = [
    # text, gold, expected (correct, format_ok, lenient_correct), length, limit, steps, reference_length
    ("<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>", "4", (True, True, True), 20, 512, 2, 30),
    ("<reasoning>she has 5</reasoning><answer>5</answer>", "4", (False, True, False), 509, 512, 3, 40),
    ("The answer is 4", "4", (False, False, True), 512, 512, 3, 50),
    ("<answer>4</answer>", "4", (True, False, True), 508, 512, 8, 60),
    ("<reasoning>so 1,234 dollars</reasoning>\n<answer>$1,234</answer>", "1234", (True, True, True), 40, 512, 11, 90),
    ("<reasoning>no number</reasoning><answer>many</answer>", "7", (False, True, False), 3, 5, 2, 12),
]


def hand_built_records():
    records = []
    for index, (text, gold, _, length, limit, steps, reference) in enumerate(HAND_BUILT):
        records.append({"index": index, "gold": gold, "completion": text, **metrics.score_completion(text, gold),
                        "length": length, "limit": limit, "steps": steps, "reference_length": reference,
                        "out_of_limit": rewards.is_out_of_limit(length, limit)})
    return records


def test_scores_come_from_the_rewards_contract():
    for record, (text, gold, expected, *_rest) in zip(hand_built_records(), HAND_BUILT):
        assert (record["correct"], record["format_ok"], record["lenient_correct"]) == expected, text
        assert record["correct"] == rewards.is_correct(text, gold)
        assert record["format_ok"] == rewards.is_format_ok(text)
        assert record["extracted"] == rewards.extract_answer(text)


def test_metrics_on_hand_built_completions():
    records = hand_built_records()
    result = metrics.compute_metrics(records)
    n = len(records)
    assert result["n"] == n
    assert (result["accuracy"]["count"], result["format_accuracy"]["count"],
            result["lenient_accuracy"]["count"]) == (3, 4, 4)
    assert result["accuracy"]["value"] == pytest.approx(3 / n)
    expected = stats.binomtest(3, n).proportion_ci(method="wilson")
    assert (result["accuracy"]["ci_low"], result["accuracy"]["ci_high"]) == pytest.approx(
        (expected.low, expected.high))
    # Out of limit: 509 and 512 of 512 (within 3 tokens), 3 of 5; not 508 of 512 (4 tokens short).
    assert result["out_of_limit_rate"]["count"] == 3
    lengths = [r["length"] for r in records]
    assert result["mean_length"]["value"] == pytest.approx(np.mean(lengths))
    assert result["length_percentiles"]["p50"] == pytest.approx(np.percentile(lengths, 50))
    assert result["length_percentiles"]["p90"] == pytest.approx(np.percentile(lengths, 90))
    assert result["length_percentiles"]["max"] == 512
    # Efficiency over the correct ones (20, 508 and 40 tokens; references 30, 60 and 90).
    assert result["model_efficiency"] == pytest.approx((30 + 60 + 90) / (20 + 508 + 40))
    buckets = {row["steps"]: row for row in result["by_steps"]}
    assert list(buckets) == ["2", "3", "8+"]
    assert (buckets["2"]["n"], buckets["2"]["correct"]) == (2, 1)
    assert (buckets["3"]["n"], buckets["3"]["correct"]) == (2, 0)
    assert (buckets["8+"]["n"], buckets["8+"]["correct"]) == (2, 2)  # 8 and 11 steps pooled
    assert buckets["8+"]["mean_length"] == pytest.approx((508 + 40) / 2)


def test_model_efficiency_is_none_without_correct_answers():
    records = [r for r in hand_built_records() if not r["correct"]]
    assert metrics.compute_metrics(records)["model_efficiency"] is None


# ---------------------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------------------


def test_compare_runs_pairs_by_index(tmp_path):
    rng = random.Random(0)
    run_a, run_b = [], []
    for i in range(400):
        a_right = rng.random() < 0.4
        b_right = a_right if rng.random() < 0.8 else not a_right
        run_a.append({"index": i, "correct": a_right, "length": 200 + rng.randint(-50, 50)})
        run_b.append({"index": i, "correct": b_right, "length": 150 + rng.randint(-50, 50)})
    run_b.append({"index": 999, "correct": True, "length": 10})  # only in B: left out
    rng.shuffle(run_b)  # order must not matter
    metrics.save_records(run_a, tmp_path / "a" / metrics.RESULTS_FILE)
    result = metrics.compare_runs(tmp_path / "a", run_b, seed=1, n_boot=20_000, labels=("base", "new"))
    by_index = {r["index"]: r for r in run_b}
    a_only = sum(r["correct"] and not by_index[r["index"]]["correct"] for r in run_a)
    b_only = sum(by_index[r["index"]]["correct"] and not r["correct"] for r in run_a)
    assert (result["n"], result["only_in_a"], result["only_in_b"]) == (400, 0, 1)
    assert (result["mcnemar"]["a_only"], result["mcnemar"]["b_only"]) == (a_only, b_only)
    assert result["mcnemar"]["p_value"] == pytest.approx(stats.binomtest(a_only, a_only + b_only).pvalue)
    differences = np.array([float(by_index[r["index"]]["correct"]) - float(r["correct"]) for r in run_a])
    assert result["accuracy_diff"]["estimate"] == pytest.approx(differences.mean())
    scipy_ci = stats.bootstrap((differences,), np.mean, n_resamples=20_000, method="percentile",
                               rng=np.random.default_rng(2)).confidence_interval
    standard_error = differences.std(ddof=1) / math.sqrt(len(differences))
    assert result["accuracy_diff"]["ci_low"] == pytest.approx(scipy_ci.low, abs=0.1 * standard_error)
    assert result["accuracy_diff"]["ci_high"] == pytest.approx(scipy_ci.high, abs=0.1 * standard_error)
    lengths = np.array([by_index[r["index"]]["length"] - r["length"] for r in run_a], dtype=float)
    assert result["length_diff"]["estimate"] == pytest.approx(lengths.mean())
    assert result["length_diff"]["ci_low"] < lengths.mean() < result["length_diff"]["ci_high"] < 0


def test_compare_runs_needs_common_questions():
    with pytest.raises(ValueError, match="share no question"):
        metrics.compare_runs([{"index": 1, "correct": True, "length": 3}],
                                [{"index": 2, "correct": True, "length": 3}])


# --------------------------------------------------------------------------------------------------
# The metrics of one GRPO step (training's live metrics) against independent computations
# --------------------------------------------------------------------------------------------------

def test_batch_metrics_match_numpy():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 513, size=32)
    questions = rng.integers(20, 200, size=32)
    references = rng.integers(30, 300, size=32)
    correct = rng.random(32) < 0.4
    format_ok = correct | (rng.random(32) < 0.3)

    assert metrics.correlation(questions.tolist(), lengths.tolist()) == pytest.approx(
        np.corrcoef(questions, lengths)[0, 1], abs=1e-12)
    got = metrics.batch_metrics(lengths.tolist(), questions.tolist(), references.tolist(), correct.tolist(),
                                 format_ok.tolist(), limit=512)
    assert got["question_vs_response_length_correlation"] == pytest.approx(np.corrcoef(questions, lengths)[0, 1])
    assert got["answer_vs_response_length_correlation"] == pytest.approx(np.corrcoef(references, lengths)[0, 1])
    assert got["out_of_limit"] == pytest.approx(np.mean(lengths >= 509))
    assert got["model_efficiency"] == pytest.approx(references[correct].sum() / lengths[correct].sum())
    assert got["accuracy"] == pytest.approx(correct.mean())
    assert got["format_accuracy"] == pytest.approx(format_ok.mean())
    assert got["mean_length"] == pytest.approx(lengths.mean())
    assert got["mean_reference_deviation"] == pytest.approx(np.abs(lengths - references).mean())


def test_batch_metric_edge_cases():
    # A completion ending exactly 3 tokens short of the limit counts as out of limit; 4 short does not.
    assert metrics.out_of_limit([512, 509, 508, 10], limit=512) == 0.5
    assert metrics.correlation([1, 2, 3], [5, 5, 5]) is None  # no spread: undefined, not 0 or NaN
    assert metrics.correlation([1], [2]) is None
    assert rewards.model_efficiency([100, 200], [50, 400], [False, False]) is None
    step = metrics.batch_metrics([512, 512], [30, 40], [90, 80], [False, False], [False, True], limit=512)
    assert "question_vs_response_length_correlation" not in step  # undefined metrics are left out
    assert "model_efficiency" not in step
    assert step["format_accuracy"] == 0.5 and step["out_of_limit"] == 1.0
    assert step["mean_reference_deviation"] == (422 + 432) / 2  # tokens away from the reference, either side
    with pytest.raises(ValueError, match="equal length"):
        metrics.correlation([1, 2], [1])
    with pytest.raises(ValueError, match="one value per completion"):
        metrics.batch_metrics([1, 2], [1], [1, 2], [True, False], [True, True], limit=10)
    assert metrics.whole_group_fraction([{"group": 1}] * 4 + [{"group": 2}] * 3, num_generations=4) == 0.5
