"""budgets.py: step-aware, reference-length and question-length budgets, fitted on the train split."""

from __future__ import annotations

import pytest

import budgets
import data

# A hand-made "train split": 2-step solutions of 40..79 tokens (40 of them), 3-step ones of 100..139, and one
# 5-step solution of 300 tokens. Question lengths 10..90, one per question, in order.
TRAIN = {
    "steps": [2] * 40 + [3] * 40 + [5],
    "reference_length": list(range(40, 80)) + list(range(100, 140)) + [300],
    "question_length": list(range(10, 91)),
}


def test_step_table_is_the_trimmed_max_of_each_step_bucket():
    # 40 answers per bucket: floor(0.025 * 40) = 1 longest answer dropped -> 78 and 138; one answer -> itself.
    assert budgets.step_table(TRAIN) == {2: 78, 3: 138, 5: 300}


def test_a_step_count_outside_the_table_takes_the_nearest_bucket():
    table = budgets.step_table(TRAIN)
    assert budgets.step_budget(1, table) == 78  # below the table: the smallest bucket
    assert budgets.step_budget(11, table) == 300  # above: the largest
    assert budgets.step_budget(4, table) == 300  # a gap, equally far from 3 and 5: the more generous one


def test_a_step_count_outside_the_table_is_an_error_when_asked():
    with pytest.raises(ValueError, match=r"11 steps is not in the step table \(buckets \[2, 3, 5\]\)"):
        budgets.step_budget(11, budgets.step_table(TRAIN), fallback="error")
    with pytest.raises(ValueError, match="fallback"):
        budgets.step_budget(2, {2: 5}, fallback="closest")
    with pytest.raises(ValueError, match="step count"):
        budgets.step_budget(-1, {2: 5})
    with pytest.raises(ValueError, match="empty"):
        budgets.step_budget(2, {})


def test_question_buckets_split_train_questions_evenly_and_take_each_buckets_trimmed_max():
    buckets = budgets.fit_question_buckets(TRAIN, n_buckets=3)
    # 81 questions: cut points at the 27th and 54th shortest question (36 and 63 tokens).
    assert [b["upper"] for b in buckets] == [36, 63, None]
    assert [b["questions"] for b in buckets] == [27, 27, 27]
    # Bucket 1: references 40..66 -> drop 0 of 27 -> 66; bucket 2: 67..79 and 100..113 -> 113;
    # bucket 3: 114..139 and 300 -> 300.
    assert [b["budget"] for b in buckets] == [66, 113, 300]


def test_a_question_goes_to_its_bucket_and_beyond_the_train_range_to_the_end_buckets():
    buckets = budgets.fit_question_buckets(TRAIN, n_buckets=3)
    assert budgets.question_budget(36, buckets) == 66
    assert budgets.question_budget(37, buckets) == 113
    assert budgets.question_budget(0, buckets) == 66  # shorter than every train question
    assert budgets.question_budget(5000, buckets) == 300  # longer than every train question
    with pytest.raises(ValueError, match="question length"):
        budgets.question_budget(-3, buckets)


def test_tied_question_lengths_merge_buckets_instead_of_leaving_one_empty():
    table = {"question_length": [50] * 10 + [60], "reference_length": list(range(11)), "steps": [2] * 11}
    buckets = budgets.fit_question_buckets(table, n_buckets=4)
    assert [b["questions"] for b in buckets] == [10, 1]
    with pytest.raises(ValueError, match="n_buckets"):
        budgets.fit_question_buckets(table, n_buckets=0)


def test_compute_budgets_reads_the_datasets_columns():
    dataset = {"steps": [2, 3, 9], "reference_length": [10, 0, 250], "question_length": [10, 40, 70]}
    assert budgets.compute_budgets("steps", dataset, train_table=TRAIN) == [78, 138, 300]
    # A reference budget is the reference length, at least one token.
    assert budgets.compute_budgets("reference", dataset) == [10, 1, 250]
    assert budgets.compute_budgets("question", dataset, train_table=TRAIN, n_buckets=3) == [66, 113, 300]


def test_budget_kinds_have_clear_names_and_errors():
    assert budgets.budget_kind("Step-aware") == "steps"
    assert budgets.budget_kind("question_length") == "question"
    for bad in ("tokens", "", None, 3):
        with pytest.raises(ValueError, match=r"unknown budget kind .*'steps', 'reference', 'question'"):
            budgets.compute_budgets(bad, {"steps": [2]}, train_table=TRAIN)


def test_a_missing_column_is_named():
    with pytest.raises(ValueError, match="'answer' column"):
        budgets.compute_budgets("steps", {"question": ["q"]}, train_table=TRAIN)


def test_columns_are_computed_when_absent(tokenizer):
    solution = "Half of 10 is 5.\nAdd 2: 5 + 2 = 7.\n#### 7"
    dataset = {"question": ["What is half of 10, plus 2?"], "answer": [solution]}
    assert budgets.compute_budgets("steps", dataset, train_table=TRAIN) == [78]  # 2 steps
    assert budgets.compute_budgets("reference", dataset, tokenizer) == data.token_lengths(tokenizer, [solution])


# --- on the real GSM8K train split --------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_table(tokenizer, gsm8k_dir):
    return budgets.train_length_table(tokenizer, gsm8k_dir)


def test_step_budgets_on_gsm8k_are_the_data_analysis_trimmed_max(train_table, tokenizer, gsm8k_dir):
    table = budgets.step_table(train_table)
    assert sorted(table) == list(range(2, 10))
    assert table[2] == 112 and table[9] == 367  # the study's per-step table
    test = data.test_dataset(tokenizer, gsm8k_dir)
    values = budgets.compute_budgets("steps", test, tokenizer, gsm8k_dir, train_table=train_table)
    by_steps = dict(zip(test["steps"], values))
    assert by_steps[2] == 112
    assert by_steps[11] == 367  # the one 11-step test question takes the 9-step bucket


def test_question_buckets_on_gsm8k_grow_with_question_length(train_table, tokenizer, gsm8k_dir):
    buckets = budgets.fit_question_buckets(train_table)
    assert len(buckets) == budgets.QUESTION_BUCKETS
    assert sum(b["questions"] for b in buckets) == 7473
    assert all(1300 < b["questions"] < 1700 for b in buckets)
    values = [b["budget"] for b in buckets]
    assert values == sorted(values) and values[0] < values[-1]
    text = budgets.describe(train_table=train_table)
    assert "2 steps: 112 tokens" in text and f"{values[-1]} tokens" in text


def test_target_lengths_carry_the_budget_to_training_and_into_the_prompt(tokenizer, gsm8k_dir):
    plain = data.training_dataset(tokenizer, gsm8k_dir, size=4)
    assert "target_length" not in plain.column_names
    dataset = budgets.add_target_lengths(plain, "reference", tokenizer, gsm8k_dir)
    assert dataset["target_length"] == dataset["reference_length"]
    for row in dataset:
        assert row["prompt"][-1]["content"].endswith(f"Use no more than {row['target_length']} tokens.")
    silent = budgets.add_target_lengths(plain, "reference", tokenizer, gsm8k_dir, in_prompt=False)
    assert silent["target_length"] == dataset["target_length"]
    assert [row["prompt"] for row in silent] == [data.prompt_messages(q) for q in silent["question"]]
