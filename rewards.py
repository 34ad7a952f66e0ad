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

Literature rewards (Kimi k1.5, GRPO-LEAD, L1-Exact, DAPO's overlong punishment, Arora & Zanette) follow the
study's methods with the same contract; their defaults are set against the same scale.

Scoring contract (``extract_answer``, ``parse_number``, ``is_correct``; evaluation uses the same functions).

- The text scored is the completion string, or in a chat-format completion (a list of messages) the
  concatenated content of its ``assistant`` messages only: an ``<answer>`` in a system, user or tool turn, or
  in a message without a role, is not the model's answer.
- The answer is the text between the last ``<answer>`` and the first ``</answer>`` after it; none without both.
- Its value is its LAST number, after removing ``$``, ``%`` and ``,`` (so ``1,234`` is 1234 and ``3,5`` is 35):
  ``<answer>first 3 then 18</answer>`` scores 18. Digits are ASCII only.
- A number may have a decimal part and an exponent: ``1e3`` is 1000 (not 3), ``2.5E-1`` is 0.25. A value that
  does not fit a float (``1e999``) is no number.
- Thousands may be grouped by a regular, no-break (U+00A0), thin (U+2009) or narrow no-break (U+202F) space:
  ``1 000`` is 1000 (not 0). Grouping needs groups of exactly three digits (``1 0000`` is the numbers 1 and
  0000, so 0).
- ``-`` and the Unicode minus U+2212 are a minus sign only when they are not preceded by a number (whitespace in
  between allowed): ``-7`` and ``x = −7`` are -7, but a hyphen between two numbers is an operator or a range,
  so the last number stands alone: ``3-5`` scores 5 (never -5) and ``2024-42`` scores 42, as ``2024 - 42``
  would. Scoring the last operand is the same rule as ``first 3 then 18``; only a bare final number is
  reliably right, and a sign borrowed from an operator would turn a range or a date into a negative answer.
  Other dashes (en dash, em dash) are never signs.
- Correct means that value equals the gold number (after ``####`` in a GSM8K solution) within ``TOLERANCE``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import runtime

CORRECT_REWARD = 2.0
FORMAT_REWARD = 0.5
DEFAULT_LAMBDA = 0.5
TOLERANCE = 1e-6

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = ("<reasoning>", "</reasoning>", _ANSWER_OPEN, _ANSWER_CLOSE)
_FORMAT = re.compile(r"<reasoning>(.*)</reasoning>\s*<answer>(.*)</answer>", re.DOTALL)
# ASCII digits only: a model writing Arabic-Indic or full-width digits is not giving a GSM8K answer.
# A number: digits with an optional decimal part (or a bare decimal part), then an optional exponent; the
# sign, "-" or the Unicode minus, is captured apart because it is a sign only when no number precedes it.
_NUMBER = re.compile(r"(?P<sign>[-\u2212])?(?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
# Thousands grouped by a regular, no-break, thin or narrow no-break space, in groups of exactly three digits.
_SPACE_GROUPED = re.compile(r"(?<![0-9.])[0-9]{1,3}(?:[ \u00a0\u2009\u202f][0-9]{3})+(?![0-9])")
_GROUP_SPACES = re.compile(r"[ \u00a0\u2009\u202f]")
_DIGITS = frozenset("0123456789")


# --------------------------------------------------------------------------------------------------
# Scoring contract (shared with evaluation.py)
# --------------------------------------------------------------------------------------------------

def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of the ``assistant`` messages of a conversational
    completion (other roles, and messages without one, are not the model's answer)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        is_assistant = completion.get("role") == "assistant"
        return content if is_assistant and isinstance(content, str) else ""
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
    """The last number in ``text`` after removing ``$``, ``,`` and ``%``; None when there is no number.

    Exponents count (``1e3`` is 1000), space-grouped thousands are joined (``1 000`` is 1000), and ``-`` or
    U+2212 is a sign only when no number precedes it (``3-5`` is 5): see the scoring contract above.
    """
    if not isinstance(text, str):
        return None
    # Join space-grouped thousands before the commas go, so that "3, 100" stays the two numbers 3 and 100.
    joined = _SPACE_GROUPED.sub(lambda match: _GROUP_SPACES.sub("", match.group()), text)
    cleaned = joined.replace("$", "").replace(",", "").replace("%", "")
    matches = list(_NUMBER.finditer(cleaned))
    if not matches:
        return None
    last = matches[-1]
    value = float(last.group("number"))
    # A hyphen right after a number (spaces allowed) is an operator or a range ("3-5", "2024-42"), not a sign.
    if last.group("sign") and cleaned[:last.start()].rstrip()[-1:] not in _DIGITS:
        value = -value
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


def _matches_gold(predicted: float | None, answer: Any) -> bool:
    gold = gold_number(answer)
    return predicted is not None and gold is not None and abs(predicted - gold) <= TOLERANCE


def is_correct(text: Any, answer: Any) -> bool:
    """The extracted answer's last number equals the gold number within ``TOLERANCE``."""
    return _matches_gold(parse_number(extract_answer(text)), answer)


def lenient_answer(text: Any) -> float | None:
    """Diagnostic only: the last number anywhere in the completion, tags or not."""
    return parse_number(completion_text(text))


def is_lenient_correct(text: Any, answer: Any) -> bool:
    """Diagnostic only: ``lenient_answer`` equals the gold number within ``TOLERANCE``."""
    return _matches_gold(lenient_answer(text), answer)


# A completion within this many tokens of its limit counts as out of limit (it was most likely cut off).
OUT_OF_LIMIT_MARGIN = 3


def is_out_of_limit(length: int, limit: int, margin: int = OUT_OF_LIMIT_MARGIN) -> bool:
    """True when a completion reached its token limit or ended within ``margin`` tokens of it."""
    return limit - length <= margin


def model_efficiency(reference_lengths: Sequence[float], lengths: Sequence[float],
                     correct: Sequence[bool]) -> float | None:
    r"""Reference tokens per generated token over the correctly answered completions :math:`C`:

    .. math:: \frac{\sum_{i \in C} o^{gt}_i}{\sum_{i \in C} o_i}

    (> 1: correct answers are shorter than the reference solutions). None when nothing is correct.
    """
    if not len(reference_lengths) == len(lengths) == len(correct):
        raise ValueError("reference_lengths, lengths and correct must have the same length")
    reference = sum(float(r) for r, ok in zip(reference_lengths, correct) if ok)
    generated = sum(float(n) for n, ok in zip(lengths, correct) if ok)
    return reference / generated if generated > 0 else None


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


def grouped_by_correctness(penalty: Callable[..., list[float]], reward_name: str, completions: Sequence,
                           answer: Sequence | None, completion_ids: Sequence | None, prompts: Sequence | None,
                           question_id: Sequence | None) -> list[float]:
    """Body shared by the group rewards that need correctness: ``penalty(lengths=..., correct=...)`` per group."""
    lengths = _completion_lengths(completions, completion_ids)
    if answer is None:
        raise ValueError(f"{reward_name} needs the answer dataset column to know which completions are correct")
    _check_lengths(completions, answer=answer, prompts=prompts, question_id=question_id)
    correct = [is_correct(c, a) for c, a in zip(completions, answer)]
    return per_group(penalty, group_keys(len(completions), prompts, question_id), lengths=lengths, correct=correct)


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
    return grouped_by_correctness(functools.partial(group_length_penalty, lam=lam), "group_length_reward",
                                  completions, answer, completion_ids, prompts, question_id)


# --------------------------------------------------------------------------------------------------
# Literature length rewards
#
# Same contract as methods 1 and 2: a TRL signature, lengths in tokens from ``completion_ids``, groups by
# ``question_id`` or prompt (never by position), the formula and its source in the docstring. Each has a
# one-group (or one-completion) function that holds the formula, and a TRL wrapper that applies it.
# Every default is set against our scale, CORRECT_REWARD = 2.0, where the papers use a correctness of 1.
# --------------------------------------------------------------------------------------------------

KIMI_WEIGHT = 1.0
GRPO_LEAD_ALPHA = 0.05
GRPO_LEAD_INCORRECT = 0.0
GRPO_LEAD_EPSILON = 1e-6
L1_ALPHA = 0.003
DAPO_MAX_COMPLETION_LENGTH = 512
DAPO_CACHE_FRACTION = 0.2
EFFICIENT_ALPHA = 0.2
EFFICIENT_EPSILON = 1e-7


def _same_size(lengths: Sequence, correct: Sequence) -> None:
    if len(lengths) != len(correct):
        raise ValueError(f"correct has {len(correct)} entries but lengths has {len(lengths)}")


def _mean_std(values: Sequence[float], ddof: int) -> tuple[float, float]:
    # fsum is exact, so the statistics (and the rewards) do not depend on the order of the batch.
    mean = math.fsum(values) / len(values)
    if len(values) <= ddof:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - ddof))


# --- Kimi k1.5 -------------------------------------------------------------------------------------

def kimi_length_for_group(lengths: Sequence[float], correct: Sequence[bool],
                          weight: float = KIMI_WEIGHT) -> list[float]:
    r"""Kimi k1.5 length reward for ONE group (Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement Learning
    with LLMs", the length penalty of its RL section), times ``weight``.

    With :math:`o_{min}` and :math:`o_{max}` the shortest and longest completion of the group (correct or not):

    .. math:: \lambda_i = 0.5 - \frac{o_i - o_{min}}{o_{max} - o_{min}}, \qquad
              r_i = w \cdot \begin{cases} \lambda_i & \text{correct} \\ \min(0, \lambda_i) & \text{incorrect}
              \end{cases}

    and 0 for the whole group when every length is equal. The shortest correct completion gets
    :math:`+0.5w`, the longest completion :math:`-0.5w`; an incorrect answer is never rewarded for being short.

    Default ``weight = 1.0`` keeps the paper's values in :math:`[-0.5, 0.5]`: the largest penalty, -0.5, equals
    ``DEFAULT_LAMBDA``, the largest penalty of one study method, so Kimi and methods 1 and 2 press on length
    equally hard. A correct answer still earns at least 2.0 - 0.5 = 1.5 against at most 0 for an incorrect one.
    (The paper adds it to a 0/1 correctness; ``weight = CORRECT_REWARD`` reproduces that ratio. Its warm-up,
    a first phase trained without the length reward, is not part of the reward.)
    """
    _same_size(lengths, correct)
    if not lengths:
        return []
    shortest, longest = min(float(o) for o in lengths), max(float(o) for o in lengths)
    spread = longest - shortest
    if not spread > 0 or not math.isfinite(spread):
        return [0.0] * len(lengths)
    values = []
    for o, ok in zip(lengths, correct):
        lam = 0.5 - (float(o) - shortest) / spread
        values.append(weight * (lam if ok else min(0.0, lam)))
    return values


def kimi_length_reward(completions: Sequence, answer: Sequence | None = None,
                       completion_ids: Sequence | None = None, prompts: Sequence | None = None,
                       question_id: Sequence | None = None, weight: float = KIMI_WEIGHT,
                       **kwargs: Any) -> list[float]:
    r"""Kimi k1.5 length reward as a TRL reward: ``kimi_length_for_group`` per prompt group (not per batch,
    as the paper defines it over the k responses to one problem). Added to ``correctness_reward``."""
    return grouped_by_correctness(functools.partial(kimi_length_for_group, weight=weight), "kimi_length_reward",
                                  completions, answer, completion_ids, prompts, question_id)


# --- GRPO-LEAD -------------------------------------------------------------------------------------

def grpo_lead_for_group(lengths: Sequence[float], correct: Sequence[bool], alpha: float = GRPO_LEAD_ALPHA,
                        incorrect_reward: float = GRPO_LEAD_INCORRECT) -> list[float]:
    r"""GRPO-LEAD length-dependent accuracy reward for ONE group (Zhang & Zuo 2025, "GRPO-LEAD: A
    Difficulty-Aware Reinforcement Learning Approach for Concise Mathematical Reasoning", EMNLP 2025).

    With :math:`\mu` and :math:`\sigma` the mean and sample standard deviation (n - 1, as in the authors'
    code) of the lengths of the group's CORRECT completions:

    .. math:: z_i = \frac{o_i - \mu}{\sigma + \epsilon}, \qquad
              r_i = \begin{cases} C \, e^{-\alpha z_i} & \text{correct} \\ r_{wrong} & \text{incorrect}
              \end{cases}

    with :math:`C` = ``CORRECT_REWARD`` and :math:`\epsilon = 10^{-6}`. This REPLACES ``correctness_reward``:
    a correct answer of average length earns exactly ``CORRECT_REWARD``, shorter ones more, longer ones less;
    a lone correct answer (:math:`\sigma = 0`) has :math:`z = 0`.

    Defaults. ``alpha = 0.05`` is the authors' value. In a group of 8 :math:`|z| \le 7/\sqrt{8} \approx 2.5`,
    so a correct answer earns between :math:`2e^{-0.12} \approx 1.77` and 2.26: a length spread of about 0.5,
    the same as ``DEFAULT_LAMBDA``, and never near an incorrect answer. ``incorrect_reward = 0.0`` is what
    ``correctness_reward`` gives, so the method differs from the baseline only by the length term; the
    paper's explicit penalty for wrong answers (-1 against a correct 1) is ``incorrect_reward = -CORRECT_REWARD``.
    """
    _same_size(lengths, correct)
    correct_lengths = [float(o) for o, ok in zip(lengths, correct) if ok]
    if not correct_lengths:
        return [float(incorrect_reward)] * len(lengths)
    mean, std = _mean_std(correct_lengths, ddof=1)
    return [CORRECT_REWARD * math.exp(-alpha * (float(o) - mean) / (std + GRPO_LEAD_EPSILON)) if ok
            else float(incorrect_reward) for o, ok in zip(lengths, correct)]


def grpo_lead_reward(completions: Sequence, answer: Sequence | None = None,
                     completion_ids: Sequence | None = None, prompts: Sequence | None = None,
                     question_id: Sequence | None = None, alpha: float = GRPO_LEAD_ALPHA,
                     incorrect_reward: float = GRPO_LEAD_INCORRECT, **kwargs: Any) -> list[float]:
    r"""GRPO-LEAD's length-standardised correctness as a TRL reward: ``grpo_lead_for_group`` per prompt group.

    It replaces ``correctness_reward`` in the ``grpo_lead`` method (only the reward; GRPO-LEAD's
    difficulty-aware advantage reweighting is not part of it)."""
    penalty = functools.partial(grpo_lead_for_group, alpha=alpha, incorrect_reward=incorrect_reward)
    return grouped_by_correctness(penalty, "grpo_lead_reward", completions, answer, completion_ids, prompts,
                                  question_id)


# --- L1 (exact) ------------------------------------------------------------------------------------

def l1_exact_penalty(length: float, target: float, alpha: float = L1_ALPHA) -> float:
    r"""L1's length term for ONE completion (Aggarwal & Welleck 2025, "L1: Controlling How Long A Reasoning
    Model Thinks With Reinforcement Learning", LCPO-Exact):

    .. math:: r_i = -\alpha \, |o_i - n_{target}|

    Added to correctness it is the paper's :math:`\mathbb{1}[\text{correct}] - \alpha |n_{gold} - n_y|`.

    Default ``alpha = 0.003`` per token (the paper's 0.0003 is for targets of 100 to 4000 tokens; GSM8K
    solutions are about 110): 100 tokens off target, about one whole solution, costs 0.3. At the study's
    512-token limit two completions' penalties differ by at most 512 x 0.003 = 1.54 < ``CORRECT_REWARD``,
    so a correct answer always earns more than a wrong one.
    """
    return -alpha * abs(float(length) - float(target))


def l1_exact_reward(completions: Sequence, completion_ids: Sequence | None = None,
                    target_length: Sequence | None = None, alpha: float = L1_ALPHA,
                    **kwargs: Any) -> list[float]:
    r"""L1-Exact as a TRL reward: ``l1_exact_penalty`` of each completion against its question's target.

    ``target_length`` is a dataset column with one token target per question, e.g. from a length budget:
    ``data.training_dataset(tokenizer, budget="reference")`` (see ``budgets.py``). No grouping is needed:
    each completion is compared with its own target.
    """
    if target_length is None:
        raise ValueError("l1_exact_reward needs the target_length dataset column: build the training set with "
                         "data.training_dataset(..., budget=<a budgets.KINDS entry>)")
    lengths = _completion_lengths(completions, completion_ids)
    _check_lengths(completions, target_length=target_length)
    for index, target in enumerate(target_length):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) \
                or target < 0:
            raise ValueError(f"target_length[{index}] must be a non-negative number of tokens, got {target!r}")
    return _finite([l1_exact_penalty(o, t, alpha) for o, t in zip(lengths, target_length)])


# --- DAPO soft overlong punishment -----------------------------------------------------------------

def dapo_overlong_penalty(length: float, max_completion_length: int = DAPO_MAX_COMPLETION_LENGTH,
                          cache_fraction: float = DAPO_CACHE_FRACTION) -> float:
    r"""DAPO's soft overlong punishment for ONE completion (Yu et al. 2025, "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale", eq. 13), with :math:`L_{max}` = ``max_completion_length`` and
    the punishment interval :math:`L_{cache}` = ``cache_fraction`` :math:`\cdot L_{max}`:

    .. math:: r_i = \begin{cases} 0 & o_i \le L_{max} - L_{cache} \\
              \frac{(L_{max} - L_{cache}) - o_i}{L_{cache}} & L_{max} - L_{cache} < o_i \le L_{max} \\
              -1 & o_i > L_{max} \end{cases}

    Defaults. ``max_completion_length`` should be the training's generation limit (pass it), so that a
    truncated completion gets -1; 512 is the study's. ``cache_fraction = 0.2`` is the paper's
    :math:`L_{cache}/L_{max}` = 4096/20480 (so 102.4 of 512 tokens). The -1 is the paper's: there it is half
    the gap between a correct (+1) and a wrong (-1) answer, here half of ``CORRECT_REWARD`` = 2.0, the same
    proportion, so a truncated correct answer still beats any wrong one.
    """
    if not max_completion_length > 0:
        raise ValueError(f"max_completion_length must be positive, got {max_completion_length}")
    if not 0 < cache_fraction <= 1:
        raise ValueError(f"cache_fraction must be in (0, 1], got {cache_fraction}")
    cache = cache_fraction * max_completion_length
    soft_limit = max_completion_length - cache
    length = float(length)
    if length <= soft_limit:
        return 0.0
    if length <= max_completion_length:
        # Clamped: (soft_limit - L_max) / cache may round to just below -1.
        return max(-1.0, (soft_limit - length) / cache)
    return -1.0


def dapo_overlong_reward(completions: Sequence, completion_ids: Sequence | None = None,
                         max_completion_length: int = DAPO_MAX_COMPLETION_LENGTH,
                         cache_fraction: float = DAPO_CACHE_FRACTION, **kwargs: Any) -> list[float]:
    r"""DAPO's soft overlong punishment as a TRL reward: ``dapo_overlong_penalty`` of each completion.
    It only punishes completions near the limit; it is added to correctness."""
    lengths = _completion_lengths(completions, completion_ids)
    return _finite([dapo_overlong_penalty(o, max_completion_length, cache_fraction) for o in lengths])


# --- Efficient reasoning (Arora & Zanette) ---------------------------------------------------------

def efficient_length_penalty(lengths: Sequence[float], correct: Sequence[bool],
                             alpha: float = EFFICIENT_ALPHA) -> list[float]:
    r"""The length term of Arora & Zanette 2025 ("Training Language Models to Reason Efficiently") for ONE
    group. The paper's reward is

    .. math:: r_i = \mathbb{1}[\text{correct}_i] \left(1 - \alpha \, \sigma\!\left(
              \frac{o_i - \text{mean}_{correct}}{\text{std}_{correct} + \epsilon}\right)\right)

    with mean and (population, as in the authors' code) standard deviation over the group's CORRECT
    completions, :math:`\sigma` the logistic function and :math:`\epsilon = 10^{-7}`. In our units it is
    ``correctness_reward`` plus this term:

    .. math:: p_i = -C \, \alpha \, \mathbb{1}[\text{correct}_i] \, \sigma(z_i)

    with :math:`C` = ``CORRECT_REWARD``. Incorrect completions get 0; a lone correct one :math:`-C\alpha/2`.

    Default ``alpha = 0.2``, one of the paper's values (0.05 to 0.4): the term lies in :math:`(-0.4, 0]`,
    just under ``DEFAULT_LAMBDA``, so a correct answer always earns more than 1.6.
    """
    _same_size(lengths, correct)
    correct_lengths = [float(o) for o, ok in zip(lengths, correct) if ok]
    if not correct_lengths:
        return [0.0] * len(lengths)
    mean, std = _mean_std(correct_lengths, ddof=0)
    values = []
    for o, ok in zip(lengths, correct):
        if not ok:
            values.append(0.0)
            continue
        z = (float(o) - mean) / (std + EFFICIENT_EPSILON)
        # Stable logistic: exp of a large positive z would overflow.
        sigmoid = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
        values.append(-CORRECT_REWARD * alpha * sigmoid)
    return values


def efficient_length_reward(completions: Sequence, answer: Sequence | None = None,
                            completion_ids: Sequence | None = None, prompts: Sequence | None = None,
                            question_id: Sequence | None = None, alpha: float = EFFICIENT_ALPHA,
                            **kwargs: Any) -> list[float]:
    r"""Arora & Zanette's length term as a TRL reward: ``efficient_length_penalty`` per prompt group.
    With ``correctness_reward`` it gives ``CORRECT_REWARD`` times the paper's reward."""
    return grouped_by_correctness(functools.partial(efficient_length_penalty, alpha=alpha), "efficient_length_reward",
                                  completions, answer, completion_ids, prompts, question_id)


# --------------------------------------------------------------------------------------------------
# Methods: one registry entry per training method
# --------------------------------------------------------------------------------------------------

METHODS: dict[str, tuple[Callable[..., list[float]], ...]] = {
    "baseline": (format_reward, correctness_reward),
    "ans_len": (format_reward, correctness_reward, answer_length_reward),
    "group": (format_reward, correctness_reward, group_length_reward),
    "group_ans_len": (format_reward, correctness_reward, answer_length_reward, group_length_reward),
    # Literature rewards. Each adds its length term to format + correctness, except GRPO-LEAD, whose
    # length-standardised correctness replaces plain correctness.
    "kimi": (format_reward, correctness_reward, kimi_length_reward),
    "grpo_lead": (format_reward, grpo_lead_reward),
    "l1_exact": (format_reward, correctness_reward, l1_exact_reward),
    "dapo_overlong": (format_reward, correctness_reward, dapo_overlong_reward),
    "efficient_reasoning": (format_reward, correctness_reward, efficient_length_reward),
}


def reward_functions(method: str, **params: Any) -> list[Callable[..., list[float]]]:
    """The reward functions of a method, each configured with the ``params`` it accepts (e.g. ``lam=0.3``).

    ``params`` are checked by ``check_params`` first: a parameter that no function of the method accepts (a
    typo, a dataset column), or a value of the wrong type or out of range, is a ``runtime.ConfigError``.
    """
    params = check_params(method, params)
    result = []
    for function in METHODS[method]:
        own = {k: v for k, v in params.items() if k in inspect.signature(function).parameters}
        result.append(configured(function, **own) if own else function)
    return result


# Arguments that TRL itself passes to every reward function (not dataset columns, not settings).
_TRL_ARGUMENTS = frozenset({"completions", "prompts", "completion_ids", "kwargs"})


def _method_signature(method: str) -> dict[str, inspect.Parameter]:
    if method not in METHODS:
        raise runtime.ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    found: dict[str, inspect.Parameter] = {}
    for function in METHODS[method]:
        for name, parameter in inspect.signature(function).parameters.items():
            if name not in _TRL_ARGUMENTS:
                found.setdefault(name, parameter)
    return found


def method_parameters(method: str) -> dict[str, Any]:
    """The settings a method accepts in ``reward_functions``, with their defaults (e.g. ``{"lam": 0.5}``).

    Settings are the keyword parameters with a non-None default; lets a CLI or notebook pass only the
    settings that a method takes (``reward_functions`` rejects the others).
    """
    return {name: p.default for name, p in _method_signature(method).items()
            if p.default is not inspect.Parameter.empty and p.default is not None}


def method_columns(method: str) -> set[str]:
    """The dataset columns a method's rewards read (``answer``, ``reference_length``, ``target_length``...).

    ``question_id`` is left out: it is optional (groups fall back to the prompt).
    """
    settings = method_parameters(method)
    return {name for name in _method_signature(method) if name not in settings and name != "question_id"}


# --------------------------------------------------------------------------------------------------
# Reward parameters: name, type and range checked before any model loads
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamRange:
    """The numbers a reward parameter may take, from ``low`` to ``high`` (each end open or closed), and why."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# Above this alpha, GRPO-LEAD's exp(-alpha * z) could overflow. With a sample standard deviation a z-score
# is bounded by |z| <= (n - 1) / sqrt(n) < sqrt(n) (Samuelson's inequality; the epsilon only shrinks it), and
# math.exp overflows above ln(max float) = 709.78. alpha <= 10 keeps alpha * |z| <= 709.78 for every group of
# up to 5,000 completions per prompt, far beyond any num_generations (the authors' alpha is 0.05).
GRPO_LEAD_ALPHA_MAX = 10.0

_PENALTY_NOT_BONUS = "a negative value would turn the length penalty into a bonus"

# Every setting of every reward function in METHODS, with the range its formula needs (a test checks that
# none is missing). Ints are accepted for floats; an int default (a token count) requires an int.
PARAM_RANGES: dict[Callable[..., list[float]], dict[str, ParamRange]] = {
    answer_length_reward: {"lam": ParamRange(0.0, why=_PENALTY_NOT_BONUS)},
    group_length_reward: {"lam": ParamRange(0.0, why=_PENALTY_NOT_BONUS)},
    kimi_length_reward: {"weight": ParamRange(0.0, why="a negative weight would reward the longest answers")},
    grpo_lead_reward: {
        "alpha": ParamRange(0.0, GRPO_LEAD_ALPHA_MAX, why="a negative alpha rewards longer correct answers, and "
                            f"above {GRPO_LEAD_ALPHA_MAX:g} exp(-alpha * z) can overflow"),
        # A correct answer earns C * exp(-alpha * z) > 0, which can come arbitrarily close to 0: only a
        # non-positive value for a wrong answer keeps every correct answer above every wrong one.
        "incorrect_reward": ParamRange(high=0.0, why="a wrong answer must never earn more than a correct one"),
    },
    l1_exact_reward: {"alpha": ParamRange(0.0, why="a negative alpha would reward missing the target")},
    dapo_overlong_reward: {
        "max_completion_length": ParamRange(1.0, why="the limit is a number of tokens"),
        "cache_fraction": ParamRange(0.0, 1.0, low_open=True, why="the punishment interval is part of the limit"),
    },
    # The paper's reward for a correct answer, 1 - alpha * sigmoid(z), stays above a wrong answer's 0 only
    # when alpha < 1 (sigmoid can round to 1).
    efficient_length_reward: {"alpha": ParamRange(0.0, 1.0, high_open=True,
                                                  why="alpha >= 1 can score a correct answer as low as a wrong one")},
}


def _check_value(method: str, name: str, value: Any, default: Any, ranges: list[ParamRange]) -> int | float:
    wants_int = isinstance(default, int) and not isinstance(default, bool)
    kind = "an integer" if wants_int else "a finite number"
    allowed = f"{name} takes {kind} {' and '.join(dict.fromkeys(str(r) for r in ranges))} (default {default!r})"
    where = f"method {method!r}: reward parameter {name}={value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if wants_int else numbers.Real):
        raise runtime.ConfigError(f"{where} is not {kind}; {allowed}")
    number = int(value) if wants_int else float(value)
    if not math.isfinite(number):
        raise runtime.ConfigError(f"{where} is not {kind}; {allowed}")
    for allowed_range in ranges:
        if number not in allowed_range:
            raise runtime.ConfigError(f"{where} is out of range; {allowed}: {allowed_range.why}")
    return number


def check_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The reward parameters ``params`` of ``method``, checked and normalised (ints become floats where the
    default is a float); loads nothing, so a CLI or notebook can call it before any model.

    Each name must be a setting of one of the method's reward functions (``method_parameters``); a dataset
    column such as ``answer`` is not one. Each value must be a finite number (an integer where the default is
    one, e.g. a token count; never a bool or a string) inside every ``PARAM_RANGES`` entry of the functions
    that take it. Anything else is a ``runtime.ConfigError`` of one line naming the method, the parameter,
    the value and what is allowed.
    """
    settings = method_parameters(method)  # raises ConfigError for an unknown method
    checked: dict[str, Any] = {}
    for name, value in params.items():
        if name not in settings:
            offered = f"its reward parameters are {sorted(settings)}" if settings else "it has no reward parameters"
            if name in _method_signature(method):
                raise runtime.ConfigError(f"method {method!r}: {name} is a dataset column, not a reward "
                                          f"parameter; {offered}")
            raise runtime.ConfigError(f"method {method!r} takes no parameter {name!r}; {offered}")
        ranges = [PARAM_RANGES[f][name] for f in METHODS[method] if name in inspect.signature(f).parameters]
        checked[name] = _check_value(method, name, value, settings[name], ranges)
    return checked


def effective_params(method: str, params: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    """The reward parameters a run of ``method`` trains with, checked by ``check_params``.

    ``settings`` are the run's own fields that are also reward parameters (``lam``, and the generation limit
    ``max_completion_length`` that DAPO's punishment must use); each applies when the method takes it and is
    dropped otherwise (``lam`` means nothing to ``kimi``). ``params`` are the extra ``reward_params``.

    One value per parameter: a setting that ``params`` gives again with a different value is a
    ``runtime.ConfigError`` naming both (``lam=0.5`` with ``reward_params`` ``lam=0.1``), so what trains is
    always what the run's banner and record show. The same value given twice is accepted.
    """
    known = {name for m in METHODS for name in method_parameters(m)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"effective_params: {unknown} are not reward parameters of any method")
    taken = method_parameters(method)
    own = check_params(method, {name: value for name, value in settings.items() if name in taken})
    extra = check_params(method, params)
    for name in sorted(set(own) & set(extra)):
        if own[name] != extra[name]:
            raise runtime.ConfigError(
                f"method {method!r}: {name} is set twice, {name}={settings[name]!r} and reward_params "
                f"{name}={params[name]!r}; set it in one place")
    return {**own, **extra}
