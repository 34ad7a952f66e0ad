"""GSM8K: loading (Hub or local jsonl), step counts, the training subset and the prompts. Imports runtime only.

The step count of a solution is its number of lines before ``####``, blank lines included; it equals the
number of sub-questions of the same problem in GSM8K's ``socratic`` config (which gives a blank line a
sub-question with an empty answer, e.g. test row 1042).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import runtime

SYSTEM_PROMPT = (
    "Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n"
    "<answer>\n...\n</answer>"
)
# Appended to the question when a token budget is given (see budgets.py).
BUDGET_INSTRUCTION = "Use no more than {budget} tokens."

DEFAULT_TRAIN_SIZE = 4000
DEFAULT_MAX_STEPS = 5
DEFAULT_SEED = 3407

_FINAL_MARK = "####"


def solution_body(solution: str) -> str:
    """The worked solution without its ``#### <number>`` line."""
    return solution.split(_FINAL_MARK)[0].rstrip()


def gold_answer(solution: str) -> str:
    """The final answer of a GSM8K solution (text after ``####``), with thousands separators removed."""
    if _FINAL_MARK not in solution:
        raise ValueError(f"GSM8K solution has no '{_FINAL_MARK}' line: {solution[:80]!r}")
    return solution.split(_FINAL_MARK)[-1].strip().replace(",", "")


def count_steps(solution: str) -> int:
    """Number of solution lines before ``####``, blank lines included (= socratic sub-question count).

    Skipping blank lines would undercount 2 of the 1319 test rows against the socratic config and 4 train
    rows against the data study (1961 instead of 1960 two-step questions).
    """
    return len(solution_body(solution).splitlines())


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line is an error naming file:line."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, row in iter_jsonl(path):
        missing = {"question", "answer"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {sorted(missing)}")
        if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
            raise ValueError(f"{path}:{number}: 'question' and 'answer' must be strings")
        if _FINAL_MARK not in row["answer"]:
            raise ValueError(f"{path}:{number}: 'answer' has no '{_FINAL_MARK} <number>' line")
        rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def load_gsm8k(split: str = "train", gsm8k_dir: str | os.PathLike | None = None):
    """GSM8K ``main`` as a ``datasets.Dataset`` with extra columns ``question_id``, ``gold`` and ``steps``.

    ``gsm8k_dir`` (or ``$GSM8K_DIR``, or ``shared/gsm8k``) is a folder of ``<split>.jsonl`` files;
    without one, ``openai/gsm8k`` is loaded from the Hugging Face Hub.
    """
    from datasets import Dataset, load_dataset

    if split not in {"train", "test"}:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = runtime.gsm8k_dir(gsm8k_dir)
    if folder is None:
        rows = [{"question": r["question"], "answer": r["answer"]}
                for r in load_dataset(runtime.GSM8K_HUB_ID, "main", split=split)]
    else:
        path = Path(folder) / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"GSM8K folder {str(folder)!r} has no {split}.jsonl")
        rows = _read_jsonl(path)
    for index, row in enumerate(rows):
        row["question_id"] = index
        row["gold"] = gold_answer(row["answer"])
        row["steps"] = count_steps(row["answer"])
    return Dataset.from_list(rows)


def prompt_messages(question: str, budget: int | None = None) -> list[dict[str, str]]:
    """The chat for one question: our system prompt, then the question (optionally with a token budget)."""
    content = question if budget is None else f"{question}\n{BUDGET_INSTRUCTION.format(budget=int(budget))}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """Render a chat through the model's chat template, ending where the assistant starts to answer."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of raw texts with the given tokenizer, no special tokens added."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def add_length_columns(dataset, tokenizer):
    """Add ``reference_length`` and ``question_length``: token counts of the raw ``answer`` field (the whole
    solution, ``#### N`` line included: the data study's answer length, see analysis.py) and of the question.
    """

    def lengths(batch: dict[str, list]) -> dict[str, list[int]]:
        return {
            "reference_length": token_lengths(tokenizer, batch["answer"]),
            "question_length": token_lengths(tokenizer, batch["question"]),
        }

    return dataset.map(lengths, batched=True, batch_size=1000)


def training_dataset(
    tokenizer,
    gsm8k_dir: str | os.PathLike | None = None,
    size: int | None = DEFAULT_TRAIN_SIZE,
    max_steps: int | None = DEFAULT_MAX_STEPS,
    seed: int = DEFAULT_SEED,
):
    """The study's training set: train questions with at most ``max_steps`` steps, shuffled with ``seed``,
    the first ``size`` of them, as conversational prompts with ``answer`` and length columns for the rewards.

    Per-question token budgets (L1's ``target_length``) are added by ``budgets.add_target_lengths``.
    """
    dataset = load_gsm8k("train", gsm8k_dir)
    if max_steps is not None:
        dataset = dataset.filter(lambda row: row["steps"] <= max_steps)
    dataset = dataset.shuffle(seed=seed)
    if size is not None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        dataset = dataset.select(range(min(size, len(dataset))))
    dataset = add_length_columns(dataset, tokenizer)
    return dataset.map(lambda row: {"prompt": prompt_messages(row["question"])})


def test_dataset(tokenizer=None, gsm8k_dir: str | os.PathLike | None = None):
    """The 1319 test questions, with length columns when a tokenizer is given."""
    dataset = load_gsm8k("test", gsm8k_dir)
    return dataset if tokenizer is None else add_length_columns(dataset, tokenizer)

