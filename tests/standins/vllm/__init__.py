"""Stand-in for vllm 0.11.2, which cannot run here (no GPU): importable, so that evaluation picks it, and its engine
fails to start as it may on a T4 (the ``engine`` stage). ``SamplingParams`` keeps its keyword arguments."""

from __future__ import annotations

from typing import Any

__version__ = "0.11.2"


class SamplingParams:
    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        raise RuntimeError("stand-in: Engine core initialization failed (FlashInfer JIT compilation on sm_75)")
