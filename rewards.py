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


# Arguments that TRL itself passes to every reward function (not dataset columns, not settings).
_TRL_ARGUMENTS = frozenset({"completions", "prompts", "completion_ids", "kwargs"})


def _method_signature(method: str) -> dict[str, inspect.Parameter]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
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
