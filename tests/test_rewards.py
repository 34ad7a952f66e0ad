"""rewards.py: the scoring contract, the study's two length methods, and the method registry."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards
from rewards import (
    CORRECT_REWARD,
    FORMAT_REWARD,
    answer_length_penalty,
    answer_length_reward,
    correctness_reward,
    extract_answer,
    format_reward,
    group_length_penalty,
    group_length_reward,
    is_correct,
    is_format_ok,
    parse_number,
)
from runtime import ConfigError

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
SOLUTION = "Two and two make four.\n#### 4"


def ids(n: int) -> list[int]:
    return list(range(n))


# --- scoring contract -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>12</answer>", "12"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>7</answer><answer>unterminated", None),
        ("no tags at all: 42", None),
        ("<answer>open only", None),
        ("</answer>5<answer>", None),
    ],
)
def test_extracted_answer_is_between_the_last_answer_tag_and_its_close(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.50", 1234.5),
        ("50%", 50.0),
        ("  -7 ", -7.0),
        ("first 3 then 18", 18.0),
        ("x = 0.25", 0.25),
        ("none", None),
        ("", None),
        (None, None),
        ("٣٤", None),  # Arabic-Indic digits are not an ASCII number
    ],
)
def test_parse_number_normalises_and_takes_the_last_number(text, expected):
    assert parse_number(text) == expected


def test_scientific_notation_is_one_number():
    assert parse_number("1e3") == 1000.0  # not 3
    assert parse_number("2.5E-1") == 0.25
    assert parse_number("6e+2 apples") == 600.0
    assert parse_number("1e999") is None  # does not fit a float: no number
    assert is_correct("<answer>1e3</answer>", "#### 1000")
    assert not is_correct("<answer>1e3</answer>", "#### 3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3-5", 5.0),  # a range or a subtraction: the last number stands alone, never -5
        ("3 - 5", 5.0),
        ("3 -5", 5.0),
        ("2024-42", 42.0),  # the number after the operator, as "2024 - 42" would give
        ("1-2-3", 3.0),
        ("1e3-5", 5.0),
        ("$3-$5", 5.0),
        ("-5", -5.0),  # nothing before it: a sign
        ("x = -5", -5.0),
        ("the change is -5", -5.0),
        ("2e-3", 0.002),  # an exponent's sign is part of the number
    ],
)
def test_a_hyphen_between_two_numbers_is_not_a_minus_sign(text, expected):
    assert parse_number(text) == expected


def test_a_range_does_not_score_as_a_negative_answer():
    assert not is_correct("<answer>3-5</answer>", "#### -5")
    assert is_correct("<answer>2024-42</answer>", "#### 42")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\u22127", -7.0),
        ("x = \u22127", -7.0),
        ("5 \u2212 3", 3.0),  # between numbers it is an operator, like "-"
        ("\u2013" + "5", 5.0),  # an en dash is never a sign
    ],
)
def test_the_unicode_minus_is_a_minus_sign(text, expected):
    assert parse_number(text) == expected
    assert is_correct("<answer>\u221212</answer>", "#### -12")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 000", 1000.0),  # regular space, not 0
        ("1\u2009000", 1000.0),  # thin space
        ("1\u202f000", 1000.0),  # narrow no-break space
        ("1\u00a0000", 1000.0),  # no-break space
        ("12 345 678.5", 12345678.5),
        ("$1 000", 1000.0),
        ("-1 000", -1000.0),
        ("1 0000", 0.0),  # not groups of three: the numbers 1 and 0000
        ("3, 100", 100.0),  # a comma then a space separates two numbers
        ("0.5 100", 100.0),  # a decimal part is not a thousands group
    ],
)
def test_space_grouped_thousands_are_one_number(text, expected):
    assert parse_number(text) == expected


def test_space_grouped_thousands_score_as_the_whole_number():
    assert is_correct("<answer>1 000</answer>", "#### 1,000")
    assert is_correct("<answer>$1\u202f250</answer>", "#### 1250")


def test_every_gsm8k_gold_answer_is_the_integer_after_the_hashes(gsm8k_dir):
    import json

    for split in ("train", "test"):
        for line in (gsm8k_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            answer = json.loads(line)["answer"]
            assert rewards.gold_number(answer) == int(answer.split("####")[-1].strip().replace(",", "")), answer


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (GOOD, True),
        ("  \n" + GOOD + "\n\n", True),
        ("<reasoning>r</reasoning><answer>4</answer>", True),
        ("<reasoning>r</reasoning>\n<answer>  </answer>", False),  # empty answer
        ("Sure! " + GOOD, False),  # text before
        (GOOD + " Done.", False),  # text after
        ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>4</answer>", False),  # repeated
        ("<reasoning>a<answer>3</answer></reasoning><answer>4</answer>", False),  # nested
        ("<answer>4</answer>", False),
        ("<reasoning>r</reasoning>\n<answer>4</answer>\n<answer>5</answer>", False),
    ],
)
def test_format_is_exactly_one_reasoning_block_then_one_answer_block(text, ok):
    assert is_format_ok(text) is ok


def test_correct_when_the_extracted_number_equals_the_gold_within_tolerance():
    assert is_correct(GOOD, SOLUTION)
    assert is_correct("<answer>$4.0000001</answer>", "4")
    assert is_correct("<answer>The answer is 4</answer>", 4)
    assert not is_correct("<answer>4.01</answer>", SOLUTION)
    assert not is_correct("the answer is 4", SOLUTION)  # no <answer> tag: incorrect
    assert is_correct("<answer>1,000</answer>", "Sum.\n#### 1,000")


def test_conversational_completions_are_scored_like_strings():
    conversational = [[{"role": "assistant", "content": GOOD}]]
    assert format_reward(conversational) == [FORMAT_REWARD]
    assert correctness_reward(conversational, answer=[SOLUTION]) == [CORRECT_REWARD]


def test_only_assistant_turns_are_scored_in_a_chat_completion():
    user_answer = [{"role": "user", "content": "<answer>4</answer>"}, {"role": "assistant", "content": "I think 5"}]
    system_answer = [{"role": "system", "content": GOOD}, {"role": "assistant", "content": "<answer>5</answer>"}]
    no_role = [{"content": GOOD}]
    assert correctness_reward([user_answer, system_answer, no_role], answer=[SOLUTION] * 3) == [0.0] * 3
    assert format_reward([[{"role": "user", "content": GOOD}], no_role]) == [0.0, 0.0]
    assert extract_answer(system_answer) == "5"
    # The assistant's answer is found even after other turns.
    after_user = [{"role": "user", "content": "<answer>9</answer>"}, {"role": "assistant", "content": GOOD}]
    assert correctness_reward([after_user], answer=[SOLUTION]) == [CORRECT_REWARD]


def test_format_and_correctness_rewards():
    completions = [GOOD, "<reasoning>r</reasoning><answer>5</answer>", "4"]
    assert format_reward(completions) == [FORMAT_REWARD, FORMAT_REWARD, 0.0]
    assert correctness_reward(completions, answer=[SOLUTION] * 3) == [CORRECT_REWARD, 0.0, 0.0]


@pytest.mark.parametrize("bad", [None, "", 17, {"no": "content"}, [None], "x" * 1_000_000,
                                 "<answer>" * 10_000, "<answer>１２</answer>"])
def test_bad_completions_never_crash_and_every_reward_is_finite(bad):
    completions = [bad, GOOD]
    kwargs = dict(prompts=["p", "p"], completion_ids=[ids(3), ids(5)], answer=[SOLUTION] * 2,
                  reference_length=[4, 4])
    for reward in (format_reward, correctness_reward, answer_length_reward, group_length_reward):
        values = reward(completions, **kwargs)
        assert len(values) == 2
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_mismatched_lengths_raise_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="answer"):
        correctness_reward([GOOD, GOOD], answer=[SOLUTION])
    with pytest.raises(ValueError, match="completion_ids"):
        group_length_reward([GOOD, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(1)], prompts=["p", "p"])
    with pytest.raises(ValueError, match="reference_length"):
        answer_length_reward([GOOD], completion_ids=[ids(1)], reference_length=[1, 2], prompts=["p"])
    with pytest.raises(ValueError, match="prompts"):
        group_length_reward([GOOD], answer=[SOLUTION], completion_ids=[ids(1)], prompts=["p", "q"])
    with pytest.raises(ValueError, match="completion_ids is required"):
        group_length_reward([GOOD], answer=[SOLUTION], prompts=["p"])
    with pytest.raises(ValueError, match="lengths"):
        group_length_penalty([1, 2], [True])


# --- method 1 ----------------------------------------------------------------------------------------

def test_method1_the_farthest_from_its_reference_gets_minus_lambda():
    assert answer_length_penalty([100, 150, 200], [100, 100, 100], lam=0.5) == [0.0, -0.25, -0.5]


def test_method1_shorter_and_longer_than_the_reference_are_penalised_alike():
    assert answer_length_penalty([80, 120], [100, 100], lam=1.0) == [-1.0, -1.0]


def test_method1_no_deviation_anywhere_means_no_penalty():
    assert answer_length_penalty([60, 70], [60, 70], lam=1.0) == [0.0, 0.0]


def test_method1_reward_penalises_per_group_not_per_batch():
    # Group "a" deviates by 10 at most, group "b" by 100: each group's worst gets exactly -lam.
    values = answer_length_reward(
        ["x"] * 4, completion_ids=[ids(10), ids(20), ids(100), ids(200)], reference_length=[10, 10, 100, 100],
        prompts=["a", "a", "b", "b"], lam=1.0)
    assert values == [0.0, -1.0, 0.0, -1.0]


# --- method 2 ----------------------------------------------------------------------------------------

def test_method2_the_shortest_correct_completion_gets_no_penalty():
    penalties = group_length_penalty([50, 80, 110, 30], [True, True, False, False], lam=1.0)
    assert penalties[0] == 0.0


def test_method2_penalty_scales_with_excess_and_group_accuracy():
    # o_min = 50, c = 2/4, excesses 0, 30, 60, 0 (shorter incorrect answers have no excess).
    assert group_length_penalty([50, 80, 110, 30], [True, True, False, False], lam=1.0) == [0.0, -0.25, -0.5, 0.0]


def test_method2_a_group_with_nothing_correct_is_not_penalised():
    assert group_length_penalty([10, 500, 90], [False, False, False], lam=1.0) == [0.0, 0.0, 0.0]


def test_method2_a_fully_correct_group_gives_the_longest_minus_lambda():
    assert group_length_penalty([40, 60], [True, True], lam=0.5) == [0.0, -0.5]


def test_method2_reward_uses_the_correctness_contract():
    wrong = "<reasoning>r</reasoning><answer>5</answer>"
    values = group_length_reward([GOOD, wrong], answer=[SOLUTION] * 2, completion_ids=[ids(10), ids(30)],
                                 question_id=[7, 7], lam=1.0)
    assert values == [0.0, -0.5]


def test_groups_are_keyed_by_question_id_when_present():
    # Same prompt text, different question ids: two groups of one, so nothing to compare against.
    values = group_length_reward([GOOD, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(10), ids(30)],
                                 prompts=["p", "p"], question_id=[1, 2], lam=1.0)
    assert values == [0.0, 0.0]


def test_conversational_prompts_group_like_strings():
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    values = group_length_reward([GOOD, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(10), ids(30)],
                                 prompts=[prompt, list(prompt)], lam=1.0)
    assert values == [0.0, -1.0]


# --- properties ----------------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(min_value=0, max_value=600), min_size=1, max_size=12)
lam_st = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


@given(lengths_st, st.data(), lam_st)
def test_penalties_lie_between_minus_lambda_and_zero(lengths, data, lam):
    references = data.draw(st.lists(st.integers(0, 600), min_size=len(lengths), max_size=len(lengths)))
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    for values in (answer_length_penalty(lengths, references, lam), group_length_penalty(lengths, correct, lam)):
        assert all(-lam - 1e-12 <= v <= 0.0 for v in values)


@given(lengths_st, st.data(), lam_st)
def test_shortest_correct_completion_always_gets_zero(lengths, data, lam):
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    values = group_length_penalty(lengths, correct, lam)
    if any(correct):
        shortest = min(o for o, ok in zip(lengths, correct) if ok)
        assert all(v == 0.0 for o, ok, v in zip(lengths, correct, values) if ok and o == shortest)


def _batch(draw_lengths, correct_flags, group_ids):
    completions = [GOOD if ok else "<reasoning>r</reasoning><answer>5</answer>" for ok in correct_flags]
    return dict(completions=completions, answer=[SOLUTION] * len(completions),
                completion_ids=[ids(n) for n in draw_lengths],
                reference_length=[(7 * n + 3) % 200 for n in draw_lengths], question_id=group_ids)


@settings(max_examples=60)
@given(st.data())
def test_results_do_not_change_when_the_batch_order_changes(data):
    n = data.draw(st.integers(1, 16))
    lengths = data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))
    correct = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    batch = _batch(lengths, correct, groups)
    shuffled = {k: [v[i] for i in order] for k, v in batch.items()}
    for reward in (answer_length_reward, group_length_reward):
        original = reward(**batch, lam=1.0)
        permuted = reward(**shuffled, lam=1.0)
        assert permuted == [original[i] for i in order]


@settings(max_examples=60)
@given(st.data())
def test_interleaved_groups_give_the_same_values_as_separate_calls(data):
    n = data.draw(st.integers(1, 8))
    first = _batch(data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)),
                   data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), ["a"] * n)
    second = _batch(data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)),
                    data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), ["b"] * n)
    interleaved = {k: [x for pair in zip(first[k], second[k]) for x in pair] for k in first}
    for reward in (answer_length_reward, group_length_reward):
        together = reward(**interleaved, lam=1.0)
        assert together[0::2] == reward(**first, lam=1.0)
        assert together[1::2] == reward(**second, lam=1.0)


# --- configuration and registry -------------------------------------------------------------------------

def test_configured_reward_keeps_its_name_and_uses_the_new_lambda():
    reward = rewards.configured(group_length_reward, lam=2.0)
    assert reward.__name__ == "group_length_reward"
    assert reward([GOOD, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(1), ids(2)], prompts=["p", "p"]) \
        == [0.0, -2.0]
    with pytest.raises(TypeError, match="lamda"):
        rewards.configured(group_length_reward, lamda=2.0)


def test_study_methods_are_registered_with_their_rewards():
    names = {m: [f.__name__ for f in rewards.reward_functions(m)] for m in
             ("baseline", "ans_len", "group", "group_ans_len")}
    assert names["baseline"] == ["format_reward", "correctness_reward"]
    assert names["ans_len"][-1] == "answer_length_reward"
    assert names["group"][-1] == "group_length_reward"
    assert names["group_ans_len"][-2:] == ["answer_length_reward", "group_length_reward"]


def test_reward_functions_passes_lambda_and_rejects_unknown_parameters():
    functions = rewards.reward_functions("group", lam=0.1)
    value = functions[-1]([GOOD, GOOD], answer=[SOLUTION] * 2, completion_ids=[ids(1), ids(2)], prompts=["p", "p"])
    assert value == [0.0, -0.1]
    with pytest.raises(ValueError, match="unknown method"):
        rewards.reward_functions("shortest")
    with pytest.raises(ValueError, match="alpha"):
        rewards.reward_functions("baseline", alpha=1.0)


def test_a_negative_lambda_is_rejected_because_it_would_turn_the_penalty_into_a_bonus():
    # Why: with lam < 0 the completion farthest from its reference would earn the most.
    assert answer_length_penalty([100, 200], [100, 100], lam=-0.5) == [0.0, 0.5]
    for method in ("ans_len", "group", "group_ans_len"):
        with pytest.raises(ConfigError, match=rf"method '{method}': reward parameter lam=-0.5 .*>= 0.*bonus"):
            rewards.check_params(method, {"lam": -0.5})
        with pytest.raises(ConfigError, match=r"lam=-0\.5"):
            rewards.reward_functions(method, lam=-0.5)
    assert rewards.check_params("group", {"lam": 0}) == {"lam": 0.0}


@pytest.mark.parametrize("bad", ["abc", "0.1", None, True, [0.1], float("nan"), float("inf")])
def test_lambda_must_be_a_finite_number(bad):
    with pytest.raises(ConfigError, match=r"method 'group': reward parameter lam=.* is not a finite number"):
        rewards.check_params("group", {"lam": bad})


def test_check_params_accepts_ints_for_floats_and_returns_floats():
    checked = rewards.check_params("group_ans_len", {"lam": 1})
    assert checked == {"lam": 1.0} and isinstance(checked["lam"], float)
    assert rewards.check_params("baseline", {}) == {}


def test_a_dataset_column_or_an_unknown_name_is_not_a_reward_parameter():
    with pytest.raises(ConfigError, match=r"method 'group': answer is a dataset column, not a reward parameter; "
                                          r"its reward parameters are \['lam'\]"):
        rewards.check_params("group", {"answer": "#### 4"})
    with pytest.raises(ConfigError, match="reference_length is a dataset column"):
        rewards.reward_functions("ans_len", reference_length=[10])
    with pytest.raises(ConfigError, match="method 'group' takes no parameter 'lamda'"):
        rewards.check_params("group", {"lamda": 0.5})
    with pytest.raises(ConfigError, match="method 'baseline' takes no parameter 'lam'; it has no reward parameters"):
        rewards.check_params("baseline", {"lam": 0.5})
    with pytest.raises(ConfigError, match="unknown method 'shortest'"):
        rewards.check_params("shortest", {})


def test_every_parameter_error_is_one_line():
    for method, params in [("group", {"lam": "abc"}), ("group", {"lam": -1}), ("group", {"answer": 1}),
                           ("nope", {})]:
        with pytest.raises(ConfigError) as error:
            rewards.check_params(method, params)
        assert "\n" not in str(error.value)


def test_effective_params_use_the_runs_lambda_for_the_methods_that_take_it():
    assert rewards.effective_params("group", {}, lam=0.3) == {"lam": 0.3}
    assert rewards.effective_params("baseline", {}, lam=0.3) == {}  # no length reward: lam does not apply
    assert rewards.effective_params("dapo_overlong", {"cache_fraction": 0.1}, lam=0.3, max_completion_length=256) \
        == {"max_completion_length": 256, "cache_fraction": 0.1}


def test_lambda_given_twice_with_different_values_is_an_error_naming_both():
    # The run's lam (shown in its banner and record) and reward_params lam=0.1 must not silently disagree.
    with pytest.raises(ConfigError, match=r"method 'group': lam is set twice, lam=0.5 and reward_params lam=0.1"):
        rewards.effective_params("group", {"lam": 0.1}, lam=0.5)
    assert rewards.effective_params("group", {"lam": 0.5}, lam=0.5) == {"lam": 0.5}
    assert rewards.effective_params("group", {"lam": 1}, lam=1.0) == {"lam": 1.0}


def test_effective_params_check_the_runs_own_settings_too():
    with pytest.raises(ConfigError, match="lam=-1"):
        rewards.effective_params("group", {}, lam=-1)
    with pytest.raises(ConfigError, match="'lam'"):
        rewards.effective_params("kimi", {"lam": 0.5}, lam=0.5)  # kimi has no lam to set
    with pytest.raises(TypeError, match="learning_rate"):
        rewards.effective_params("group", {}, learning_rate=1e-5)


def test_default_lambda_keeps_any_correct_answer_above_any_incorrect_one():
    worst_correct = CORRECT_REWARD + FORMAT_REWARD - 2 * rewards.DEFAULT_LAMBDA
    best_incorrect = FORMAT_REWARD
    assert worst_correct > best_incorrect


def test_out_of_limit_means_reaching_the_limit_or_ending_within_three_tokens_of_it():
    assert [rewards.is_out_of_limit(n, 512) for n in (512, 509, 508, 10)] == [True, True, False, False]


def test_model_efficiency_counts_only_correct_completions():
    # Correct answers of 50 and 150 tokens for references of 100 and 100: 200 / 200.
    assert rewards.model_efficiency([100, 100, 300], [50, 150, 10], [True, True, False]) == 1.0
    assert rewards.model_efficiency([100], [50], [False]) is None
    with pytest.raises(ValueError, match="same length"):
        rewards.model_efficiency([1, 2], [1], [True])
