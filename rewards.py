r"""Reward functions for GRPO on GSM8K, and the scoring contract that evaluation shares.

Every ``*_reward`` is a TRL reward function: TRL calls it as
``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and it returns one float per
completion. Completions may be plain strings or conversational lists ``[{"role": "assistant", ...}]``.

Length rewards work per *group*: the completions that share one prompt. Groups are keyed by the
``question_id`` column when present, else by the prompt itself, never by position, so the order of the
batch does not matter. Lengths are token counts, ``len(completion_ids[i])``.

Scale. The correctness reward is ``CORRECT_REWARD = 2.0`` and the format reward ``FORMAT_REWARD = 0.5``.
Length penalties lie in ``[-lam, 0]`` with ``DEFAULT_LAMBDA = 0.5``: even when both study methods give
their largest penalty (-1.0 together), a correct, well-formatted answer (2.5 - 1.0 = 1.5) still earns more
than any incorrect one (at most 0.5), so length never outweighs being right.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

CORRECT_REWARD = 2.0
FORMAT_REWARD = 0.5
DEFAULT_LAMBDA = 0.5
TOLERANCE = 1e-6

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = ("<reasoning>", "</reasoning>", _ANSWER_OPEN, _ANSWER_CLOSE)
_FORMAT = re.compile(r"<reasoning>(.*)</reasoning>\s*<answer>(.*)</answer>", re.DOTALL)
# ASCII digits only: a model writing Arabic-Indic or full-width digits is not giving a GSM8K answer.
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


# --------------------------------------------------------------------------------------------------
# Scoring contract (shared with evaluation.py)
# --------------------------------------------------------------------------------------------------

def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the assistant content of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(message) for message in completion)
    return ""


def extract_answer(text: Any) -> str | None:
    """Text between the last ``<answer>`` and the first ``</answer>`` after it; None when there is none."""
    text = completion_text(text)
    start = text.rfind(_ANSWER_OPEN)
    if start < 0:
        return None
    end = text.find(_ANSWER_CLOSE, start + len(_ANSWER_OPEN))
    return None if end < 0 else text[start + len(_ANSWER_OPEN):end]


def parse_number(text: str | None) -> float | None:
    """The last number in ``text`` after removing ``$``, ``,`` and ``%``; None when there is no number."""
    if not isinstance(text, str):
        return None
    cleaned = text.replace("$", "").replace(",", "").replace("%", "").strip()
    matches = _NUMBER.findall(cleaned)
    if not matches:
        return None
    try:
        value = float(matches[-1])
    except ValueError:  # e.g. a lone "-" cannot match, but stay defensive
        return None
    return value if math.isfinite(value) else None


def gold_number(answer: Any) -> float | None:
    """The gold value from a GSM8K solution (number after ``####``) or from a bare number."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    if not isinstance(answer, str):
        return None
    return parse_number(answer.split("####")[-1])


def is_format_ok(text: Any) -> bool:
    """Exactly one ``<reasoning>`` block, optional whitespace, one non-empty ``<answer>`` block, nothing else."""
    match = _FORMAT.fullmatch(completion_text(text).strip())
    if match is None:
        return False
    reasoning, answer = match.groups()
    if any(tag in part for part in (reasoning, answer) for tag in _TAGS):
        return False
    return bool(answer.strip())


def is_correct(text: Any, answer: Any) -> bool:
    """The extracted answer's last number equals the gold number within ``TOLERANCE``."""
    predicted = parse_number(extract_answer(text))
    gold = gold_number(answer)
    return predicted is not None and gold is not None and abs(predicted - gold) <= TOLERANCE


def lenient_answer(text: Any) -> float | None:
    """Diagnostic only: the last number anywhere in the completion, tags or not."""
    return parse_number(completion_text(text))


# --------------------------------------------------------------------------------------------------
# Helpers shared by the reward functions
# --------------------------------------------------------------------------------------------------

def _check_lengths(completions: Sequence, **columns: Sequence | None) -> None:
    for name, column in columns.items():
        if column is not None and len(column) != len(completions):
            raise ValueError(f"{name} has {len(column)} entries but completions has {len(completions)}")


def _hashable(value: Any) -> Hashable:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def group_keys(n: int, prompts: Sequence | None = None, question_id: Sequence | None = None) -> list[Hashable]:
    """One key per completion: its ``question_id`` when given, else its prompt."""
    if question_id is not None:
        return [_hashable(q) for q in question_id]
    if prompts is not None:
        return [_hashable(p) for p in prompts]
    raise ValueError("length rewards need the prompts or a question_id column to find each prompt's group")


def _groups(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups


def _completion_lengths(completions: Sequence, completion_ids: Sequence | None) -> list[int]:
    if completion_ids is None:
        raise ValueError("completion_ids is required: length rewards count tokens, not characters")
    _check_lengths(completions, completion_ids=completion_ids)
    return [len(ids) if ids is not None else 0 for ids in completion_ids]


def _finite(values: list[float]) -> list[float]:
    return [float(v) if math.isfinite(v) else 0.0 for v in values]


def per_group(penalty: Callable[..., list[float]], keys: Sequence[Hashable], **columns: Sequence) -> list[float]:
    """Apply a one-group ``penalty(**columns_of_group)`` to every group and scatter the results back."""
    out = [0.0] * len(keys)
    for indices in _groups(keys).values():
        values = penalty(**{name: [column[i] for i in indices] for name, column in columns.items()})
        for index, value in zip(indices, values):
            out[index] = value
    return _finite(out)


def configured(reward: Callable[..., list[float]], **params: Any) -> Callable[..., list[float]]:
    """``reward`` with keyword defaults set (e.g. ``lam``), keeping ``__name__`` because TRL logs by it."""
    accepted = inspect.signature(reward).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"{reward.__name__} has no parameter(s) {unknown}")
    return functools.update_wrapper(functools.partial(reward, **params), reward)


# --------------------------------------------------------------------------------------------------
# Format and correctness
# --------------------------------------------------------------------------------------------------

def format_reward(completions: Sequence, **kwargs: Any) -> list[float]:
    r"""r_i = FORMAT_REWARD (0.5) when completion i is format-correct (see ``is_format_ok``), else 0."""
    return [FORMAT_REWARD if is_format_ok(c) else 0.0 for c in completions]


def correctness_reward(completions: Sequence, answer: Sequence, **kwargs: Any) -> list[float]:
    r"""r_i = CORRECT_REWARD (2.0) when the extracted answer equals the gold number, else 0."""
    _check_lengths(completions, answer=answer)
    return [CORRECT_REWARD if is_correct(c, a) else 0.0 for c, a in zip(completions, answer)]


# --------------------------------------------------------------------------------------------------
# Method 1: deviation from the reference solution's length
# --------------------------------------------------------------------------------------------------

def answer_length_penalty(lengths: Sequence[float], reference_lengths: Sequence[float],
                          lam: float = DEFAULT_LAMBDA) -> list[float]:
    r"""Method 1 for ONE group.

    .. math:: r_i = -\lambda \frac{|o_i - o^{gt}_i|}{\max_j |o_j - o^{gt}_j|}

    and 0 for the whole group when the maximum deviation is 0. The completion farthest from its
    reference length gets :math:`-\lambda`; one of exactly the reference length gets 0.
    """
    if len(lengths) != len(reference_lengths):
        raise ValueError(f"reference_lengths has {len(reference_lengths)} entries but lengths has {len(lengths)}")
    deviations = [abs(float(o) - float(g)) for o, g in zip(lengths, reference_lengths)]
    largest = max(deviations, default=0.0)
    if not largest > 0 or not math.isfinite(largest):
        return [0.0] * len(deviations)
    return [-lam * d / largest for d in deviations]


def answer_length_reward(completions: Sequence, completion_ids: Sequence | None = None,
                         reference_length: Sequence | None = None, prompts: Sequence | None = None,
                         question_id: Sequence | None = None, lam: float = DEFAULT_LAMBDA,
                         **kwargs: Any) -> list[float]:
    r"""Method 1 as a TRL reward: ``answer_length_penalty`` applied to each prompt's group.

    ``reference_length`` is the dataset column of reference-solution token counts (``data.py``).
    """
    if reference_length is None:
        raise ValueError("answer_length_reward needs the reference_length dataset column")
    lengths = _completion_lengths(completions, completion_ids)
    _check_lengths(completions, reference_length=reference_length, prompts=prompts, question_id=question_id)
    keys = group_keys(len(completions), prompts, question_id)
    return per_group(functools.partial(answer_length_penalty, lam=lam), keys,
                     lengths=lengths, reference_lengths=reference_length)


# --------------------------------------------------------------------------------------------------
# Method 2: excess over the group's shortest correct completion, scaled by the group's accuracy
# --------------------------------------------------------------------------------------------------

def group_length_penalty(lengths: Sequence[float], correct: Sequence[bool],
                         lam: float = DEFAULT_LAMBDA) -> list[float]:
    r"""Method 2 for ONE group.

    With :math:`o_{min}` the length of the shortest correct completion and :math:`c` the fraction of the
    group that is correct:

    .. math:: r_i = -\lambda \, c \, \frac{\max(0, o_i - o_{min})}{\max_j \max(0, o_j - o_{min})}

    and 0 for the whole group when nothing is correct or the largest excess is 0. The shortest correct
    completion gets 0; a group that is rarely right is penalised little, because there accuracy matters more
    than brevity.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"correct has {len(correct)} entries but lengths has {len(lengths)}")
    correct_lengths = [float(o) for o, ok in zip(lengths, correct) if ok]
    if not correct_lengths:
        return [0.0] * len(lengths)
    shortest = min(correct_lengths)
    accuracy = len(correct_lengths) / len(lengths)
    excess = [max(0.0, float(o) - shortest) for o in lengths]
    largest = max(excess)
    if not largest > 0 or not math.isfinite(largest):
        return [0.0] * len(lengths)
    return [-lam * accuracy * e / largest for e in excess]


def group_length_reward(completions: Sequence, answer: Sequence, completion_ids: Sequence | None = None,
                        prompts: Sequence | None = None, question_id: Sequence | None = None,
                        lam: float = DEFAULT_LAMBDA, **kwargs: Any) -> list[float]:
    r"""Method 2 as a TRL reward: ``group_length_penalty`` applied to each prompt's group."""
    lengths = _completion_lengths(completions, completion_ids)
    _check_lengths(completions, answer=answer, prompts=prompts, question_id=question_id)
    keys = group_keys(len(completions), prompts, question_id)
    correct = [is_correct(c, a) for c, a in zip(completions, answer)]
    return per_group(functools.partial(group_length_penalty, lam=lam), keys, lengths=lengths, correct=correct)


# --------------------------------------------------------------------------------------------------
# Methods: one registry entry per training method
# --------------------------------------------------------------------------------------------------

METHODS: dict[str, tuple[Callable[..., list[float]], ...]] = {
    "baseline": (format_reward, correctness_reward),
    "ans_len": (format_reward, correctness_reward, answer_length_reward),
    "group": (format_reward, correctness_reward, group_length_reward),
    "group_ans_len": (format_reward, correctness_reward, answer_length_reward, group_length_reward),
}


def reward_functions(method: str, **params: Any) -> list[Callable[..., list[float]]]:
    """The reward functions of a method, each configured with the ``params`` it accepts (e.g. ``lam=0.3``).

    A parameter that no function of the method accepts is an error, so a typo cannot be silently ignored.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    functions = METHODS[method]
    accepted = {name for f in functions for name in inspect.signature(f).parameters} - {"kwargs"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"method {method!r} takes no parameter(s) {unknown}")
    result = []
    for function in functions:
        own = {k: v for k, v in params.items() if k in inspect.signature(function).parameters}
        result.append(configured(function, **own) if own else function)
    return result
