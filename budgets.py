"""Hard length budgets: a token limit for each question, the study's first idea.

Three kinds (``KINDS``), all in Qwen2.5 tokens of the raw text (``data.token_lengths``):

- ``"steps"`` (step-aware): the trimmed max (97.5%) of the reference-solution lengths of the question's
  step bucket, from the data-analysis table computed on the GSM8K train split (``analysis.compute_statistics``;
  train has buckets 2..9). A step count outside the table takes the NEAREST bucket (a 1-step question gets the
  2-step budget, an 11-step one the 9-step budget; a tie between two buckets takes the larger, more generous
  one), or raises with ``fallback="error"``.
- ``"reference"``: the token length of the question's own reference solution (``reference_length``).
- ``"question"`` (question-length buckets): train questions are split into ``QUESTION_BUCKETS`` buckets of
  about equal size by question length (cut points are train question lengths); each bucket's budget is the
  trimmed max (97.5%) of its reference-solution lengths. A question longer than every train question falls in
  the last bucket, a shorter one in the first.

Budgets are used at evaluation as a per-question ``max_new_tokens``, in the prompt as "Use no more than N
tokens" (``data.prompt_messages(question, budget=N)``), or both; and in training as L1's per-question
target (``add_target_lengths(dataset, kind, tokenizer)`` adds a ``target_length`` column to the training set).

Notebook: ``budgets.compute_budgets("steps", dataset, tokenizer)``; ``budgets.describe(...)`` prints the tables.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from typing import Any

import data
import runtime

KINDS = ("steps", "reference", "question")
# Spellings that obviously mean one of the kinds.
_ALIASES = {"step": "steps", "step_aware": "steps", "step-aware": "steps", "reference_length": "reference",
            "question_length": "question"}
QUESTION_BUCKETS = 5
FALLBACKS = ("nearest", "error")

# Train-split length tables by (GSM8K folder, tokenizer): tokenizing 7473 questions takes seconds to half a
# minute, and an evaluation notebook may ask for several budgets.
_TRAIN_TABLES: dict[tuple[str, str, int], dict[str, list[int]]] = {}


def budget_kind(kind: str) -> str:
    """The canonical name of a budget kind; a clear error for anything else."""
    if isinstance(kind, str):
        name = kind.strip().lower()
        name = _ALIASES.get(name, name)
        if name in KINDS:
            return name
    raise runtime.ConfigError(f"unknown budget kind {kind!r}; choose one of {list(KINDS)}")


def train_length_table(tokenizer: Any = None, gsm8k_dir: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """The train split's ``steps``, ``question_length`` and ``reference_length`` columns (cached per folder
    and tokenizer); every budget is fitted on it."""
    import analysis

    tokenizer = runtime.resolve_tokenizer(tokenizer)
    folder = runtime.gsm8k_dir(gsm8k_dir)
    key = (str(folder), str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)), len(tokenizer))
    if key not in _TRAIN_TABLES:
        _TRAIN_TABLES[key] = analysis.token_length_table(tokenizer, folder, "train")
    return _TRAIN_TABLES[key]


# --------------------------------------------------------------------------------------------------
# Step-aware budgets
# --------------------------------------------------------------------------------------------------

def step_table(train_table: dict[str, Sequence[int]]) -> dict[int, int]:
    """Step count -> budget: the trimmed max (97.5%) column of the data-analysis per-step table."""
    import analysis

    # Only the trimmed max is needed: the full statistics would also need non-constant columns (correlations).
    by_steps: dict[int, list[int]] = {}
    for count, length in zip(train_table["steps"], train_table["reference_length"]):
        by_steps.setdefault(int(count), []).append(int(length))
    return {count: math.ceil(analysis.trimmed_max(lengths)) for count, lengths in sorted(by_steps.items())}


def step_budget(steps: int, table: dict[int, int], fallback: str = "nearest") -> int:
    """The budget of a question with ``steps`` steps; outside the table, the nearest bucket's (see above)."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    if not table:
        raise ValueError("the step table is empty")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"a step count must be a non-negative integer, got {steps!r}")
    if steps in table:
        return table[steps]
    if fallback == "error":
        raise ValueError(f"{steps} steps is not in the step table (buckets {sorted(table)}); "
                         "use fallback='nearest' to take the nearest bucket")
    # Nearest bucket; on a tie the larger step count (the more generous budget).
    nearest = min(table, key=lambda count: (abs(count - steps), -count))
    return table[nearest]


# --------------------------------------------------------------------------------------------------
# Question-length buckets
# --------------------------------------------------------------------------------------------------

def fit_question_buckets(train_table: dict[str, Sequence[int]],
                         n_buckets: int = QUESTION_BUCKETS) -> list[dict[str, Any]]:
    """Question-length buckets fitted on the train split, in order.

    Each bucket is ``{"upper": U, "budget": B, "questions": n}``: it holds questions of length up to ``U``
    (and above the previous bucket's ``U``; the last has ``U = None``, no upper bound), and ``B`` is the
    trimmed max (97.5%) of their reference lengths. Cut points are train question lengths at the
    ``i / n_buckets`` quantiles, so no bucket is empty; tied lengths may merge buckets.
    """
    import analysis

    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ValueError(f"n_buckets must be a positive integer, got {n_buckets!r}")
    questions, references = list(train_table["question_length"]), list(train_table["reference_length"])
    if not questions or len(questions) != len(references):
        raise ValueError("the train table needs equally long, non-empty question_length and reference_length")
    ordered = sorted(questions)
    cuts = sorted({ordered[math.ceil(i * len(ordered) / n_buckets) - 1] for i in range(1, n_buckets)})
    cuts = [cut for cut in cuts if cut < ordered[-1]]  # the last bucket must hold something
    members: list[list[int]] = [[] for _ in range(len(cuts) + 1)]
    for question, reference in zip(questions, references):
        members[bisect.bisect_left(cuts, question)].append(reference)
    return [{"upper": cuts[i] if i < len(cuts) else None, "budget": math.ceil(analysis.trimmed_max(lengths)),
             "questions": len(lengths)} for i, lengths in enumerate(members)]


def question_budget(question_length: int, buckets: Sequence[dict[str, Any]]) -> int:
    """The budget of a question of ``question_length`` tokens: its bucket's (see ``fit_question_buckets``)."""
    if not buckets:
        raise ValueError("no question-length buckets")
    if isinstance(question_length, bool) or not isinstance(question_length, (int, float)) \
            or not math.isfinite(question_length) or question_length < 0:
        raise ValueError(f"a question length must be a non-negative number of tokens, got {question_length!r}")
    for bucket in buckets:
        if bucket["upper"] is None or question_length <= bucket["upper"]:
            return int(bucket["budget"])
    return int(buckets[-1]["budget"])


# --------------------------------------------------------------------------------------------------
# One call for evaluation and training
# --------------------------------------------------------------------------------------------------

def _column(dataset: Any, name: str) -> list | None:
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, dict):
        names = list(dataset)
    return list(dataset[name]) if names is not None and name in names else None


def compute_budgets(kind: str, dataset: Any, tokenizer: Any = None, gsm8k_dir: str | os.PathLike | None = None,
                    train_table: dict[str, Sequence[int]] | None = None, fallback: str = "nearest",
                    n_buckets: int = QUESTION_BUCKETS) -> list[int]:
    """One token budget per row of ``dataset`` (a ``datasets.Dataset`` or a dict of columns).

    Reads the ``steps``, ``reference_length`` or ``question_length`` column, computing it from ``answer`` or
    ``question`` with ``tokenizer`` when absent. ``"steps"`` and ``"question"`` are fitted on the train split of
    ``gsm8k_dir`` (tokenized with ``tokenizer``; default: the local Qwen tokenizer, else the Hub's), or on a
    given ``train_table`` (``train_length_table``'s columns). Every budget is at least 1 token.
    """
    kind = budget_kind(kind)
    if kind == "reference":
        lengths = _column(dataset, "reference_length")
        if lengths is None:
            lengths = data.token_lengths(runtime.resolve_tokenizer(tokenizer), _required(dataset, "answer", kind))
        return [max(1, int(length)) for length in lengths]
    if train_table is None:
        tokenizer = runtime.resolve_tokenizer(tokenizer)
        train_table = train_length_table(tokenizer, gsm8k_dir)
    if kind == "steps":
        steps = _column(dataset, "steps")
        if steps is None:
            steps = [data.count_steps(answer) for answer in _required(dataset, "answer", kind)]
        table = step_table(train_table)
        return [max(1, step_budget(int(count), table, fallback)) for count in steps]
    question_lengths = _column(dataset, "question_length")
    if question_lengths is None:
        questions = _required(dataset, "question", kind)
        question_lengths = data.token_lengths(runtime.resolve_tokenizer(tokenizer), questions)
    buckets = fit_question_buckets(train_table, n_buckets)
    return [max(1, question_budget(length, buckets)) for length in question_lengths]


def add_target_lengths(dataset: Any, kind: str, tokenizer: Any = None, gsm8k_dir: str | os.PathLike | None = None,
                       in_prompt: bool = True) -> Any:
    """The training set (``data.training_dataset``) with each question's budget as ``target_length`` (L1's
    target), stated in the prompt as well ("Use no more than N tokens.") unless ``in_prompt=False``."""
    dataset = dataset.add_column("target_length", compute_budgets(kind, dataset, tokenizer, gsm8k_dir))
    if not in_prompt:
        return dataset
    return dataset.map(lambda row: {"prompt": data.prompt_messages(row["question"], row["target_length"])})


def _required(dataset: Any, name: str, kind: str) -> list:
    values = _column(dataset, name)
    if values is None:
        raise ValueError(f"the {kind!r} budget needs a {name!r} column (or the column it is computed from)")
    return values


def describe(tokenizer: Any = None, gsm8k_dir: str | os.PathLike | None = None,
             train_table: dict[str, Sequence[int]] | None = None, n_buckets: int = QUESTION_BUCKETS) -> str:
    """The fitted budget tables as text, for a notebook to print."""
    train_table = train_table if train_table is not None else train_length_table(tokenizer, gsm8k_dir)
    lines = ["Step-aware budgets (trimmed max 97.5% of train reference lengths):"]
    lines += [f"  {count} steps: {budget} tokens" for count, budget in step_table(train_table).items()]
    lines.append(f"Question-length budgets ({n_buckets} train buckets):")
    lower = 0
    for bucket in fit_question_buckets(train_table, n_buckets):
        span = f">= {lower}" if bucket["upper"] is None else f"{lower}..{bucket['upper']}"
        lines.append(f"  question tokens {span}: {bucket['budget']} tokens ({bucket['questions']} train questions)")
        if bucket["upper"] is not None:
            lower = bucket["upper"] + 1
    lines.append("Reference budgets: each question's own reference-solution length.")
    return "\n".join(lines)
