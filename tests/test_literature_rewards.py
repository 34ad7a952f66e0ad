"""rewards.py, literature section: Kimi k1.5, GRPO-LEAD, L1-Exact, DAPO overlong punishment, Arora & Zanette.

Each test states what the paper says a completion gets; properties check ranges, batch-order invariance and
that interleaved groups score as separate calls.
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards
from rewards import (
    CORRECT_REWARD,
    dapo_overlong_penalty,
    dapo_overlong_reward,
    efficient_length_penalty,
    efficient_length_reward,
    grpo_lead_for_group,
    grpo_lead_reward,
    kimi_length_for_group,
    kimi_length_reward,
    l1_exact_penalty,
    l1_exact_reward,
)
from runtime import ConfigError

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
WRONG = "<reasoning>\n2 + 2 = 5\n</reasoning>\n<answer>\n5\n</answer>"
SOLUTION = "Two and two make four.\n#### 4"
LITERATURE_METHODS = ("kimi", "grpo_lead", "l1_exact", "dapo_overlong", "efficient_reasoning")


def ids(n: int) -> list[int]:
    return list(range(n))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- Kimi k1.5 ----------------------------------------------------------------------------------------

def test_kimi_the_shortest_correct_answer_gets_plus_half_and_the_longest_minus_half():
    assert kimi_length_for_group([100, 150, 200], [True, True, True]) == [0.5, 0.0, -0.5]


def test_kimi_a_short_incorrect_answer_gets_no_bonus_but_a_long_one_is_penalised():
    # lambda = 0.5, 0, -0.5; incorrect answers get min(0, lambda).
    assert kimi_length_for_group([100, 150, 200], [False, False, False]) == [0.0, 0.0, -0.5]
    assert kimi_length_for_group([100, 150, 200], [False, True, False]) == [0.0, 0.0, -0.5]


def test_kimi_lengths_are_ranked_against_all_completions_correct_or_not():
    # The incorrect 50-token answer sets min_len: the 100-token correct answer is no longer the shortest.
    assert kimi_length_for_group([50, 100, 250], [False, True, True]) == [0.0, 0.25, -0.5]


def test_kimi_a_group_of_equal_lengths_gets_nothing():
    assert kimi_length_for_group([120, 120, 120], [True, False, True]) == [0.0, 0.0, 0.0]
    assert kimi_length_for_group([], []) == []


def test_kimi_weight_scales_the_reward():
    assert kimi_length_for_group([10, 20], [True, True], weight=CORRECT_REWARD) == [1.0, -1.0]


def test_kimi_reward_is_per_group_not_per_batch():
    # Group "a" spans 10..20 tokens, group "b" 100..300: each group's extremes get exactly +-0.5.
    values = kimi_length_reward([GOOD] * 4, answer=[SOLUTION] * 4,
                                completion_ids=[ids(10), ids(20), ids(100), ids(300)], prompts=["a", "a", "b", "b"])
    assert values == [0.5, -0.5, 0.5, -0.5]


def test_kimi_reward_uses_the_correctness_contract():
    values = kimi_length_reward([WRONG, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(10), ids(30)],
                                question_id=[3, 3])
    assert values == [0.0, -0.5]


# --- GRPO-LEAD ----------------------------------------------------------------------------------------

def test_grpo_lead_a_correct_answer_of_the_mean_correct_length_earns_the_plain_correct_reward():
    values = grpo_lead_for_group([80, 100, 120], [True, True, True], alpha=0.05)
    assert values[1] == pytest.approx(CORRECT_REWARD)


def test_grpo_lead_shorter_correct_answers_earn_more_by_exp_of_minus_alpha_z():
    # Two correct answers: mean 100, sample std 20 * sqrt(2), so z = -+ 1/sqrt(2).
    shorter, longer = grpo_lead_for_group([80, 120], [True, True], alpha=0.05)
    assert shorter == pytest.approx(CORRECT_REWARD * math.exp(0.05 / math.sqrt(2)))
    assert longer == pytest.approx(CORRECT_REWARD * math.exp(-0.05 / math.sqrt(2)))


def test_grpo_lead_statistics_come_from_the_correct_answers_only():
    with_wrong = grpo_lead_for_group([80, 120, 5, 900], [True, True, False, False], alpha=0.05)
    alone = grpo_lead_for_group([80, 120], [True, True], alpha=0.05)
    assert with_wrong[:2] == alone


def test_grpo_lead_incorrect_answers_get_the_configured_value_whatever_their_length():
    assert grpo_lead_for_group([10, 50, 90], [False, True, False])[0::2] == [0.0, 0.0]
    # The paper's explicit penalty: -1 against a correct 1, i.e. -CORRECT_REWARD here.
    assert grpo_lead_for_group([10, 50, 90], [False, True, False], incorrect_reward=-CORRECT_REWARD)[0::2] \
        == [-CORRECT_REWARD, -CORRECT_REWARD]


def test_grpo_lead_a_lone_correct_answer_earns_the_plain_correct_reward():
    assert grpo_lead_for_group([10, 50, 90], [False, True, False])[1] == pytest.approx(CORRECT_REWARD)


def test_grpo_lead_replaces_correctness_in_its_method():
    names = [f.__name__ for f in rewards.reward_functions("grpo_lead")]
    assert names == ["format_reward", "grpo_lead_reward"]
    values = grpo_lead_reward([GOOD, WRONG], answer=[SOLUTION] * 2, completion_ids=[ids(40), ids(10)],
                              prompts=["p", "p"])
    assert values == [pytest.approx(CORRECT_REWARD), 0.0]


# --- L1-Exact -----------------------------------------------------------------------------------------

def test_l1_a_completion_exactly_on_target_gets_no_penalty():
    assert l1_exact_penalty(150, 150) == 0.0


def test_l1_shorter_and_longer_than_the_target_cost_alpha_per_token():
    assert l1_exact_penalty(50, 150, alpha=0.005) == pytest.approx(-0.5)
    assert l1_exact_penalty(250, 150, alpha=0.005) == pytest.approx(-0.5)


def test_l1_with_correctness_is_the_papers_reward():
    functions = rewards.reward_functions("l1_exact", alpha=0.01)
    batch = dict(completions=[GOOD, WRONG], answer=[SOLUTION] * 2, completion_ids=[ids(120), ids(90)],
                 prompts=["p", "p"], target_length=[100, 100])
    totals = [sum(values) for values in zip(*(f(**batch) for f in functions))]
    format_ok = rewards.FORMAT_REWARD
    assert totals == [pytest.approx(format_ok + CORRECT_REWARD - 0.01 * 20), pytest.approx(format_ok - 0.01 * 10)]


def test_l1_each_completion_is_compared_with_its_own_questions_target():
    values = l1_exact_reward(["x", "x"], completion_ids=[ids(100), ids(100)], target_length=[100, 300], alpha=0.01)
    assert values == [0.0, pytest.approx(-2.0)]


def test_l1_needs_the_target_length_column_and_valid_targets():
    with pytest.raises(ValueError, match="target_length"):
        l1_exact_reward(["x"], completion_ids=[ids(3)])
    with pytest.raises(ValueError, match="target_length"):
        l1_exact_reward(["x", "y"], completion_ids=[ids(3), ids(4)], target_length=[5])
    for bad in (None, -1, float("nan"), "100"):
        with pytest.raises(ValueError, match=r"target_length\[0\]"):
            l1_exact_reward(["x"], completion_ids=[ids(3)], target_length=[bad])


# --- DAPO overlong punishment ----------------------------------------------------------------------

def test_dapo_no_punishment_up_to_the_expected_maximum():
    # L_max = 200 and L_cache = 0.2 * 200 = 40: the ramp starts after 160 tokens.
    assert dapo_overlong_penalty(0, 200, 0.2) == 0.0
    assert dapo_overlong_penalty(160, 200, 0.2) == 0.0


def test_dapo_the_punishment_ramps_linearly_through_the_cache():
    assert dapo_overlong_penalty(170, 200, 0.2) == pytest.approx(-0.25)
    assert dapo_overlong_penalty(180, 200, 0.2) == pytest.approx(-0.5)
    assert dapo_overlong_penalty(200, 200, 0.2) == pytest.approx(-1.0)


def test_dapo_an_overlong_completion_gets_minus_one():
    assert dapo_overlong_penalty(201, 200, 0.2) == -1.0
    assert dapo_overlong_penalty(10_000, 200, 0.2) == -1.0


def test_dapo_reward_uses_token_counts_and_the_configured_limit():
    values = dapo_overlong_reward(["x"] * 3, completion_ids=[ids(50), ids(90), ids(120)],
                                  max_completion_length=100, cache_fraction=0.2)
    assert values == [0.0, pytest.approx(-0.5), -1.0]


def test_dapo_rejects_a_cache_outside_the_limit_and_a_limit_below_one_token():
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="cache_fraction"):
            dapo_overlong_penalty(10, 200, fraction)
    with pytest.raises(ValueError, match="max_completion_length"):
        dapo_overlong_penalty(10, 0, 0.2)


# --- Arora & Zanette ------------------------------------------------------------------------------

def test_efficient_the_longer_correct_answer_loses_more_by_the_logistic_of_its_z():
    # Correct lengths 10 and 30: mean 20, population std 10, so z = -1 and +1.
    shorter, longer = efficient_length_penalty([10, 30], [True, True], alpha=0.2)
    assert shorter == pytest.approx(-CORRECT_REWARD * 0.2 * sigmoid(-1.0))
    assert longer == pytest.approx(-CORRECT_REWARD * 0.2 * sigmoid(1.0))


def test_efficient_incorrect_answers_get_nothing_and_do_not_move_the_statistics():
    values = efficient_length_penalty([10, 30, 500, 1], [True, True, False, False], alpha=0.2)
    assert values[2:] == [0.0, 0.0]
    assert values[:2] == efficient_length_penalty([10, 30], [True, True], alpha=0.2)


def test_efficient_a_correct_answer_at_the_mean_length_loses_half_of_alpha():
    assert efficient_length_penalty([70], [True], alpha=0.2) == [pytest.approx(-CORRECT_REWARD * 0.1)]


def test_efficient_with_correctness_is_correct_reward_times_the_papers_reward():
    functions = rewards.reward_functions("efficient_reasoning", alpha=0.4)
    batch = dict(completions=[GOOD, GOOD, WRONG], answer=[SOLUTION] * 3,
                 completion_ids=[ids(10), ids(30), ids(5)], question_id=[1, 1, 1])
    correctness_and_length = [sum(v[1:]) for v in zip(*(f(**batch) for f in functions))]
    paper = [1 - 0.4 * sigmoid(-1.0), 1 - 0.4 * sigmoid(1.0), 0.0]
    assert correctness_and_length == pytest.approx([CORRECT_REWARD * p for p in paper])


def test_efficient_reward_is_per_group():
    values = efficient_length_reward([GOOD] * 4, answer=[SOLUTION] * 4,
                                     completion_ids=[ids(10), ids(30), ids(100), ids(300)],
                                     prompts=["a", "a", "b", "b"], alpha=0.2)
    assert values[0] == pytest.approx(values[2]) and values[1] == pytest.approx(values[3])


# --- contract shared by all five -----------------------------------------------------------------------

TRL_REWARDS = (kimi_length_reward, grpo_lead_reward, l1_exact_reward, dapo_overlong_reward,
               efficient_length_reward)


@pytest.mark.parametrize("bad", [None, "", 17, {"no": "content"}, [None], "<answer>" * 10_000])
def test_bad_completions_never_crash_and_every_value_is_finite(bad):
    kwargs = dict(prompts=["p", "p"], completion_ids=[ids(3), ids(500)], answer=[SOLUTION] * 2,
                  target_length=[4, 4])
    for reward in TRL_REWARDS:
        values = reward([bad, GOOD], **kwargs)
        assert len(values) == 2 and all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_every_literature_reward_counts_tokens_and_checks_its_columns():
    for reward in TRL_REWARDS:
        with pytest.raises(ValueError, match="completion_ids is required"):
            reward([GOOD], answer=[SOLUTION], prompts=["p"], target_length=[1])
        with pytest.raises(ValueError, match="completion_ids"):
            reward([GOOD, GOOD], answer=[SOLUTION] * 2, prompts=["p", "p"], target_length=[1, 1],
                   completion_ids=[ids(1)])
    for reward in (kimi_length_reward, grpo_lead_reward, efficient_length_reward):
        with pytest.raises(ValueError, match="answer"):
            reward([GOOD], completion_ids=[ids(1)], prompts=["p"])
        with pytest.raises(ValueError, match="prompts"):
            reward([GOOD], answer=[SOLUTION], completion_ids=[ids(1)], prompts=["p", "q"])
        with pytest.raises(ValueError, match="question_id column"):
            reward([GOOD], answer=[SOLUTION], completion_ids=[ids(1)])
    with pytest.raises(ValueError, match="lengths"):
        kimi_length_for_group([1, 2], [True])


# --- properties ----------------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(min_value=0, max_value=600), min_size=1, max_size=12)


@given(lengths_st, st.data(), st.floats(0.0, 5.0))
def test_kimi_values_lie_in_plus_minus_half_weight_and_incorrect_ones_are_never_positive(lengths, data, weight):
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    values = kimi_length_for_group(lengths, correct, weight)
    assert all(-0.5 * weight - 1e-12 <= v <= 0.5 * weight + 1e-12 for v in values)
    assert all(v <= 0.0 for v, ok in zip(values, correct) if not ok)


@given(lengths_st, st.data(), st.floats(0.0, 1.0))
def test_among_correct_answers_shorter_never_earns_less(lengths, data, alpha):
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    pairs = [(o, ok) for o, ok in zip(lengths, correct)]
    for values in (kimi_length_for_group(lengths, correct), grpo_lead_for_group(lengths, correct, alpha),
                   efficient_length_penalty(lengths, correct, alpha)):
        scored = sorted((o, v) for (o, ok), v in zip(pairs, values) if ok)
        assert all(a[1] >= b[1] - 1e-9 for a, b in itertools.pairwise(scored))


@given(lengths_st, st.data(), st.floats(0.0, 1.0), st.floats(-3.0, 0.0))
def test_grpo_lead_correct_answers_earn_a_positive_reward_and_incorrect_ones_the_configured_value(
        lengths, data, alpha, incorrect):
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    for v, ok in zip(grpo_lead_for_group(lengths, correct, alpha, incorrect), correct):
        assert v > 0 if ok else v == incorrect


@given(lengths_st, st.data(), st.floats(0.0, 1.0))
def test_efficient_penalty_lies_between_minus_c_alpha_and_zero(lengths, data, alpha):
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    values = efficient_length_penalty(lengths, correct, alpha)
    assert all(-CORRECT_REWARD * alpha - 1e-12 <= v <= 0.0 for v in values)


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(1, 600), st.floats(0.01, 1.0))
def test_dapo_penalty_lies_in_minus_one_to_zero_and_never_rewards_a_longer_completion(a, b, max_length, fraction):
    short, long = sorted((a, b))
    p_short, p_long = (dapo_overlong_penalty(x, max_length, fraction) for x in (short, long))
    assert -1.0 <= p_long <= p_short <= 0.0


@given(st.integers(0, 1000), st.integers(0, 1000), st.floats(0.0, 1.0))
def test_l1_penalty_is_never_positive_and_symmetric_around_the_target(length, target, alpha):
    assert l1_exact_penalty(length, target, alpha) <= 0.0
    assert l1_exact_penalty(length, target, alpha) == l1_exact_penalty(2 * target - length, target, alpha)


def _batch(lengths, correct_flags, group_ids):
    return dict(completions=[GOOD if ok else WRONG for ok in correct_flags], answer=[SOLUTION] * len(lengths),
                completion_ids=[ids(n) for n in lengths], question_id=group_ids,
                target_length=[(7 * n + 3) % 200 for n in lengths])


@settings(max_examples=60)
@given(st.data())
def test_results_do_not_change_when_the_batch_order_changes(data):
    n = data.draw(st.integers(1, 16))
    batch = _batch(data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)),
                   data.draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                   data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    order = data.draw(st.permutations(range(n)))
    shuffled = {k: [v[i] for i in order] for k, v in batch.items()}
    for reward in TRL_REWARDS:
        assert reward(**shuffled) == [reward(**batch)[i] for i in order]


@settings(max_examples=60)
@given(st.data())
def test_interleaved_groups_give_the_same_values_as_separate_calls(data):
    n = data.draw(st.integers(1, 8))
    first, second = (_batch(data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)),
                            data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), [key] * n)
                     for key in ("a", "b"))
    interleaved = {k: [x for pair in zip(first[k], second[k]) for x in pair] for k in first}
    for reward in TRL_REWARDS:
        together = reward(**interleaved)
        assert together[0::2] == reward(**first)
        assert together[1::2] == reward(**second)


@settings(max_examples=60)
@given(st.data())
def test_with_default_settings_every_method_ranks_any_correct_answer_above_any_incorrect_one(data):
    # Groups of up to 16 completions of up to 512 tokens (the study's limit).
    n = data.draw(st.integers(2, 16))
    lengths = data.draw(st.lists(st.integers(0, 512), min_size=n, max_size=n))
    correct = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    batch = _batch(lengths, correct, [0] * n)
    batch["reference_length"] = [100] * n
    batch["target_length"] = [data.draw(st.integers(1, 512))] * n  # one target per question
    for method in rewards.METHODS:
        totals = [sum(v) for v in zip(*(f(**batch) for f in rewards.reward_functions(method)))]
        right = [t for t, ok in zip(totals, correct) if ok]
        wrong = [t for t, ok in zip(totals, correct) if not ok]
        if right and wrong:
            assert min(right) > max(wrong), method


# --- registry -------------------------------------------------------------------------------------------

def test_literature_methods_are_registered_with_their_rewards():
    names = {m: [f.__name__ for f in rewards.reward_functions(m)] for m in LITERATURE_METHODS}
    assert names == {
        "kimi": ["format_reward", "correctness_reward", "kimi_length_reward"],
        "grpo_lead": ["format_reward", "grpo_lead_reward"],
        "l1_exact": ["format_reward", "correctness_reward", "l1_exact_reward"],
        "dapo_overlong": ["format_reward", "correctness_reward", "dapo_overlong_reward"],
        "efficient_reasoning": ["format_reward", "correctness_reward", "efficient_length_reward"],
    }


def test_method_parameters_and_columns_tell_a_cli_what_to_pass():
    assert rewards.method_parameters("baseline") == {}
    assert rewards.method_parameters("group") == {"lam": rewards.DEFAULT_LAMBDA}
    assert rewards.method_parameters("kimi") == {"weight": rewards.KIMI_WEIGHT}
    assert rewards.method_parameters("dapo_overlong") == {
        "max_completion_length": rewards.DAPO_MAX_COMPLETION_LENGTH, "cache_fraction": rewards.DAPO_CACHE_FRACTION}
    assert rewards.method_columns("l1_exact") == {"answer", "target_length"}
    assert rewards.method_columns("ans_len") == {"answer", "reference_length"}
    assert rewards.method_columns("grpo_lead") == {"answer"}
    with pytest.raises(ValueError, match="unknown method"):
        rewards.method_parameters("kimi15")


def test_reward_functions_routes_each_setting_to_the_reward_that_takes_it():
    dapo = rewards.reward_functions("dapo_overlong", max_completion_length=100, cache_fraction=0.2)[-1]
    assert dapo.__name__ == "dapo_overlong_reward"
    assert dapo(["x"], completion_ids=[ids(90)]) == [pytest.approx(-0.5)]
    kimi = rewards.reward_functions("kimi", weight=2.0)[-1]
    assert kimi([GOOD, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(1), ids(2)], prompts=["p", "p"]) \
        == [1.0, -1.0]
    with pytest.raises(ValueError, match="lam"):
        rewards.reward_functions("kimi", lam=0.5)


# --- reward parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("kimi", {"weight": "abc"}, r"method 'kimi': reward parameter weight='abc' is not a finite number; "
                                    r"weight takes a finite number >= 0 \(default 1\.0\)"),
        ("kimi", {"weight": -1.0}, "weight=-1.0 is out of range.*reward the longest"),
        ("grpo_lead", {"alpha": -800.0}, r"method 'grpo_lead': reward parameter alpha=-800\.0 is out of range; "
                                         r"alpha takes a finite number in \[0, 10\]"),
        ("grpo_lead", {"alpha": 10.5}, "overflow"),
        ("grpo_lead", {"incorrect_reward": 0.5}, "incorrect_reward=0.5 is out of range.*<= 0"),
        ("l1_exact", {"alpha": -0.003}, "alpha=-0.003 is out of range.*missing the target"),
        ("dapo_overlong", {"max_completion_length": 0}, "max_completion_length=0 is out of range.*>= 1"),
        ("dapo_overlong", {"max_completion_length": 512.0}, "max_completion_length=512.0 is not an integer"),
        ("dapo_overlong", {"cache_fraction": 0.0}, r"cache_fraction=0\.0 is out of range.*in \(0, 1\]"),
        ("dapo_overlong", {"cache_fraction": 1.5}, r"cache_fraction=1\.5 is out of range"),
        ("efficient_reasoning", {"alpha": 1.0}, r"alpha=1\.0 is out of range.*in \[0, 1\)"),
        ("efficient_reasoning", {"answer": "#### 4"}, "answer is a dataset column"),
        ("l1_exact", {"target_length": 100}, "target_length is a dataset column"),
    ],
)
def test_each_literature_parameter_is_checked_for_type_and_range(method, params, message):
    with pytest.raises(ConfigError, match=message):
        rewards.check_params(method, params)
    with pytest.raises(ConfigError, match=message):
        rewards.reward_functions(method, **params)


def test_grpo_lead_alpha_bound_is_where_exp_could_first_overflow():
    # A z-score is at most (n - 1) / sqrt(n): one short correct answer among n - 1 long ones reaches it.
    def worst_group(n):
        return [0] + [100] * (n - 1), [True] * n

    values = grpo_lead_for_group(*worst_group(5000), alpha=rewards.GRPO_LEAD_ALPHA_MAX)
    assert all(math.isfinite(v) and v > 0 for v in values)
    with pytest.raises(OverflowError):  # why the range is needed: an unchecked alpha overflows in small groups
        grpo_lead_for_group([100] * 7 + [500], [True] * 8, alpha=-800.0)
    assert rewards.check_params("grpo_lead", {"alpha": rewards.GRPO_LEAD_ALPHA_MAX}) == {"alpha": 10.0}


def test_efficient_alpha_below_one_keeps_every_correct_answer_above_a_wrong_one():
    # alpha = 0.99: a correct answer far longer than the others still gets C * (1 - 0.99 * sigmoid(z)) > 0.
    values = rewards.reward_functions("efficient_reasoning", alpha=0.99)
    batch = dict(completions=[GOOD] * 7 + [GOOD], answer=[SOLUTION] * 8, completion_ids=[ids(10)] * 7 + [ids(500)],
                 prompts=["p"] * 8)
    totals = [sum(v) for v in zip(*(f(**batch) for f in values))]
    assert min(totals) > rewards.FORMAT_REWARD  # above a wrong but well-formatted answer's 0.5


def test_every_setting_of_every_method_has_a_checked_range():
    for method in rewards.METHODS:
        for function in rewards.METHODS[method]:
            own = set(rewards.method_parameters(method)) & set(inspect.signature(function).parameters)
            assert own == set(rewards.PARAM_RANGES.get(function, {})), (method, function.__name__)


def _valid_value(data, method, name):
    """A value inside every range of the functions of ``method`` that take ``name`` (an int or a float)."""
    default = rewards.method_parameters(method)[name]
    ranges = [rewards.PARAM_RANGES[f][name] for f in rewards.METHODS[method] if name in rewards.PARAM_RANGES.get(f, {})]
    low, high = max(r.low for r in ranges), min(r.high for r in ranges)
    if isinstance(default, int):
        return data.draw(st.integers(max(1, int(low)), 100_000))
    low_open, high_open = any(r.low_open for r in ranges), any(r.high_open for r in ranges)
    floats = st.floats(max(low, -1e6), min(high, 1e6), exclude_min=low_open, exclude_max=high_open)
    ints = st.integers(math.ceil(max(low, -1e6)), math.floor(min(high, 1e6)))
    ints = ints.filter(lambda v: all(v in r for r in ranges))
    return data.draw(st.one_of(floats, ints))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(rewards.METHODS)), st.data())
def test_valid_parameters_never_raise_and_configure_rewards_that_run(method, data):
    names = data.draw(st.sets(st.sampled_from(sorted(rewards.method_parameters(method)) or ["-"])))
    params = {name: _valid_value(data, method, name) for name in names if name != "-"}
    checked = rewards.check_params(method, params)
    assert set(checked) == set(params)
    for name, value in checked.items():
        assert type(value) is type(rewards.method_parameters(method)[name])
    n = data.draw(st.integers(1, 16))
    batch = _batch(data.draw(st.lists(st.integers(0, 600), min_size=n, max_size=n)),
                   data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), [0] * n)
    batch["reference_length"] = [100] * n
    for function in rewards.reward_functions(method, **checked):
        values = function(**batch)
        assert len(values) == n and all(math.isfinite(v) for v in values)


# --- real TRL ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trl_grpo_step_passes_token_ids_and_the_target_column_to_every_literature_reward(
        tokenizer, tiny_model, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import data

    seen: dict[str, list[int]] = {}

    def spy(completions, completion_ids=None, target_length=None, **kwargs):
        seen["lengths"] = [len(c) for c in completion_ids]
        seen["targets"] = list(target_length)
        return [0.0] * len(completions)

    functions = [f for m in LITERATURE_METHODS for f in rewards.reward_functions(m)]
    functions = [*{f.__name__: f for f in functions}.values(), spy]
    dataset = Dataset.from_list([
        {"prompt": data.prompt_messages(f"What is {k} + {k}?", budget=12), "answer": f"#### {2 * k}",
         "question_id": k, "target_length": 12} for k in range(4)])
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=8, max_prompt_length=128, max_steps=1, logging_steps=1,
                        report_to="none", use_cpu=True, save_strategy="no", learning_rate=1e-5)
    trainer = GRPOTrainer(model=tiny_model, reward_funcs=functions, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for name in ("kimi_length_reward", "grpo_lead_reward", "l1_exact_reward", "dapo_overlong_reward",
                 "efficient_length_reward"):
        assert math.isfinite(logged[f"rewards/{name}/mean"]), name
    assert seen["targets"] == [12] * len(seen["lengths"])
    assert all(0 < n <= 8 for n in seen["lengths"])
    # A random tiny model writes nothing correct, so only L1 and DAPO can move; L1 is -alpha * |n - 12|.
    assert logged["rewards/l1_exact_reward/mean"] < 0
