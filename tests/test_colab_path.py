"""The Colab T4 path on the CPU: a defined fallback at every stage of the Unsloth/vLLM start, the same run on both
backends, and the first-minutes report.

Unsloth and vLLM cannot run here, so ``tests/standins`` holds stand-ins for both, put on ``sys.path`` by the
``standin`` fixture; ``$STANDIN_UNSLOTH_FAIL`` makes the Unsloth stand-in fail at exactly one stage. Everything
else is real: TRL's GRPOTrainer (subclassed by the stand-in as Unsloth subclasses it), the tiny random Qwen2 with
the real tokenizer, local GSM8K, wandb offline.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STANDINS = Path(__file__).resolve().parent / "standins"
sys.path.insert(0, str(REPO))

import backends  # noqa: E402
import runtime  # noqa: E402
import training  # noqa: E402

HAS_ROLLOUT = hasattr(training.TrainConfig(), "rollout")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class StandIn:
    """``fail_at(stage)`` chooses the stage where the Unsloth stand-in fails; ``restart()`` is a fresh runtime:
    TRL's own classes back, no Unsloth imported, nothing failing."""

    def __init__(self, monkeypatch):
        import trl
        import trl.trainer.grpo_config
        import trl.trainer.grpo_trainer

        self.monkeypatch = monkeypatch
        self.originals = [(module, name, getattr(module, name))
                          for module in (trl, trl.trainer, trl.trainer.grpo_trainer, trl.trainer.grpo_config)
                          for name in ("GRPOTrainer", "GRPOConfig") if hasattr(module, name)]
        for module, name, value in self.originals:
            monkeypatch.setattr(module, name, value)  # restored after the test, whatever the stand-in did
        monkeypatch.syspath_prepend(str(STANDINS))
        for name in ("STANDIN_UNSLOTH_FAIL", "UNSLOTH_VLLM_STANDBY"):
            monkeypatch.delenv(name, raising=False)
        self.forget()

    def __call__(self, stage: str) -> None:
        self.monkeypatch.setenv("STANDIN_UNSLOTH_FAIL", stage)

    fail_at = __call__

    @staticmethod
    def forget() -> None:
        for name in [name for name in sys.modules if name.split(".")[0] in ("unsloth", "vllm")]:
            del sys.modules[name]

    def restart(self) -> None:
        for module, name, value in self.originals:
            setattr(module, name, value)
        self.monkeypatch.delenv("STANDIN_UNSLOTH_FAIL", raising=False)
        self.forget()


@pytest.fixture
def standin(monkeypatch):
    """Put the stand-ins on sys.path; ``standin(stage)`` makes Unsloth's fail there. TRL's classes, which the
    Unsloth stand-in replaces process-wide as Unsloth does, and the environment are restored afterwards."""
    standin = StandIn(monkeypatch)
    yield standin
    standin.forget()


def tiny_config(tmp_path: Path, **overrides) -> training.TrainConfig:
    settings = dict(model=runtime.TINY_MODEL, backend="unsloth", smoke=False, train_size=8, num_generations=4,
                    per_device_train_batch_size=4, steps_per_generation=2, max_completion_length=8, max_steps=2,
                    save_steps=1, precision="fp32", gradient_checkpointing=False, report_to="none",
                    live_view=False, output_dir=str(tmp_path / "run"))
    settings.update(overrides)
    return training.TrainConfig(**settings)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# Stages: import and patch
# --------------------------------------------------------------------------------------------------

def test_import_and_patch_failures_decide_the_backend():
    assert backends.backend_after_unsloth_failure("auto", "import", "no GPU", trl_patched=False) == (
        "trl", "Unsloth not used: no GPU")
    with pytest.raises(backends.StageFailure, match="stage 'import'") as stopped:
        backends.backend_after_unsloth_failure("unsloth", "import", "no GPU", trl_patched=False)
    assert 'BACKEND = "trl"' in one_line(stopped) and "restart" not in one_line(stopped)
    # Unsloth half-ran: TRL is patched for the whole process, so only a restart gives plain TRL back.
    for requested, stage, patched in (("auto", "import", True), ("auto", "patch", False), ("unsloth", "patch", True)):
        with pytest.raises(backends.StageFailure, match=f"stage '{stage}'") as stopped:
            backends.backend_after_unsloth_failure(requested, stage, "boom", trl_patched=patched)
        assert 'BACKEND = "trl"' in one_line(stopped) and "restart the runtime" in one_line(stopped)
    if not runtime.has_cuda():
        assert training.resolve_backend("auto") == ("trl", "Unsloth not used: no CUDA GPU")


def test_unsloth_that_does_not_import_stops_with_one_line(standin):
    standin("import")
    with pytest.raises(backends.StageFailure) as stopped:
        training.resolve_backend("unsloth", use_vllm=False)
    message = one_line(stopped)
    assert "stage 'import'" in message and "stand-in: Unsloth cannot find a supported GPU" in message
    assert "UNSLOTH_VLLM_STANDBY" not in training.os.environ  # no vLLM wanted: standby stays off


def test_unsloth_that_does_not_patch_trl_stops_with_one_line(standin):
    import trl

    original = trl.GRPOTrainer
    standin("patch")
    with pytest.raises(backends.StageFailure) as stopped:
        training.resolve_backend("unsloth", use_vllm=True)
    message = one_line(stopped)
    assert "stage 'patch'" in message and "did not patch TRL's GRPOTrainer" in message
    assert 'BACKEND = "trl" (CLI: --backend trl), restart the runtime' in message
    assert trl.GRPOTrainer is original
    assert training.os.environ["UNSLOTH_VLLM_STANDBY"] == "1"  # set before the import, as vLLM was wanted


def test_unsloth_that_imports_and_patches_is_used(standin):
    import trl

    assert training.resolve_backend("unsloth", use_vllm=False) == ("unsloth", "requested")
    assert trl.GRPOTrainer.__name__ == "UnslothGRPOTrainer"


# --------------------------------------------------------------------------------------------------
# Stages: load, engine, generate (Unsloth's vLLM) fall back to Unsloth without fast inference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["load", "engine", "generate"])
def test_a_vllm_stage_that_fails_goes_on_without_fast_inference(standin, stage, tmp_path, tokenizer_dir):
    standin(stage)
    assert training.resolve_backend("unsloth")[0] == "unsloth"
    import unsloth

    lines: list[str] = []
    started = training.start_unsloth(tiny_config(tmp_path), "fp32", fast_inference=True, out=lines.append)
    assert [call["fast_inference"] for call in unsloth.CALLS] == [True, False]  # one vLLM try, never a second
    assert all(call["use_exact_model_name"] for call in unsloth.CALLS)
    assert started.fast_inference is False and not hasattr(started.model, "vllm_engine")
    assert lines == started.notes and len(lines) == 1
    assert f"failed at stage '{stage}'" in lines[0] and "without fast inference" in lines[0]
    if HAS_ROLLOUT:
        assert started.config.rollout == "generate"


def test_vllm_that_starts_and_generates_is_kept(standin, tmp_path, tokenizer_dir):
    training.resolve_backend("unsloth")
    started = training.start_unsloth(tiny_config(tmp_path, model="Qwen/Qwen2.5-0.5B-Instruct"), "fp32",
                                     fast_inference=True, out=pytest.fail)
    assert started.fast_inference is True and started.notes == []
    assert started.model.vllm_engine is not None and started.vllm_memory_share == 0.6  # what the engine took
    # use_exact_model_name=True: the repo asked for, not Unsloth's copy (which the loader's mapper would pick).
    assert started.model_repo == "Qwen/Qwen2.5-0.5B-Instruct"


def test_loading_without_vllm_that_fails_stops(standin, tmp_path, tokenizer_dir):
    standin("load_any")
    training.resolve_backend("unsloth", use_vllm=False)
    with pytest.raises(backends.StageFailure) as stopped:
        training.start_unsloth(tiny_config(tmp_path), "fp32", fast_inference=False)
    assert "stage 'load'" in one_line(stopped) and 'BACKEND = "trl"' in one_line(stopped)


def test_going_on_without_vllm_needs_the_memory_back():
    note = backends.vllm_failure_note("engine", "RuntimeError: x", free_gib=None)
    assert note.startswith("Unsloth's vLLM failed at stage 'engine' (RuntimeError: x)")
    assert backends.vllm_failure_note("engine", "x", free_gib=backends.NO_VLLM_MIN_FREE_GIB)
    with pytest.raises(backends.StageFailure, match=r"only 3\.0 GiB") as stopped:
        backends.vllm_failure_note("generate", "RuntimeError: x", free_gib=3.0)
    assert "stage 'generate'" in one_line(stopped) and 'ROLLOUT = "static"' in one_line(stopped)


@pytest.mark.skipif(not HAS_ROLLOUT, reason="needs TrainConfig.rollout (rollouts branch)")
def test_rollout_vllm_asked_for_stops_instead(standin, tmp_path, tokenizer_dir):
    standin("engine")
    training.resolve_backend("unsloth")
    with pytest.raises(backends.StageFailure) as stopped:
        training.start_unsloth(tiny_config(tmp_path, rollout="vllm"), "fp32", fast_inference=True)
    assert "stage 'engine'" in one_line(stopped) and 'ROLLOUT = "static"' in one_line(stopped)


# --------------------------------------------------------------------------------------------------
# Stages: trainer construction and the first step, through train()
# --------------------------------------------------------------------------------------------------

def test_a_trainer_that_cannot_be_built_stops_with_one_line(standin, tmp_path, tokenizer_dir, gsm8k_dir):
    standin("trainer")
    with pytest.raises(backends.StageFailure) as stopped:
        training.train(tiny_config(tmp_path))
    message = one_line(stopped)
    assert "stage 'trainer'" in message and "could not compile its GRPO loss" in message
    assert 'BACKEND = "trl"' in message and "restart the runtime" in message  # no vLLM: the trl backend
    with_vllm = training.trainer_failure(RuntimeError("x"), "unsloth", use_vllm=True)
    assert with_vllm.fix.startswith('set ROLLOUT = "static"')
    assert training.trainer_failure(RuntimeError("x"), "trl", use_vllm=True) is None  # a TRL error keeps its traceback


def test_a_vllm_engine_failing_inside_trls_trainer_stops_with_one_line(standin):
    import vllm

    try:
        vllm.LLM("Qwen/Qwen2.5-0.5B-Instruct")  # what TRL's colocate mode does in GRPOTrainer.__init__
    except RuntimeError as error:
        failure = training.trainer_failure(error, "trl", use_vllm=True)
    assert failure.stage == "engine" and failure.fix.startswith('set ROLLOUT = "static"')
    assert "Engine core initialization failed" in str(failure)


def test_out_of_memory_at_the_first_step_stops_with_the_setting_to_lower(standin, tmp_path, tokenizer_dir,
                                                                         gsm8k_dir, capsys):
    standin("first_step")
    with pytest.raises(backends.StageFailure) as stopped:
        training.train(tiny_config(tmp_path))
    message = one_line(stopped)
    assert "stage 'first_step'" in message and "out of memory" in message
    assert "per_device_train_batch_size=2, steps_per_generation=4" in message  # the same 8 completions a step
    assert "── Run start" in capsys.readouterr().out  # the report came first
    # The fix, in the same folder after a restart: nothing was trained there, so the run starts afresh.
    standin.restart()
    result = training.train(tiny_config(tmp_path, backend="trl", per_device_train_batch_size=2,
                                        steps_per_generation=4, max_steps=1))
    assert result.global_step == 1 and result.backend == "trl"


def test_only_errors_before_the_first_step_ends_are_first_step_failures():
    import torch

    config = training.TrainConfig()
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert training.first_step_failure(oom, steps_done=1, config=config, use_vllm=False) is None
    assert training.first_step_failure(ValueError("a bug"), steps_done=0, config=config, use_vllm=False) is None
    assert 'ROLLOUT = "static"' in training.first_step_failure(oom, 0, config, use_vllm=True).fix
    single = training.TrainConfig(per_device_train_batch_size=1, steps_per_generation=16, num_generations=8)
    assert "max_completion_length" in training.first_step_failure(oom, 0, single, use_vllm=False).fix


# --------------------------------------------------------------------------------------------------
# The same run on both backends
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_both_backends_train_with_the_same_effective_arguments(standin, tmp_path, tokenizer_dir, gsm8k_dir,
                                                               capsys):
    """One real GRPO run per backend (Unsloth's rewrites from the stand-in): the effective trainer arguments in
    run_config.json agree except for the fields only Unsloth has; the project's metrics are logged; the report
    reaches stdout, run_config.json and W&B (offline)."""
    trl_result = training.train(tiny_config(tmp_path / "trl", backend="trl", report_to="wandb"))
    result = training.train(tiny_config(tmp_path / "unsloth", report_to="wandb"))  # imports the stand-in
    import unsloth

    assert result.backend == "unsloth" and trl_result.backend == "trl"
    assert unsloth.CALLS[-1]["fast_inference"] is False  # vLLM is absent: no fast inference, no use_vllm
    records = [json.loads((r.adapter_dir / "run_config.json").read_text()) for r in (trl_result, result)]
    assert records[1]["effective_args"]["use_vllm"] is False
    comparison = training.compare_arguments(records[0]["effective_args"], records[1]["effective_args"])
    assert comparison == {"different": {}, "only_first": [], "only_second": sorted(unsloth.UNSLOTH_FIELDS)}
    assert records[1]["rewritten_args"] == {}  # Unsloth changed nothing that was passed
    assert records[1]["effective_args"]["weight_decay"] == 0.0
    assert records[1]["model_effective"] == runtime.TINY_MODEL
    for entry in (e for e in result.log_history if "accuracy" in e):
        for key in ("accuracy", "format_accuracy", "mean_length", "out_of_limit", "whole_groups", "reward"):
            assert key in entry

    report = records[1]["first_minutes"]
    assert (report["backend"], report["backend_reason"]) == ("unsloth", "requested")
    assert report["measured_step"] == 2 and report["seconds_per_step"] > 0 and report["fits_session"] is True
    assert report["versions"]["trl"] == "0.22.2"
    out = capsys.readouterr().out
    assert out.count("── Run start") == 2 and "Backend    unsloth (requested)" in out
    assert out.count("Step time  ") == 4  # block (not measured yet), then the measured line, per run
    config, summary = wandb_offline_record(tmp_path / "unsloth" / "run")
    assert json.loads(config["first_minutes"])["backend"] == "unsloth"
    assert float(summary["seconds_per_step"]) == pytest.approx(report["seconds_per_step"])


def wandb_offline_record(run_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(config, summary) of the offline W&B run in ``run_dir``, as JSON strings, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(path)
    config: dict[str, str] = {}
    summary: dict[str, str] = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key: item.value_json for item in record.summary.update})
    return config, summary


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_pinned_arguments_make_the_backends_agree(standin, precision, tmp_path, tokenizer):
    """At each GPU precision, with and without vLLM: TRL's GRPOConfig and the one Unsloth builds (its default
    rewrites, then its trainer's) agree once the pinned arguments are passed, and disagree without them."""
    import torch
    from trl import GRPOConfig as TRLConfig  # TRL's own, taken before the stand-in patches TRL

    training.resolve_backend("unsloth", use_vllm=False)
    import unsloth

    assert unsloth.UnslothGRPOConfig is not TRLConfig and issubclass(unsloth.UnslothGRPOConfig, TRLConfig)

    model = runtime.build_tiny_qwen2(tokenizer).to(torch.float16 if precision == "fp16" else torch.bfloat16)
    config = training.TrainConfig(gradient_checkpointing=True)
    for use_vllm in (False, True):
        if use_vllm:
            model.vllm_engine = object()
        trl_args = TRLConfig(**training.grpo_arguments(config, tmp_path, "trl", precision, use_vllm)).to_dict()
        args = unsloth.UnslothGRPOConfig(**training.grpo_arguments(config, tmp_path, "unsloth", precision, use_vllm))
        unsloth.trainer_rewrites(args, model)
        comparison = training.compare_arguments(trl_args, args.to_dict())
        assert comparison["different"] == {}, (precision, use_vllm)

    unpinned = {name: value for name, value in training.grpo_arguments(config, tmp_path, "unsloth", precision, False)
                .items() if name not in backends.PINNED_ARGUMENTS}
    del model.vllm_engine
    args = unsloth.UnslothGRPOConfig(**unpinned)
    unsloth.trainer_rewrites(args, model)
    trl_args = TRLConfig(**{n: v for n, v in training.grpo_arguments(config, tmp_path, "trl", precision, False)
                            .items() if n not in backends.PINNED_ARGUMENTS}).to_dict()
    different = training.compare_arguments(trl_args, args.to_dict())["different"]
    assert different["weight_decay"] == [0.0, 0.001]
    assert {"torch_empty_cache_steps", "logging_nan_inf_filter", "vllm_mode", "eval_accumulation_steps"} <= set(
        different)


def test_compare_arguments_ignores_paths_and_lists_one_sided_fields():
    first = {"output_dir": "a", "weight_decay": 0.0, "report_to": ["wandb"], "seed": 1}
    second = {"output_dir": "b", "weight_decay": 0.001, "report_to": ["wandb"], "seed": 1, "unsloth_num_chunks": -1}
    assert training.compare_arguments(first, second) == {
        "different": {"weight_decay": [0.0, 0.001]}, "only_first": [], "only_second": ["unsloth_num_chunks"]}


# --------------------------------------------------------------------------------------------------
# The first-minutes report
# --------------------------------------------------------------------------------------------------

T4_FIELDS = {
    "gpu": "Tesla T4", "compute_capability": "7.5", "memory_total_gib": 14.74, "memory_free_gib": 3.2,
    "precision": "fp16", "precision_reason": backends.precision_reason("auto", "fp16", (7, 5)),
    "backend": "unsloth", "backend_reason": "Unsloth imported and patched TRL",
    "rollout": "vllm", "rollout_reason": "Unsloth's fast inference started",
    "model": runtime.MODEL_ID, "model_effective": runtime.MODEL_ID,
    "versions": {"python": "3.12.11", "torch": "2.9.0", "trl": "0.22.2", "unsloth": "2026.10.9", "numpy": "2.0.2"},
    "t4_vllm_environment": {"UNSLOTH_VLLM_NO_FLASHINFER": "1", "VLLM_ATTENTION_BACKEND": "TRITON_ATTN"},
    "fallbacks": [], "save_steps": 50, "save_to_drive": False, "colab": True, "start_step": 0, "total_steps": 2000,
    "vllm_memory_share": 0.76,
}


def test_precision_reasons():
    assert backends.precision_reason("auto", "fp16", (7, 5)) == "compute capability 7.5 < 8.0: no bf16 in hardware"
    assert backends.precision_reason("auto", "bf16", (9, 0)) == "compute capability 9.0 >= 8.0: bf16 in hardware"
    assert backends.precision_reason("auto", "fp32", None) == "no CUDA GPU"
    assert backends.precision_reason("fp16", "fp16", (9, 0)) == "requested"


def test_first_minutes_block_before_and_after_the_measurement():
    block = backends.format_first_minutes(T4_FIELDS)
    lines = block.splitlines()
    assert lines[1] == "GPU        Tesla T4, compute capability 7.5; 3.2 of 14.7 GiB free"
    assert "Precision  fp16 (compute capability 7.5 < 8.0: no bf16 in hardware)" in lines
    assert "Rollouts   vllm (Unsloth's fast inference started)" in lines
    assert "vLLM       0.76 of the GPU memory" in lines
    assert "Versions   torch 2.9.0 · trl 0.22.2 · unsloth 2026.10.9" in lines  # the stack, not python/numpy
    assert "T4 vLLM    UNSLOTH_VLLM_NO_FLASHINFER=1 VLLM_ATTENTION_BACKEND=TRITON_ATTN (unverified on a T4)" in lines
    assert "Steps      2000" in lines and lines[-2].startswith("Step time  measured after step 2")

    # 2000 steps at 30 s: 16.7 h, more than a 12 h session.
    slow = {**T4_FIELDS, **backends.project_run(30.0, 1998), "measured_step": 2, "first_step_seconds": 95.0}
    assert slow["projected_hours"] == pytest.approx(1998 * 30 / 3600, abs=0.01) and slow["fits_session"] is False
    line = backends.format_step_time(slow)
    assert line.startswith("Step time  30.0 s a step (step 2; step 1 with warm-up: 95.0 s) -> 1998 steps left ≈ "
                           "16.6 h: more than one session")
    assert "run all cells again" in line and "SAVE_TO_DRIVE = True" in line
    on_drive = backends.format_step_time({**slow, "save_to_drive": True})
    assert "on Google Drive" in on_drive and "SAVE_TO_DRIVE" not in on_drive
    fast = {**T4_FIELDS, **backends.project_run(12.0, 1998), "measured_step": 2, "first_step_seconds": 60.0}
    assert fast["fits_session"] is True and backends.format_step_time(fast).endswith(
        "≈ 6.7 h: fits (a Colab session lasts at most 12 h, often less)")


def test_report_measures_step_two_and_records_it(tmp_path):
    record = tmp_path / "run_config.json"
    record.write_text(json.dumps({"config": {"method": "baseline"}}))
    printed: list[str] = []
    report = training.FirstMinutesReport({**T4_FIELDS, "gpu": None}, record_path=record, out=printed.append)
    report.train_begin(global_step=100, max_steps=2000)
    assert "resuming after step 100" in printed[0] and "GPU        none (CPU)" in printed[0]
    report.step_end(101, 2000)
    assert len(printed) == 1  # step 1 carries the warm-up: not measured
    report.step_end(102, 2000)
    assert printed[1].startswith("Step time  ") and "1898 steps left" in printed[1]
    saved = json.loads(record.read_text())
    assert saved["config"] == {"method": "baseline"}  # the rest of the record is kept
    assert saved["first_minutes"]["measured_step"] == 2 and saved["first_minutes"]["steps_left"] == 1898
    report.step_end(103, 2000)
    assert len(printed) == 2  # measured once


# --------------------------------------------------------------------------------------------------
# Evaluation falls back to hf
# --------------------------------------------------------------------------------------------------

def test_evaluation_falls_back_from_vllm_to_hf(standin, tmp_path, tokenizer, gsm8k_dir, capsys):
    import evaluation

    folder = tmp_path / "tiny"
    runtime.build_tiny_qwen2(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = evaluation.evaluate(evaluation.EvalConfig(model=str(folder), backend="vllm", limit=2, max_new_tokens=4,
                                                        smoke=False, progress=False, output_dir=str(tmp_path / "e")))
    assert summary["backend"] == "hf" and summary["metrics"]["n"] == 2
    assert summary["backend_reason"].startswith("vllm failed (RuntimeError: stand-in: Engine core initialization")
    assert summary["generation_info"]["fallback_from"] == "vllm"
    assert f"Backend: hf ({summary['backend_reason']})" in capsys.readouterr().out.splitlines()


def test_evaluation_falls_back_from_unsloth_to_hf_on_the_same_model(standin, tmp_path, tokenizer, gsm8k_dir):
    import evaluation

    standin("generate")
    training.resolve_backend("unsloth")
    import unsloth

    model, _ = unsloth.FastLanguageModel.from_pretrained(runtime.TINY_MODEL, fast_inference=True)
    config = evaluation.EvalConfig(model=runtime.TINY_MODEL, limit=2, max_new_tokens=4, progress=False,
                                   output_dir=str(tmp_path / "e"))
    assert evaluation._pick_backend(config, model)[0] == "unsloth"
    summary = evaluation.evaluate(config, model=model, tokenizer=tokenizer)
    assert summary["backend"] == "hf" and summary["model_passed_in"] is True
    assert "unsloth failed (RuntimeError: stand-in: FlashInfer sampler failed" in summary["backend_reason"]
    # Unsloth without fast inference: fast_generate only wraps generate, so it is no reason to pick "unsloth".
    plain, _ = unsloth.FastLanguageModel.from_pretrained(runtime.TINY_MODEL, fast_inference=False)
    plain.fast_generate = plain.generate
    assert evaluation._pick_backend(config, plain)[0] == "hf"


# --------------------------------------------------------------------------------------------------
# The GPU check script, dry-run with the stand-in
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_script_runs_with_the_standin(tmp_path, tokenizer_dir, gsm8k_dir):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{STANDINS}{os.pathsep}{REPO}", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "check.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "check_unsloth.py"), "--model", runtime.TINY_MODEL, "--steps", "1",
         "--max-completion-length", "8", "--eval-limit", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["unsloth"]["missing_metrics"] == [] and summary["unsloth"]["logged_steps"] == [1]
    assert summary["unsloth"]["run_config"]["backend"] == "unsloth" and summary["trl"]["run_config"]["backend"] == "trl"
    assert summary["effective_args_trl_vs_unsloth"]["different"] == {}
    assert summary["eval_from_disk"]["n"] == summary["eval_in_memory"]["n"] == 2
    assert "Effective trainer arguments, trl vs unsloth:" in completed.stdout
