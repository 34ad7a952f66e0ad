"""Run integrity (issue 10): re-runs, resumes, seeds, signals and bad input never silently change a result.

Every training here is a real GRPO run (real TRL, the tiny random Qwen2, the real tokenizer, local GSM8K) on the
CPU; the signal tests send real SIGINT/SIGTERM/SIGKILL, in this process or to a training subprocess (this file run
as a script, see ``_worker``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conftest import interrupt_at  # noqa: E402

import rewards  # noqa: E402
import runtime  # noqa: E402
import training  # noqa: E402

# Keys of a log history that measure the machine, not the run.
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
PARITY = "parity"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# Set by a test: raise this signal while the rewards of that step are computed (mid-step, during generation).
_SIGNAL_AT: dict[str, int] = {}


def first_token_parity_reward(completions, completion_ids, trainer_state=None, **kwargs):
    """Varies within a group even for a random model, so the GRPO loss is not zero (the study's rewards are 0)."""
    if _SIGNAL_AT and trainer_state is not None and trainer_state.global_step + 1 == _SIGNAL_AT["step"]:
        signum = _SIGNAL_AT.pop("signal")
        _SIGNAL_AT.clear()
        signal.raise_signal(signum)
    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]


def _register_parity() -> None:
    rewards.METHODS[PARITY] = (rewards.format_reward, first_token_parity_reward)


@pytest.fixture()
def parity_method():
    _register_parity()
    yield PARITY
    rewards.METHODS.pop(PARITY, None)


def config_for(run: Path, **overrides) -> training.TrainConfig:
    """A small real configuration: 2 questions of 4 completions a step, learning rate high enough to move."""
    settings = dict(model=runtime.TINY_MODEL, backend="trl", smoke=False, train_size=8, num_generations=4,
                    per_device_train_batch_size=4, steps_per_generation=2, max_completion_length=8, max_steps=2,
                    save_steps=1, precision="fp32", gradient_checkpointing=False, report_to="none", live_view=False,
                    learning_rate=1e-3, warmup_ratio=0.0, output_dir=str(run))
    settings.update(overrides)
    return training.TrainConfig(**settings)


def _signal_in_optimizer_step(step: int, signum: int):
    """A trainer callback sending a real signal to this process right after the optimizer update of ``step``."""
    from transformers import TrainerCallback

    class Send(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                signal.raise_signal(signum)

    return Send()


def _steps(history, key):
    return {entry["step"]: entry[key] for entry in history if key in entry}


def _batches(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "batches.jsonl").read_text().splitlines() if line.strip()]


def _sessions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines() if line.strip()]


def _one_line_error(capsys, argv, *expected: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        training.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    # One line naming the problem, last, and no traceback (progress bars of data loading may come before it).
    line = err.splitlines()[-1]
    assert line.startswith("training.py: error: ") and "Traceback" not in err, err
    assert [text for text in err.splitlines() if "error" in text.lower()] == [line], err
    for text in expected:
        assert text in line, err
    return line


# --------------------------------------------------------------------------------------------------
# 1. A finished run is finished
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_running_a_finished_run_again_reuses_it(tmp_path, capsys, parity_method, tokenizer_dir, gsm8k_dir):
    run = tmp_path / "run"
    first = training.train(config_for(run, method=parity_method, max_steps=2))
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert first.global_step == 2 and not first.reused
    capsys.readouterr()

    # The same command again (and the same without max_steps): nothing trained, the adapter untouched.
    for max_steps in (2, None):
        again = training.train(config_for(run, method=parity_method, max_steps=max_steps))
        assert again.reused and again.global_step == 2 and again.adapter_dir == run / "adapter"
        assert "finished run (2 steps): re-using it" in capsys.readouterr().out
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [e["step"] for e in _batches(run)] == [1, 2]
    assert sorted(_steps(json.loads((run / "log_history.json").read_text()), "loss")) == [1, 2]

    # Shorter is a contradiction, not a silent re-use.
    with pytest.raises(runtime.ConfigError, match="finished at step 2: max_steps=1 cannot shorten it"):
        training.train(config_for(run, method=parity_method, max_steps=1))

    # Training further takes an explicit larger max_steps: exactly the missing step, and the old adapter's
    # evaluation is kept apart from the new adapter.
    (run / "eval").mkdir()
    (run / "eval" / "eval_summary.json").write_text("{}")
    further = training.train(config_for(run, method=parity_method, max_steps=3))
    assert not further.reused and further.global_step == 3
    assert further.resumed_from == str(run / "checkpoints" / "checkpoint-2")
    assert [e["step"] for e in _batches(run)] == [1, 2, 3]
    assert sorted(_steps(further.log_history, "loss")) == [1, 2, 3]
    assert (run / "eval-step-2" / "eval_summary.json").is_file() and not (run / "eval").exists()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != adapter
    record = json.loads((run / "adapter" / "run_config.json").read_text())
    assert record["global_step"] == 3 and record["max_steps"] == 3 and len(record["sessions"]) == 2
    assert record["sessions"][1]["changed"] == {"max_steps": [2, 3]}

    # Stopped after its last checkpoint but before the adapter was saved: the checkpoint becomes the adapter,
    # nothing is trained again.
    shutil.rmtree(run / "adapter")
    capsys.readouterr()
    final = training.train(config_for(run, method=parity_method, max_steps=3))
    assert "its adapter saved to" in capsys.readouterr().out
    assert final.global_step == 3 and final.resumed_from == str(run / "checkpoints" / "checkpoint-3")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (
        run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    assert (run / "adapter" / "tokenizer_config.json").is_file() and not (run / "adapter" / "optimizer.pt").exists()
    assert [e["step"] for e in _batches(run)] == [1, 2, 3]
    assert training.train(config_for(run, method=parity_method, max_steps=None)).reused


# --------------------------------------------------------------------------------------------------
# 2. Every setting that shapes training is part of the run's identity
# --------------------------------------------------------------------------------------------------

def test_run_identity_covers_every_training_setting():
    identity = set(training.RUN_IDENTITY)
    for name in ("learning_rate", "beta", "temperature", "lora_r", "lora_alpha", "loss_type", "warmup_ratio",
                 "lr_scheduler_type", "max_prompt_length", "precision", "backend", "grpo_overrides", "model"):
        assert name in identity, name
    fields = {spec.name for spec in training.dataclasses.fields(training.TrainConfig)}
    # Every field is either identity, allowed to change, or max_steps (which may only grow): none is forgotten.
    assert identity | set(training.RESUME_MAY_CHANGE) | {"max_steps"} == fields
    assert not identity & set(training.RESUME_MAY_CHANGE)


@pytest.mark.slow
def test_resuming_with_a_changed_setting_is_a_one_line_error(tmp_path, capsys, tokenizer_dir, gsm8k_dir):
    run = tmp_path / "run"
    argv = ["--output-dir", str(run), "--model", runtime.TINY_MODEL, "--backend", "trl", "--no-smoke",
            "--train-size", "8", "--num-generations", "4", "--per-device-train-batch-size", "4",
            "--steps-per-generation", "2", "--max-completion-length", "8", "--max-steps", "4", "--save-steps", "1",
            "--precision", "fp32", "--no-gradient-checkpointing", "--report-to", "none", "--no-live-view", "--no-eval"]
    config = training.config_from_args(training.build_parser().parse_args(argv))
    with pytest.raises(KeyboardInterrupt):
        training.train(config, callbacks=[interrupt_at(1)])
    capsys.readouterr()

    # The cases: each a one-line error naming the field, the saved and the new value; nothing trained.
    _one_line_error(capsys, [*argv, "--lora-r", "8"], "holds a different run", "lora_r: saved 16 vs now 8")
    _one_line_error(capsys, [*argv, "--learning-rate", "1e-3", "--beta", "0.5", "--temperature", "0.3"],
                    "learning_rate: saved 1e-05 vs now 0.001", "beta: saved 0.005 vs now 0.5",
                    "temperature: saved 1.0 vs now 0.3")
    assert [e["step"] for e in _batches(run)] == [1]
    assert not (run / "checkpoints" / "checkpoint-2").exists()

    # What may change does, and is recorded per session; run_config.json says what actually trained.
    result = training.main([*argv, "--save-steps", "3", "--live-view"])
    assert result.global_step == 4 and "── step 2:" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-3", "checkpoint-4"]
    saved = json.loads((run / "run_config.json").read_text())
    assert [s["changed"] for s in saved["sessions"]] == [{}, {"save_steps": [1, 3], "live_view": [False, True]}]
    assert saved["config"]["save_steps"] == 3
    assert _steps(result.log_history, "learning_rate")[4] == saved["config"]["learning_rate"]


# --------------------------------------------------------------------------------------------------
# 3. Checkpoints are validated before resuming
# --------------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, tokenizer_dir, gsm8k_dir):
    run = tmp_path / "run"
    config = config_for(run, max_steps=3, save_total_limit=2)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, callbacks=[interrupt_at(2)])
    checkpoints = run / "checkpoints"
    for step in (1, 2):  # regular and emergency saves alike end with the marker, listing every file
        marker = json.loads((checkpoints / f"checkpoint-{step}" / training.CHECKPOINT_MARKER).read_text())
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(marker["files"])
        assert training.checkpoint_problem(checkpoints / f"checkpoint-{step}") is None

    # Each way the issue broke the resume: the newest checkpoint is skipped, and the reason names the file.
    for name, why in (("adapter_model.safetensors", "adapter_model.safetensors is truncated"),
                      ("optimizer.pt", "optimizer.pt is truncated"),
                      ("trainer_state.json", "trainer_state.json is truncated")):
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(checkpoints, copy)
        _truncate(copy / "checkpoint-2" / name)
        newest, skipped = training.find_checkpoint(copy)
        assert newest == copy / "checkpoint-1"
        assert [(p.name, why in problem) for p, problem in skipped] == [("checkpoint-2", True)]
    # Half a trainer_state.json with no marker at all (a kill while the trainer wrote it), and a bare folder.
    state = checkpoints / "checkpoint-2" / "trainer_state.json"
    (checkpoints / "checkpoint-2" / training.CHECKPOINT_MARKER).unlink()
    _truncate(state)
    (checkpoints / "checkpoint-3").mkdir()
    capsys.readouterr()

    result = training.train(config)
    err = capsys.readouterr().err
    assert f"skipping {checkpoints / 'checkpoint-3'}: no {training.CHECKPOINT_MARKER}" in err
    assert f"skipping {checkpoints / 'checkpoint-2'}: no {training.CHECKPOINT_MARKER}" in err
    assert result.resumed_from == str(checkpoints / "checkpoint-1") and result.global_step == 3
    assert [e["step"] for e in _batches(run)] == [1, 2, 3]
    # The skipped folders are set aside, not trained into; save_total_limit=2 kept the two newest complete ones.
    names = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-2.incomplete", "checkpoint-3", "checkpoint-3.incomplete"]
    assert all(training.checkpoint_problem(checkpoints / f"checkpoint-{s}") is None for s in (2, 3))


# --------------------------------------------------------------------------------------------------
# 4. An empty or fully filtered training set is an error before the model loads
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_empty_training_set_stops_before_the_model_loads(tmp_path, capsys, tokenizer_dir, gsm8k_dir):
    # An empty folder as the model: loading it would fail with an OSError, so a ConfigError proves the order.
    model = tmp_path / "not-a-model"
    model.mkdir()
    run = tmp_path / "outputs" / "run"
    with pytest.raises(runtime.ConfigError, match=r"training set has 0 question\(s\).*nothing to train"):
        training.train(config_for(run, model=str(model), max_steps_in_question=1))  # no question has 1 step
    assert not (tmp_path / "outputs").exists()  # no folder left behind
    empty = tmp_path / "gsm8k-empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    _one_line_error(capsys, ["--output-dir", str(run), "--model", str(model), "--no-smoke", "--backend", "trl",
                             "--report-to", "none", "--gsm8k-dir", str(empty), "--no-eval"],
                    "training set has 0 question(s)")
    assert not (tmp_path / "outputs").exists()
    # Fewer questions than one step needs is the same "0 steps" run.
    with pytest.raises(runtime.ConfigError, match=r"has 1 question.*one step needs 2"):
        training.train(config_for(run, model=str(model), train_size=1))


# --------------------------------------------------------------------------------------------------
# 5. Same seed, same run
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_seed_gives_a_bit_identical_run(tmp_path, parity_method, tokenizer_dir, gsm8k_dir):
    from safetensors.torch import load_file

    results = [training.train(config_for(tmp_path / name, method=parity_method, seed=seed, max_steps=max_steps))
               for name, seed, max_steps in (("a", 7, 2), ("b", 7, 2), ("c", 8, 1))]
    adapters = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in results]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(bool((adapters[0][k] == adapters[1][k]).all()) for k in adapters[0])  # bit-identical
    histories = [[{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in r.log_history] for r in results[:2]]
    assert histories[0] == histories[1] and all(e["grad_norm"] > 0 for e in histories[0] if "grad_norm" in e)
    # Not trivially equal: another seed draws other LoRA A weights.
    lora_a = [k for k in adapters[0] if "lora_A" in k]
    assert lora_a and any(not bool((adapters[0][k] == adapters[2][k]).all()) for k in lora_a)


# --------------------------------------------------------------------------------------------------
# 6. Signals, records written as training goes, and a resume that repeats the uninterrupted run
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_a_signal_matches_the_uninterrupted_run(tmp_path, capsys, parity_method, tokenizer_dir,
                                                            gsm8k_dir):
    """SIGINT during a step's generation (an emergency checkpoint of the last finished step) and SIGINT during a
    step's optimizer update (the step is finished and saved first): the resumed run trains the same questions
    with the same losses and token counts, step by step, as a run never interrupted."""
    settings = dict(method=parity_method, max_steps=4, save_steps=10)  # no regular checkpoint before the end
    reference = training.train(config_for(tmp_path / "reference", **settings))
    # The logged loss is rounded to 4 digits (near 0 on-policy); the gradient norm and the KL are not.
    expected = {key: _steps(reference.log_history, key) for key in ("loss", "grad_norm", "kl", "num_tokens", "reward")}
    assert sorted(expected["loss"]) == [1, 2, 3, 4] and all(expected["grad_norm"].values())

    for name, stop_after in (("generation", 2), ("optimizer", 3)):
        run = tmp_path / name
        config = config_for(run, **settings)
        with pytest.raises(KeyboardInterrupt):
            if name == "generation":
                _SIGNAL_AT.update(step=3, signal=signal.SIGINT)
                training.train(config)
            else:
                training.train(config, callbacks=[_signal_in_optimizer_step(3, signal.SIGINT)])
        assert training.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / f"checkpoint-{stop_after}"
        # Written as training went: the curves and the time of the interrupted session.
        assert sorted(_steps(json.loads((run / "log_history.json").read_text()), "loss")) == list(
            range(1, stop_after + 1))
        assert [(s["status"], s["end_step"]) for s in _sessions(run)] == [("interrupted", stop_after)]
        if name == "optimizer":
            assert "SIGINT: finishing this step" in capsys.readouterr().out

        result = training.train(config)
        assert result.global_step == 4 and result.resumed_from.endswith(f"checkpoint-{stop_after}")
        for key, values in expected.items():
            assert _steps(result.log_history, key) == values, (name, key)
        batches = _batches(run)
        assert [b["step"] for b in batches] == [1, 2, 3, 4]  # the interrupted step once, not twice
        assert [b["question_ids"] for b in batches] == [b["question_ids"] for b in _batches(tmp_path / "reference")]
        assert [b.get("resumed_from") for b in batches] == [None] * stop_after + [f"checkpoint-{stop_after}"] + [
            None] * (3 - stop_after)
        sessions = _sessions(run)
        assert [(s["status"], s["start_step"], s["end_step"]) for s in sessions] == [
            ("interrupted", 0, stop_after), ("finished", stop_after, 4)]
        record = json.loads((run / "adapter" / "run_config.json").read_text())
        assert record["train_seconds_total"] == pytest.approx(sum(s["seconds"] for s in sessions))
        assert record["train_seconds_total"] > record["train_seconds"] > 0


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    return env


def _newest_step(run: Path) -> int:
    newest = training.latest_checkpoint(run / "checkpoints")
    return int(newest.name.split("-")[1]) if newest is not None else 0


def _start_worker(config: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(config)], env=_env(),
                                stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent)


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out\n" + log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_and_sigkill_keep_the_run(tmp_path, parity_method, tokenizer_dir, gsm8k_dir):
    """A real training process: SIGKILL after step 2 (checkpoints every step) keeps its curves and its time;
    SIGTERM two steps after the resume (during that step's generation) saves a checkpoint and ends the process
    as SIGTERM does; the run then resumes and finishes with every step once."""
    run = tmp_path / "run"
    config = {key: value for key, value in training.dataclasses.asdict(
        config_for(run, method=parity_method, max_steps=10, save_steps=1)).items()}

    killed = _start_worker(config, tmp_path / "killed.log")
    _wait_for(lambda: _newest_step(run) >= 2, killed, tmp_path / "killed.log")
    killed.kill()
    killed.wait(60)
    history = json.loads((run / "log_history.json").read_text())
    assert {1, 2} <= set(_steps(history, "loss"))
    first = _sessions(run)
    assert first[0]["status"] == "running" and first[0]["end_step"] >= 2 and first[0]["seconds"] > 0

    config["save_steps"] = 10  # the next checkpoint can only come from SIGTERM
    stopped = _start_worker(config, tmp_path / "stopped.log")
    resume_step = _newest_step(run)
    # This session has trained its first step (so batches.jsonl lost the killed session's later steps) and
    # generated its second: SIGTERM comes during that step.
    _wait_for(lambda: len(_sessions(run)) == 2 and _sessions(run)[1]["end_step"] > resume_step
              and any(b["step"] == resume_step + 2 for b in _batches(run)), stopped, tmp_path / "stopped.log")
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(120) == -signal.SIGTERM, (tmp_path / "stopped.log").read_text()[-3000:]
    sessions = _sessions(run)
    assert [s["status"] for s in sessions] == ["killed", "interrupted"]
    assert sessions[1]["end_step"] == _newest_step(run) >= resume_step + 1
    assert "emergency checkpoint" in (tmp_path / "stopped.log").read_text() or "Stopped at step" in (
        tmp_path / "stopped.log").read_text()

    result = training.train(training.TrainConfig(**config))
    assert result.global_step == 10
    assert [b["step"] for b in _batches(run)] == list(range(1, 11))
    record = json.loads((run / "adapter" / "run_config.json").read_text())
    assert [s["status"] for s in record["sessions"]] == ["killed", "interrupted", "finished"]
    assert record["train_seconds_total"] == pytest.approx(sum(s["seconds"] for s in _sessions(run)))


# --------------------------------------------------------------------------------------------------
# 8. Configuration errors: one line, before any model loads, no folder left behind
# --------------------------------------------------------------------------------------------------

def test_config_errors_are_one_line_and_leave_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--no-smoke", "--report-to", "none", "--no-eval"]
    _one_line_error(capsys, [*base, "--model", str(tmp_path / "nope")], "no such local folder", "nope")
    _one_line_error(capsys, [*base, "--model", "./models/qwen"], "model './models/qwen': no such local folder")
    _one_line_error(capsys, [*base, "--method", "group", "--lam", "-0.5"], "lam must be a number >= 0")
    _one_line_error(capsys, [*base, "--method", "group", "--reward-params", "lam=0.1"],
                    "lam is set twice, lam=0.5 and reward_params lam=0.1")
    _one_line_error(capsys, [*base, "--method", "group", "--reward-params", "lamda=1"], "takes no parameter")
    _one_line_error(capsys, [*base, "--tokenizer", str(tmp_path / "tok")], "tokenizer", "no such local folder")
    _one_line_error(capsys, [*base, "--temperature", "0"], "temperature must be > 0")
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(runtime.ConfigError, match="no such local folder"):  # --debug: the full traceback
        training.main([*base, "--model", str(tmp_path / "nope"), "--debug"])
    # The same reward parameter twice with one value is consistent, not an error.
    training.check_config(training.TrainConfig(method="group", lam=0.25, reward_params={"lam": 0.25}))


def test_reward_parameters_are_checked_before_training(tmp_path, capsys):
    if getattr(rewards, "check_params", None) is None:
        pytest.skip("rewards.check_params (type and range checks of reward parameters) is not in this rewards.py")
    _one_line_error(capsys, ["--no-smoke", "--report-to", "none", "--no-eval", "--output-dir", str(tmp_path / "run"),
                             "--method", "kimi", "--reward-params", "weight=abc"], "weight")
    assert not (tmp_path / "run").exists()


def test_smoke_mode_says_which_settings_it_replaced(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = training.TrainConfig(smoke=True, train_size=100, max_completion_length=64, lora_r=8, lam=-1.0)
    assert training.smoke_overrides(given) == {"train_size": (100, 8), "max_completion_length": (64, 32)}
    assert training.smoke_overrides(training.TrainConfig()) == {}
    with pytest.raises(runtime.ConfigError, match="lam must be"):  # stops right after the banner: nothing runs
        training.train(given)
    assert "Smoke mode replaced: max_completion_length 64 -> 32, train_size 100 -> 8" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()


def _worker(config_json: str) -> None:
    """Run as a script by the signal tests: one real training run of the parity method."""
    try:
        import wandb  # noqa: F401  (before torch and transformers: a much faster import, see training.py)
    except ImportError:
        pass
    import torch

    torch.set_num_threads(1)
    _register_parity()
    training.train(training.TrainConfig(**json.loads(config_json)))


if __name__ == "__main__":
    _worker(sys.argv[1])
