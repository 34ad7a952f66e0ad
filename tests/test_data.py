"""data.py: step counts and gold answers, local GSM8K loading and its errors, the training subset, prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import data
import runtime

SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def _socratic_sub_questions(answer: str) -> int:
    """Sub-questions of a socratic solution: each line before #### reads 'sub-question ** step'."""
    return sum(1 for line in answer.split("####")[0].splitlines() if " ** " in line)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- count_steps / gold_answer on hand-made solutions -------------------------------------------------

@pytest.mark.parametrize(
    ("solution", "steps"),
    [
        (SOLUTION, 2),
        ("He has 3 apples.\n#### 3", 1),
        ("a = 1\nb = 2\nc = 3\n#### 6", 3),
        ("First 1+1=<<1+1=2>>2\n\nThen 2*2=<<2*2=4>>4\n#### 4", 3),  # a blank line is a (socratic) step
        ("One line, trailing spaces   \n  \n#### 5", 1),  # blank lines right before #### are not
        ("#### 5", 0),
    ],
)
def test_count_steps(solution, steps):
    assert data.count_steps(solution) == steps


@pytest.mark.parametrize(
    ("solution", "gold"),
    [(SOLUTION, "72"), ("x\n#### 1,234", "1234"), ("x\n#### -3.5 ", "-3.5"), ("x\n####10", "10")],
)
def test_gold_answer(solution, gold):
    assert data.gold_answer(solution) == gold


def test_gold_answer_without_final_mark_is_an_error():
    with pytest.raises(ValueError, match="####"):
        data.gold_answer("The answer is 5.")


def test_solution_body_drops_the_final_line():
    assert data.solution_body(SOLUTION) == SOLUTION.split("\n#### ")[0]


# --- the real data -------------------------------------------------------------------------------------

def test_steps_equal_socratic_sub_question_count_for_every_test_row(gsm8k_dir):
    socratic_path = Path(gsm8k_dir) / "test_socratic.jsonl"
    if not socratic_path.exists():
        pytest.skip(f"{socratic_path} not found (GSM8K socratic test split)")
    main, socratic = _read_jsonl(Path(gsm8k_dir) / "test.jsonl"), _read_jsonl(socratic_path)
    assert len(main) == len(socratic) == 1319
    assert [row["question"] for row in main] == [row["question"] for row in socratic]  # same order
    mismatches = [
        index for index, (row, soc) in enumerate(zip(main, socratic, strict=True))
        if data.count_steps(row["answer"]) != _socratic_sub_questions(soc["answer"])
    ]
    assert mismatches == []
    # Row 1042 has a blank solution line, which the socratic config gives its own sub-question.
    assert data.count_steps(main[1042]["answer"]) == 6


def test_load_gsm8k_local_splits(gsm8k_dir):
    train, test = data.load_gsm8k("train", gsm8k_dir), data.load_gsm8k("test", gsm8k_dir)
    assert (len(train), len(test)) == (7473, 1319)
    assert {"question", "answer", "question_id", "gold", "steps"} <= set(train.column_names)
    first = test[0]
    assert first["question_id"] == 0 and first["gold"] == "18" and first["steps"] == 2
    assert list(test["question_id"][:3]) == [0, 1, 2]
    assert min(train["steps"]) >= 1


def test_load_gsm8k_rejects_an_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="validation"):
        data.load_gsm8k("validation", tmp_path)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "q", "answer": ', "not valid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ('{"question": "q"}', "missing field"),
        ('{"question": "q", "answer": "no final line"}', "####"),
        ('{"question": 3, "answer": "x\\n#### 3"}', "must be strings"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})
    (tmp_path / "train.jsonl").write_text(f"{good}\n\n{good}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        data.load_gsm8k("train", tmp_path)
    assert "train.jsonl:4:" in str(error.value)  # line 4 counted with the blank line


def test_load_gsm8k_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.load_gsm8k("train", tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"no test\.jsonl"):
        data.load_gsm8k("test", tmp_path)


def test_find_local_errors_for_a_wrong_explicit_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="typo"):
        runtime.find_local("qwen-tokenizer", "QWEN_TOKENIZER", tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="typo"):
        runtime.gsm8k_dir(tmp_path / "typo")
    assert runtime.find_local("qwen-tokenizer", "QWEN_TOKENIZER", tmp_path) == tmp_path


# --- the training subset -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_default(tokenizer, gsm8k_dir):
    return data.training_dataset(tokenizer, gsm8k_dir)


def test_training_dataset_default_size_and_step_filter(train_default, gsm8k_dir):
    assert len(train_default) == data.DEFAULT_TRAIN_SIZE == 4000
    assert max(train_default["steps"]) <= data.DEFAULT_MAX_STEPS == 5
    assert len(set(train_default["question_id"])) == 4000
    # A shuffled sample of the whole <= 5-step pool, not its first 4000 rows in file order.
    ids = list(train_default["question_id"])
    assert ids != sorted(ids) and max(ids) > 6000
    assert set(train_default["steps"]) == {2, 3, 4, 5}


def test_training_dataset_rows_are_prompts_with_length_columns(train_default, tokenizer):
    row = train_default[0]
    assert row["prompt"] == data.prompt_messages(row["question"])
    assert row["gold"] == data.gold_answer(row["answer"])
    rows = train_default.select(range(20))
    assert list(rows["reference_length"]) == [
        len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in rows["answer"]
    ]
    assert list(rows["question_length"]) == [
        len(tokenizer(question, add_special_tokens=False)["input_ids"]) for question in rows["question"]
    ]


def test_training_dataset_seed_reproducibility(tokenizer, gsm8k_dir, train_default):
    # Same seed, built again (and with another size): the same questions in the same order.
    again = data.training_dataset(tokenizer, gsm8k_dir, size=50, seed=data.DEFAULT_SEED)
    assert list(again["question_id"]) == list(train_default["question_id"][:50])
    other = data.training_dataset(tokenizer, gsm8k_dir, size=50, seed=data.DEFAULT_SEED + 1)
    assert list(other["question_id"]) != list(again["question_id"])
    assert max(other["steps"]) <= data.DEFAULT_MAX_STEPS


def test_training_dataset_other_step_limit_and_whole_pool(tokenizer, gsm8k_dir):
    two_steps = data.training_dataset(tokenizer, gsm8k_dir, size=None, max_steps=2)
    assert len(two_steps) == 1960  # every two-step train question (the data study's count)
    assert set(two_steps["steps"]) == {2}


def test_training_dataset_rejects_a_bad_size(tokenizer, gsm8k_dir):
    with pytest.raises(ValueError, match="size"):
        data.training_dataset(tokenizer, gsm8k_dir, size=0)


def test_test_dataset_length_columns(tokenizer, gsm8k_dir):
    plain = data.test_dataset(gsm8k_dir=gsm8k_dir)
    assert len(plain) == 1319 and "reference_length" not in plain.column_names
    with_lengths = data.test_dataset(tokenizer, gsm8k_dir).select(range(5))
    assert list(with_lengths["reference_length"]) == data.token_lengths(tokenizer, with_lengths["answer"])
    assert all(length > 0 for length in with_lengths["question_length"])


def test_token_lengths_add_no_special_tokens(tokenizer):
    text = "Natalia sold 48/2 = 24 clips."
    expected = len(tokenizer.encode(text, add_special_tokens=False))
    assert data.token_lengths(tokenizer, [text, ""]) == [expected, 0]


# --- prompts -------------------------------------------------------------------------------------------

def test_prompt_messages_and_budget_instruction():
    plain = data.prompt_messages("What is 2+2?")
    assert plain == [{"role": "system", "content": data.SYSTEM_PROMPT},
                     {"role": "user", "content": "What is 2+2?"}]
    budgeted = data.prompt_messages("What is 2+2?", budget=120)
    assert budgeted[0] == plain[0]
    assert budgeted[1]["content"].startswith("What is 2+2?\n")
    assert budgeted[1]["content"].endswith(data.BUDGET_INSTRUCTION.format(budget=120))
    assert "120" in budgeted[1]["content"]
    assert "<reasoning>" in data.SYSTEM_PROMPT and "<answer>" in data.SYSTEM_PROMPT


def test_render_prompt_uses_the_chat_template(tokenizer):
    question = "Janet has 3 ducks. How many ducks does she have?"
    text = data.render_prompt(tokenizer, data.prompt_messages(question))
    assert data.SYSTEM_PROMPT in text and question in text
    assert text.index(data.SYSTEM_PROMPT) < text.index(question)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
