"""Rollouts: which generator makes a GRPO step's completions (``resolve_rollout``), and the one ``GRPOTrainer``
subclass that touches TRL's internals (``trainer_class``): the project's decoder (``decoding.RolloutDecoder``)
in place of ``generate``, metric logging and checkpoint saving.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import decoding
import runtime
from config import ROLLOUTS, TrainConfig

# --------------------------------------------------------------------------------------------------
# Rollouts: the generator, and the one GRPOTrainer subclass that touches TRL's internals
# --------------------------------------------------------------------------------------------------

ROLLOUT_LABELS = {"vllm": "vLLM", "static": "static KV-cache decoder", "generate": "transformers generate"}
# The GenerationConfig fields (set by TRL from GRPOConfig) that the static decoder honours; any other field that
# differs from transformers' default, e.g. a repetition penalty through generation_kwargs, is an error.
_STATIC_FIELDS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "pad_token_id",
                            "bos_token_id", "eos_token_id", "cache_implementation", "transformers_version"})


def check_rollout(config: TrainConfig) -> None:
    """One-line errors for a rollout choice that cannot run (part of ``check_config``; loads nothing)."""
    if config.rollout not in ROLLOUTS:
        raise ValueError(f"rollout must be one of {ROLLOUTS}, got {config.rollout!r}")
    if config.backend == "unsloth" and config.rollout == "static":
        raise ValueError("rollout='static' needs backend 'trl' or 'auto': Unsloth patches the model's attention, "
                         "which the project's decoder cannot drive (Unsloth without vLLM uses rollout 'generate')")
    if "use_vllm" in config.grpo_overrides:
        raise ValueError(f"grpo_overrides may not set use_vllm: choose the generator with rollout (one of {ROLLOUTS})")


def vllm_problem(config: TrainConfig) -> str | None:
    """Why vLLM cannot generate this run's rollouts; None when it is installed and imports."""
    import importlib.util

    if not runtime.has_cuda():
        return "no CUDA GPU"
    if config.model == runtime.TINY_MODEL:
        return "the tiny smoke model exists only in memory"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        import vllm  # noqa: F401
    except Exception as error:  # a broken install (version mismatch, CUDA libraries) fails here, not mid-run
        return f"vLLM did not import ({type(error).__name__}: {runtime.first_line(error)})"
    return None


def resolve_rollout(config: TrainConfig, backend: str) -> tuple[str, str]:
    """(generator, reason): how this run generates its rollouts, given the resolved ``backend``.

    ``vllm``: TRL's colocate mode (``trl``) or Unsloth's fast inference (``unsloth``); ``static``:
    ``decoding.RolloutDecoder`` inside ``trainer_class``; ``generate``: TRL's plain ``model.generate``. ``auto``
    takes vLLM when it is installed and imports, otherwise ``static`` (``generate`` on ``unsloth``, whose patched
    attention the decoder cannot drive), and the reason says why.
    """
    check_rollout(config)
    if config.rollout in ("static", "generate"):
        return config.rollout, "requested"
    problem = vllm_problem(config)
    if config.rollout == "vllm":
        if problem:
            raise RuntimeError(f"rollout='vllm' is not available: {problem}. Use rollout='static' or 'auto'.")
        return "vllm", "requested" + (" (Unsloth's fast inference)" if backend == "unsloth" else " (TRL colocate)")
    if problem and backend == "unsloth":  # its patched attention bypasses the interface the decoder drives
        return "generate", f"vLLM not used: {problem}; Unsloth generates itself"
    if problem:
        return "static", f"vLLM not used: {problem}"
    return "vllm", "Unsloth's fast inference" if backend == "unsloth" else "vLLM installed (TRL colocate)"


def startup_line(config: TrainConfig, backend: str, backend_reason: str, rollout: str, rollout_reason: str,
                 smoke_reason: str | None = None) -> str:
    """The run's first line: the rollout generator and the backend, each with the reason it was chosen."""
    if smoke_reason is None:
        return f"Rollouts: {rollout} ({rollout_reason}) · backend {backend} ({backend_reason})"
    return (f"Smoke mode ({smoke_reason}): rollouts {rollout} ({rollout_reason}), tiny random Qwen2, "
            f"{config.train_size} questions, {config.max_steps} GRPO steps, {config.max_completion_length}-token "
            f"completions, backend {backend} — not a real training run.")


def static_rollout_settings(generation: Any) -> decoding.DecodeSettings:
    """The decoder settings that sample what TRL's ``GenerationConfig`` asks for (GRPOConfig's temperature,
    top_p, top_k, min_p and ``generation_kwargs``; ``do_sample=False``: greedy), stopping at TRL's EOS token and
    padding with TRL's pad token. Unlike ``model.generate``, nothing comes from the model's own
    generation_config.json (Qwen's would bring temperature 0.7, top_p 0.8 and a repetition penalty), so the
    rollouts follow the distribution GRPOConfig states and the loss assumes, as TRL's vLLM path does."""
    unsupported = sorted(set(generation.to_diff_dict()) - _STATIC_FIELDS)
    if unsupported:
        raise ValueError(f"rollout='static' cannot honour generation setting(s) {', '.join(unsupported)}; "
                         "use rollout='generate' or drop them from generation_kwargs")
    eos = generation.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return decoding.DecodeSettings(
        max_new_tokens=generation.max_new_tokens, method="static",
        temperature=float(generation.temperature) if generation.do_sample else 0.0,
        top_k=generation.top_k, top_p=1.0 if generation.top_p is None else float(generation.top_p),
        min_p=generation.min_p, eos_token_ids=eos, pad_token_id=generation.pad_token_id)


@contextlib.contextmanager
def _generate_replaced(model: Any, generate: Callable[..., Any]) -> Iterator[None]:
    """``model.generate`` is ``generate`` for the duration (an instance attribute over the class's method)."""
    previous = model.__dict__.get("generate")
    model.generate = generate
    try:
        yield
    finally:
        if previous is None:
            del model.generate
        else:
            model.generate = previous


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class RolloutTrainer:
    """What training adds to the backend's ``GRPOTrainer``; ``trainer_class(base)`` mixes it over ``base``.

    The only code that touches TRL's internals:

    - ``rollout="static"``: completions come from ``decoding.RolloutDecoder``. TRL 0.22.2 generates inline in
      ``_generate_and_score_completions`` with ``unwrapped_model.generate(input_ids, attention_mask, ...)`` on
      left-padded prompts; for that call, the unwrapped model's ``generate`` is the decoder, which returns what
      ``generate`` returns: the prompts as given, then the completions right-padded with the pad token (each
      ending at its first EOS token or at ``max_completion_length``). TRL then builds the EOS mask, the
      ``completion_ids`` lists for the rewards, the log-probabilities and the advantages exactly as for its own
      ``generate``. The adapter is merged for the rollout (``merge_adapter``; default on CUDA) and recomputed from
      the current weights every call, so no rollout samples a stale policy. Each call is seeded from the run's
      seed, the process and the optimizer step, so a resumed run draws what an uninterrupted one would have;
    - ``record_metric`` / ``has_unlogged_metrics``: TRL's per-step metric buffer (``_metrics``);
    - ``save_checkpoint_now``: a full checkpoint at the current step (``_save_checkpoint``);
    - ``profile=True``: per-step seconds of generation, reference pass, rewards, policy forward/backward and the
      rest, logged as ``profile/*_s`` (the GPU is synchronised at each boundary).
    """

    def __init__(self, *args: Any, rollout: str = "generate", merge_adapter: bool | None = None,
                 profile: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if rollout not in ROLLOUTS[1:]:
            raise ValueError(f"rollout must be one of {ROLLOUTS[1:]} here (resolve 'auto' first), got {rollout!r}")
        self.rollout = rollout
        self.rollout_decoder: decoding.RolloutDecoder | None = None
        self.rollout_info: dict[str, Any] = {}  # what the last static rollout ran (method, slots, CUDA graphs)
        self._rollout_calls: dict[int, int] = {}
        self._in_rollout = False
        self.phase_seconds: dict[str, float] | None = None
        if rollout == "static":
            if getattr(self, "use_vllm", False) or getattr(self, "use_transformers_paged", False):
                raise ValueError("rollout='static' generates with decoding.py: turn use_vllm and "
                                 "use_transformers_paged off")
            if merge_adapter is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                merge_adapter = self.accelerator.device.type == "cuda" and hasattr(unwrapped, "merge_adapter")
            self.rollout_decoder = decoding.RolloutDecoder(static_rollout_settings(self.generation_config),
                                                           merge_adapter=merge_adapter)
        if profile:
            self.phase_seconds = dict.fromkeys(("rollout", "reference", "rewards", "train_step"), 0.0)
            self.add_callback(_phase_logger(self))

    # -- metrics and checkpoints -------------------------------------------------------------------
    def record_metric(self, name: str, value: float) -> None:
        """Append to TRL's metric buffer: averaged over the logging step and logged beside ``reward``."""
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value))

    def has_unlogged_metrics(self) -> bool:
        """True when training metrics are buffered for a step that has not been logged yet."""
        return bool(self._metrics["train"])

    def save_checkpoint_now(self) -> None:
        """Save a full checkpoint (adapter, optimizer, scheduler, RNG states, trainer state) at this step."""
        self._save_checkpoint(self.model, trial=None)

    # -- rollouts ----------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: Any) -> Any:
        self._in_rollout = True
        try:
            with self._timed("rollout"):
                if self.rollout_decoder is None:
                    return super()._generate_and_score_completions(inputs)
                model = self.accelerator.unwrap_model(self.model_wrapped)
                calls = self.rollout_decoder.calls
                with _generate_replaced(model, lambda **kwargs: self._static_generate(model, **kwargs)):
                    output = super()._generate_and_score_completions(inputs)
                if self.rollout_decoder.calls == calls:
                    raise RuntimeError("rollout='static': TRL generated without calling model.generate (a TRL "
                                       "version this trainer does not know); use rollout='generate'")
                return output
        finally:
            self._in_rollout = False

    def _static_generate(self, model: Any, input_ids: Any, attention_mask: Any, **_: Any) -> Any:
        """``model.generate``'s result for left-padded prompts: prompts, then right-padded completions."""
        import torch

        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        info: dict[str, Any] = {}
        completions = self.rollout_decoder.generate(model, prompts, seed=self._rollout_seed(), info=info)
        self.rollout_info = info
        block = torch.full((len(prompts), max(len(c) for c in completions)), self.generation_config.pad_token_id,
                           dtype=input_ids.dtype)
        for row, ids in enumerate(completions):
            block[row, :len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, block.to(input_ids.device)], dim=1)

    def _rollout_seed(self) -> int:
        """A seed per (run seed, process, optimizer step, call within the step): reproducible, and the same
        after a resume, which restores the step."""
        import numpy as np

        step = self.state.global_step
        call = self._rollout_calls.get(step, 0)
        self._rollout_calls[step] = call + 1
        entropy = [int(self.args.seed) & 0xFFFFFFFF, self.accelerator.process_index, step, call]
        return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)

    # -- profiling (profile=True) --------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        if self.phase_seconds is None:
            yield
            return
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.phase_seconds[phase] += time.perf_counter() - start

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._timed("train_step"):
            return super().training_step(*args, **kwargs)

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        with self._timed("rewards"):
            return super()._calculate_rewards(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        if not self._in_rollout:  # the policy's own forward (with gradients): part of training_step
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        with self._timed("reference"):  # reference model (and the old policy, when TRL needs it)
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _log_phases(self, step_seconds: float) -> None:
        seconds = self.phase_seconds
        phases = {"generation": seconds["rollout"] - seconds["reference"] - seconds["rewards"],
                  "reference": seconds["reference"], "rewards": seconds["rewards"],
                  "policy": seconds["train_step"] - seconds["rollout"],
                  "other": step_seconds - seconds["train_step"], "step": step_seconds}
        for name, value in phases.items():
            self._metrics["train"][f"profile/{name}_s"].append(value)
        self.phase_seconds = dict.fromkeys(seconds, 0.0)


def _phase_logger(trainer: RolloutTrainer) -> Any:
    """The callback that closes each optimizer step's phase times (``profile=True``)."""
    from transformers import TrainerCallback

    class PhaseLogger(TrainerCallback):
        start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _synchronize()
            trainer._log_phases(time.perf_counter() - self.start)

    return PhaseLogger()


_TRAINER_CLASSES: dict[type, type] = {}


def trainer_class(base: type) -> type:
    """``RolloutTrainer`` mixed over ``base``: TRL's ``GRPOTrainer``, or the class Unsloth puts in its place
    (built per base when first asked, since Unsloth replaces ``trl.GRPOTrainer`` when it is imported). Takes
    GRPOTrainer's arguments plus ``rollout`` (``vllm``, ``static`` or ``generate``), ``merge_adapter`` and
    ``profile``."""
    if base not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[base] = type(f"{base.__name__}WithRollouts", (RolloutTrainer, base),
                                      {"__doc__": RolloutTrainer.__doc__, "__module__": __name__})
    return _TRAINER_CLASSES[base]


