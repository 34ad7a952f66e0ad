"""training.py: metric functions, live view, configuration checks, and real GRPO runs on the CPU.

The GRPO runs use the real TRL GRPOTrainer with the tiny random Qwen2 and the real tokenizer on local GSM8K
questions; the two-process test launches this file under ``torchrun`` (gloo) as its own worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conftest import interrupt_at  # noqa: E402

import backends  # noqa: E402
import rewards  # noqa: E402
import runtime  # noqa: E402
import training  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def tiny_config(tmp_path: Path, **overrides) -> training.TrainConfig:
    """A small real configuration (not the smoke preset, so that tests choose steps and groups)."""
    settings = dict(model=training.runtime.TINY_MODEL, backend="trl", smoke=False, train_size=8,
                    num_generations=4, per_device_train_batch_size=4, steps_per_generation=2,
                    max_completion_length=16, max_steps=2, save_steps=1, precision="fp32",
                    gradient_checkpointing=False, report_to="none", live_view=True,
                    output_dir=str(tmp_path / "run"))
    settings.update(overrides)
    return training.TrainConfig(**settings)


# --------------------------------------------------------------------------------------------------
# The live view (the step's metrics are tested in test_metrics.py)
# --------------------------------------------------------------------------------------------------

def test_live_view_format():
    records = [
        {"group": 7, "gold": "18", "correct": True, "format_ok": True, "length": 120, "reward": 2.25},
        {"group": 7, "gold": "18", "correct": False, "format_ok": True, "length": 300, "reward": 0.5},
        {"group": 9, "gold": "3", "correct": False, "format_ok": False, "length": 512, "reward": 0.0},
        {"group": 7, "gold": "18", "correct": True, "format_ok": False, "length": 95, "reward": 2.0},
    ]
    text = training.format_live_view(records, step=4, limit=512)
    lines = text.splitlines()
    assert lines[0].startswith("── step 4: 4 completions in 2 groups")
    # Group 7 first (first appearance), with its three completions in batch order, then group 9.
    assert lines[1] == "┌ question 7 · gold 18"
    assert lines[2] == "│ ✔ 120 tok  reward +2.25"
    assert lines[3] == "│ ★ 300 tok  reward +0.50"
    assert lines[4] == "│ ✔  95 tok  reward +2.00"
    assert lines[5] == "└ 2/3 correct"
    assert lines[6] == "┌ question 9 · gold 3"
    assert lines[7] == "│ ✗ 512 tok  reward +0.00 (limit)"
    assert lines[8] == "└ 0/1 correct"
    assert len(lines) == 9
    assert [training.completion_symbol(c, f) for c, f in [(True, False), (False, True), (False, False)]] == [
        "✔", "★", "✗"]


def _synthetic_batch(question_ids, golds, lengths, right, question_lengths, reference_lengths):
    completions, completion_ids = [], []
    for gold, length, ok in zip(golds, lengths, right):
        answer = gold if ok else gold + 1
        completions.append([{"role": "assistant", "content": f"<reasoning>\nwork\n</reasoning>\n<answer>\n{answer}\n"
                                                             "</answer>"}])
        completion_ids.append(list(range(length)))
    return dict(completions=completions, completion_ids=completion_ids,
                answer=[f"steps\n#### {g}" for g in golds], question_id=list(question_ids),
                question_length=list(question_lengths), reference_length=list(reference_lengths),
                prompts=[[{"role": "user", "content": f"q{q}"}] for q in question_ids])


def test_monitor_keeps_rewards_and_uses_log_metric_keyword():
    """Newer TRL passes ``log_metric`` to reward functions: the monitor must use it, and leave rewards as they are."""
    batch = _synthetic_batch(question_ids=[3, 3, 3, 5, 5, 5], golds=[10, 10, 10, 4, 4, 4],
                             lengths=[40, 80, 16, 60, 30, 90], right=[True, False, True, False, True, True],
                             question_lengths=[50, 50, 50, 70, 70, 70], reference_lengths=[45, 45, 45, 100, 100, 100])
    functions = rewards.reward_functions("group", lam=0.5)
    printed: list[str] = []
    monitor = training.RewardMonitor(num_generations=3, max_completion_length=90, out=printed.append)
    wrapped = monitor.wrap(functions)
    logged: dict[str, float] = {}
    expected_totals = np.zeros(6)
    for plain, monitored in zip(functions, wrapped):
        assert monitored.__name__ == plain.__name__  # TRL logs rewards/<name>/mean
        expected = plain(**batch)
        assert monitored(**batch, log_metric=logged.__setitem__) == expected
        expected_totals += expected

    lengths = np.array([40, 80, 16, 60, 30, 90])
    right = np.array([True, False, True, False, True, True])
    assert logged["accuracy"] == pytest.approx(right.mean())
    assert logged["format_accuracy"] == 1.0
    assert logged["out_of_limit"] == pytest.approx(np.mean(lengths >= 87))
    assert logged["model_efficiency"] == pytest.approx((45 * 2 + 100 * 2) / lengths[right].sum())
    assert logged["question_vs_response_length_correlation"] == pytest.approx(
        np.corrcoef([50, 50, 50, 70, 70, 70], lengths)[0, 1])
    assert logged["whole_groups"] == 1.0
    # The live view shows each completion's total reward (sum over the method's functions), once per batch.
    assert len(printed) == 1
    shown = [float(line.split("reward ")[1].split()[0]) for line in printed[0].splitlines() if line.startswith("│")]
    assert shown == pytest.approx(expected_totals.tolist(), abs=0.005)
    # Non-trivial: the longer correct completion of question 3 lost part of its 2.5 to the group penalty.
    assert 2.0 < expected_totals[0] < 2.5


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

def test_split_groups_stop_before_the_model_loads(tmp_path):
    # 4 completions per process with groups of 8: a group would straddle two processes (or micro-batches).
    config = tiny_config(tmp_path, model=str(tmp_path / "no-such-model"), num_generations=8,
                         per_device_train_batch_size=4, steps_per_generation=1)
    with pytest.raises(ValueError, match=r"groups would be split across processes.*steps_per_generation=2"):
        training.train(config)  # a model load would have failed with OSError on the missing folder
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Per process 2 x 1 = 2 completions, G = 4: TRL accepts this on 2 processes (4 in all); we must not.
    with pytest.raises(ValueError, match="split across processes"):
        training.check_config(tiny_config(tmp_path, per_device_train_batch_size=2, steps_per_generation=1))
    training.check_config(tiny_config(tmp_path, per_device_train_batch_size=2, steps_per_generation=2))


def test_config_checks_and_reward_parameters(tmp_path):
    assert training.reward_params(training.TrainConfig(method="baseline", lam=0.3)) == {}
    assert training.reward_params(training.TrainConfig(method="group", lam=0.3)) == {"lam": 0.3}
    assert training.reward_params(training.TrainConfig(method="dapo_overlong", max_completion_length=256)) == {
        "max_completion_length": 256}
    with pytest.raises(ValueError, match="takes no parameter"):
        training.check_config(tiny_config(tmp_path, method="group", reward_params={"lamda": 1.0}))
    with pytest.raises(ValueError, match="unknown method"):
        training.check_config(tiny_config(tmp_path, method="shortest"))
    with pytest.raises(ValueError, match="target_length"):
        training.check_config(tiny_config(tmp_path, method="l1_exact"))
    with pytest.raises(ValueError, match="backend"):
        training.check_config(tiny_config(tmp_path, backend="vllm"))
    with pytest.raises(ValueError, match="hub_repo"):
        training.check_config(tiny_config(tmp_path, push_to_hub=True))
    assert training.runtime.run_folder("group_ans_len") == "Group_method_with_ans_len_considering"
    assert training.runtime.run_folder("kimi") == "kimi"
    assert training.TrainConfig(method="kimi", folder="mine").resolved_folder() == "mine"


def test_smoke_config_keeps_the_method():
    smoke = training.smoke_config(training.TrainConfig(method="group", lam=0.25, reward_params={"lam": 0.25}))
    assert (smoke.method, smoke.lam, smoke.reward_params) == ("group", 0.25, {"lam": 0.25})
    assert smoke.model == training.runtime.TINY_MODEL and smoke.backend == "trl" and smoke.smoke is True
    assert (smoke.train_size, smoke.max_steps) == (8, 2)
    assert smoke.resolved_folder() == "Group_method-smoke"
    assert training.smoke_config(smoke) == smoke  # idempotent
    training.check_config(smoke)


def test_auto_backend_on_cpu_falls_back_with_a_reason():
    if training.runtime.has_cuda():
        pytest.skip("CPU-only behaviour")
    assert training.resolve_backend("auto") == ("trl", "Unsloth not used: no CUDA GPU")
    if importlib.util.find_spec("unsloth") is None:  # asked for by name, Unsloth's import decides: one line
        with pytest.raises(backends.StageFailure, match=r"stage 'import': Unsloth did not import.*--backend trl"):
            training.resolve_backend("unsloth")


def test_grpo_arguments_one_generation_per_optimizer_step(tmp_path):
    from trl import GRPOConfig

    config = training.TrainConfig(num_generations=8, per_device_train_batch_size=4, steps_per_generation=4)
    args = GRPOConfig(**training.grpo_arguments(config, tmp_path, "trl", "fp32", use_vllm=False))
    assert args.steps_per_generation == args.gradient_accumulation_steps == 4
    assert args.generation_batch_size == 16  # 2 whole groups per optimizer step
    assert (args.beta, args.max_completion_length, args.lr_scheduler_type) == (0.005, 512, "constant_with_warmup")


def test_cli_help():
    result = subprocess.run([sys.executable, str(REPO / "training.py"), "--help"], capture_output=True, text=True,
                            env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--method", "--lam", "--reward-params", "--backend", "--num-generations", "--max-steps",
                   "--save-to-drive", "--no-eval", "--smoke"):
        assert option in result.stdout


# --------------------------------------------------------------------------------------------------
# Real GRPO runs (tiny model, real tokenizer, real TRL)
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_smoke_run(tmp_path, monkeypatch, tokenizer_dir, gsm8k_dir):
    """``python training.py`` without a GPU runs the smoke configuration end to end (wandb offline): train, then
    evaluate the adapter on 8 test questions with evaluation.py, as the notebook does."""
    result = subprocess.run([sys.executable, str(REPO / "training.py")], cwd=tmp_path,
                            capture_output=True, text=True, env=_env(LENGTHRL_SMOKE="1"), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The run's first line: smoke mode, and which rollout generator runs and why.
    assert result.stdout.splitlines()[0].startswith("Smoke mode (no CUDA GPU): rollouts static (vLLM not used: ")
    assert "── step 2: 8 completions in 2 groups" in result.stdout
    assert "── Run start" in result.stdout and "s a step (step 2" in result.stdout  # the first-minutes report
    run = tmp_path / "outputs" / "Baseline-smoke"
    adapter = run / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "run_config.json"):
        assert (adapter / name).is_file(), name
    record = json.loads((adapter / "run_config.json").read_text())
    assert record["global_step"] == 2 and record["train_seconds"] > 0 and record["backend"] == "trl"
    assert record["rollout"] == "static" and record["rollout_reason"].startswith("vLLM not used: ")
    assert record["config"]["method"] == "baseline" and record["config"]["smoke"] is True
    history = json.loads((run / "log_history.json").read_text())
    steps = [entry for entry in history if "accuracy" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:  # our metrics beside TRL's own, at every logging step
        for key in ("format_accuracy", "out_of_limit", "frac_reward_zero_std", "completions/mean_length", "reward"):
            assert key in entry
        assert entry["mean_length"] == pytest.approx(entry["completions/mean_length"])  # TRL counts the same
        assert entry["whole_groups"] == 1.0
    assert (run / "training_curves.png").stat().st_size > 10_000
    assert list((run / "wandb").glob("offline-run-*")), "wandb must log offline without a key"
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    if (REPO / "evaluation.py").is_file():  # evaluation results beside the adapter
        summary = json.loads((run / "eval" / "eval_summary.json").read_text())
        assert summary["limit"] == 8 and (tmp_path / summary["adapter_path"]).resolve() == adapter.resolve()
        assert "Accuracy" in result.stdout

        # The Eval notebooks: re-evaluate the saved adapter from disk, then compare with the baseline's results.
        import shutil

        import evaluation

        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("LENGTHRL_SMOKE", "1")
        again = evaluation.evaluate_run(method="baseline", redo=True)
        assert again["limit"] == 8 and again["model_passed_in"] is False and "baseline_comparison" not in again
        shutil.copytree(run, tmp_path / "outputs" / "Group_method-smoke", ignore=shutil.ignore_patterns("eval"))
        other = evaluation.evaluate_run(method="group")
        assert other["baseline_comparison"]["n"] == 8
        assert other["baseline_comparison"]["labels"] == ["baseline", "group"]
        assert Path(other["baseline_results"]).parts[-3:] == ("Baseline-smoke", "eval", "eval_results.jsonl")
        assert Path(other["adapter_path"]).parts[-2:] == ("Group_method-smoke", "adapter")
        with pytest.raises(FileNotFoundError, match="no trained adapter"):
            evaluation.evaluate_run(method="ans_len")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ans_len", "group_ans_len"])
def test_length_methods_train(tmp_path, method, tokenizer_dir, gsm8k_dir):
    """The other two study methods build and run a real GRPO step; their length rewards are logged."""
    result = training.train(tiny_config(tmp_path, method=method, max_steps=1, max_completion_length=8,
                                        live_view=False))
    names = {f.__name__ for f in rewards.METHODS[method]}
    assert {f"rewards/{name}/mean" for name in names} <= set(result.log_history[0])
    assert result.output_dir == tmp_path / "run" and result.global_step == 1
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    record = json.loads((result.adapter_dir / "run_config.json").read_text())
    assert record["config"]["method"] == method and record["config"]["lam"] == 0.5


def _expected_question_order(config: training.TrainConfig, tokenizer) -> list[list[int]]:
    """Question ids of each step's generation batch, straight from TRL's seeded sampler (independent of training.py)."""
    from trl.trainer.utils import RepeatSampler

    dataset = training.data.training_dataset(tokenizer, config.gsm8k_dir, size=config.train_size,
                                             max_steps=config.max_steps_in_question, seed=config.seed)
    per_step = config.per_device_train_batch_size * config.steps_per_generation
    sampler = RepeatSampler(dataset, mini_repeat_count=config.num_generations,
                            batch_size=per_step // config.num_generations, repeat_count=config.steps_per_generation,
                            seed=config.seed)
    indices = list(sampler)
    ids = dataset["question_id"]
    block = per_step * config.steps_per_generation  # one generation batch, repeated steps_per_generation times
    return [sorted({ids[i] for i in indices[start:start + per_step]}) for start in range(0, len(indices), block)]


@pytest.mark.slow
def test_interrupt_keeps_checkpoints_and_rerun_resumes_in_order(tmp_path, tokenizer, tokenizer_dir, gsm8k_dir):
    config = tiny_config(tmp_path, method="group", max_steps=3, save_steps=1)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(config, callbacks=[interrupt_at(2)])
    checkpoints = run / "checkpoints"
    # checkpoint-1 from the regular schedule, checkpoint-2 the emergency save (the interrupt came before it).
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert training.latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    state = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (checkpoints / "checkpoint-2" / "optimizer.pt").is_file()
    assert not (run / "adapter").exists()
    # An interrupted run can already be plotted (from the newest checkpoint's state).
    figure = training.plot_training_curves(run, path=tmp_path / "partial.png")
    assert (tmp_path / "partial.png").is_file() and len(figure.axes) == 8

    # A half-written newer checkpoint (disconnect during a save) must be skipped, not break the resume.
    (checkpoints / "checkpoint-3").mkdir()
    result = training.train(config)
    assert result.resumed_from == str(checkpoints / "checkpoint-2")
    assert result.global_step == 3 and result.adapter_dir == run / "adapter"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert [e["step"] for e in result.log_history if "accuracy" in e] == [1, 2, 3]

    # Same data order: each step saw exactly the questions TRL's seeded sampler gives that step.
    seen = {}
    for line in (run / "batches.jsonl").read_text().splitlines():
        entry = json.loads(line)
        seen[entry["step"]] = sorted(set(entry["question_ids"]))
    expected = _expected_question_order(config, tokenizer)
    assert [seen[step] for step in (1, 2, 3)] == expected[:3]
    record = json.loads((result.adapter_dir / "run_config.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2") and record["train_seconds_total"] >= result.train_seconds

    # Another method in the same folder is refused rather than mixed into this run.
    with pytest.raises(ValueError, match="holds a different run"):
        training.train(tiny_config(tmp_path, method="ans_len", max_steps=3))


@pytest.mark.slow
def test_two_processes_give_the_same_group_rewards(tmp_path, tokenizer_dir, gsm8k_dir):
    """torchrun --nproc_per_node 2 (gloo, CPU): TRL's sampler and Accelerate's sharding hand each process whole
    groups, so group rewards computed per process equal a one-process computation on the same batch."""
    out = tmp_path / "dist"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), str(Path(__file__).resolve()), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())

    # 1) The same batch as the two processes held, scored by ONE process.
    for name in ("whole", "split"):
        batch = report[name]
        single = rewards.group_length_reward(batch["completions"], answer=batch["answer"],
                                             completion_ids=batch["completion_ids"], question_id=batch["question_id"],
                                             lam=0.5)
        assert sorted(set(batch["process"])) == [0, 1]
        if name == "whole":
            assert batch["penalties"] == pytest.approx(single, abs=1e-7)
            assert any(p < 0 for p in single)  # non-trivial: some completions are penalised
        else:  # groups split across processes: the per-process penalties differ (the reason for the check)
            assert batch["penalties"] != pytest.approx(single, abs=1e-7)
    # 2) A real 2-process GRPO step through training.train: every group was whole on its process.
    assert report["whole_groups"] == [1.0]
    # ...and each process generated its own whole group through the static decoder (one call, 4 x one prompt).
    assert report["rollout"] == "static"
    assert [len(calls) for calls in report["rollout_calls"]] == [1, 1]
    groups = [calls[0] for calls in report["rollout_calls"]]
    assert all(len(group) == 4 and len(set(map(tuple, group))) == 1 for group in groups)
    assert groups[0][0] != groups[1][0]
    owners: dict[int, set[int]] = {}
    for qid, process in zip(report["question_ids"], report["processes"]):
        owners.setdefault(qid, set()).add(process)
    assert len(owners) == 2 and all(len(p) == 1 for p in owners.values())
    assert {next(iter(p)) for p in owners.values()} == {0, 1}


def first_token_parity_reward(completions, completion_ids, **kwargs):
    """A reward that varies within a group even for a random model (the study's rewards are all 0 there)."""
    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]


@pytest.mark.slow
def test_new_registry_method_trains_the_adapter_with_gradient_checkpointing(tmp_path, monkeypatch, tokenizer_dir,
                                                                            gsm8k_dir):
    """A new method is one registry entry; with gradient checkpointing on (the GPU default) LoRA must get
    gradients: PEFT initialises lora_B to zero, so a nonzero lora_B after one step proves the adapter learned."""
    from safetensors.torch import load_file

    monkeypatch.setitem(rewards.METHODS, "parity", (rewards.format_reward, first_token_parity_reward))
    config = tiny_config(tmp_path, method="parity", max_steps=1, max_completion_length=8, gradient_checkpointing=True,
                         learning_rate=1e-3, warmup_ratio=0.0, live_view=False)
    result = training.train(config)
    assert result.log_history[0]["grad_norm"] > 0
    assert "rewards/first_token_parity_reward/mean" in result.log_history[0]
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert len(lora_b) == 14 and all(float(t.abs().sum()) > 0 for t in lora_b)  # 2 layers x 7 projections


def _distributed_worker(out: Path) -> None:
    """Run by torchrun: shard a synthetic batch exactly as GRPOTrainer does, then one real GRPO step."""
    import runtime

    runtime.import_wandb_early()  # before torch/transformers: a much faster import (see runtime.py)
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader
    from trl.trainer.utils import RepeatSampler

    import data

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    tokenizer = runtime.load_tokenizer()
    dataset = data.training_dataset(tokenizer, size=8)
    report: dict = {}
    generations = 4
    for name, per_process in (("whole", 4), ("split", 2)):
        # TRL: generation batch = per-process batch x processes, each prompt repeated G times, seeded order.
        sampler = RepeatSampler(dataset, mini_repeat_count=generations,
                                batch_size=per_process * accelerator.num_processes // generations, seed=1)
        loader = accelerator.prepare(DataLoader(dataset, batch_size=per_process, sampler=sampler,
                                                collate_fn=lambda rows: rows))
        rows = next(iter(loader))
        seen: dict[int, int] = {}
        ids, completions, answers, lengths = [], [], [], []
        for row in rows:
            # k: the completion's place in its group across processes, so split groups hold different completions
            k = rank * len(rows) + seen.setdefault(row["question_id"], 0)
            seen[row["question_id"]] += 1
            gold = int(float(row["gold"]))
            value = gold if k % 2 == 0 else gold + 1  # half of each group right
            completions.append(f"<reasoning>\n{'x ' * k}\n</reasoning>\n<answer>\n{value}\n</answer>")
            lengths.append(20 + 9 * k + row["question_id"] % 5)
            ids.append(row["question_id"])
            answers.append(row["answer"])
        completion_ids = [list(range(n)) for n in lengths]
        penalties = rewards.group_length_reward(completions, answer=answers, completion_ids=completion_ids,
                                                question_id=ids, lam=0.5)
        gathered = gather_object([{"question_id": i, "completions": c, "answer": a, "completion_ids": t,
                                   "penalties": p, "process": rank}
                                  for i, c, a, t, p in zip(ids, completions, answers, completion_ids, penalties)])
        report[name] = {key: [row[key] for row in gathered] for key in
                        ("question_id", "completions", "answer", "completion_ids", "penalties", "process")}
    # A real GRPO step on both processes through training.train (2 questions, one per process), rollouts from
    # the static decoder; a spy (the real method runs) records the prompts each process generates.
    import decoding

    rollout_calls: list[list[list[int]]] = []
    generate = decoding.RolloutDecoder.generate

    def spy(self, model, prompts, *args, **kwargs):
        rollout_calls.append([list(p) for p in prompts])
        return generate(self, model, prompts, *args, **kwargs)

    decoding.RolloutDecoder.generate = spy
    config = training.TrainConfig(model=runtime.TINY_MODEL, backend="trl", smoke=False, method="group",
                                  rollout="static",
                                  train_size=8, num_generations=4, per_device_train_batch_size=2,
                                  steps_per_generation=2, max_completion_length=8, max_steps=1, save_steps=1,
                                  precision="fp32", gradient_checkpointing=False, report_to="none",
                                  live_view=rank == 0, output_dir=str(out / "run"))
    result = training.train(config)
    decoding.RolloutDecoder.generate = generate
    everyone = gather_object([rollout_calls])
    if rank == 0:
        report["rollout_calls"] = everyone
        report["rollout"] = json.loads((out / "run" / "adapter" / "run_config.json").read_text())["rollout"]
        report["whole_groups"] = [e["whole_groups"] for e in result.log_history if "whole_groups" in e]
        batch = json.loads((out / "run" / "batches.jsonl").read_text().splitlines()[0])
        report["question_ids"], report["processes"] = batch["question_ids"], batch["processes"]
        (out / "report.json").write_text(json.dumps(report))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    _distributed_worker(Path(sys.argv[1]))


def test_grpo_overrides_cannot_bypass_the_whole_group_check():
    config = training.TrainConfig(grpo_overrides={"per_device_train_batch_size": 3})
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        training.check_config(config)


def test_an_unsloth_error_without_a_message_still_gives_one_line():
    assert runtime.first_line(AssertionError()) == ""
    assert runtime.first_line(ImportError("no GPU\ntraceback details")) == "no GPU"
