"""Shared fixtures: the real Qwen tokenizer, local GSM8K and a tiny random Qwen2.

Local assets are found as the code finds them (``$QWEN_TOKENIZER``, ``$GSM8K_DIR``, or ``shared/`` beside
the repository); tests that need one skip with a clear reason when it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# wandb first: imported after torch/transformers it makes `from trl import GRPOTrainer` ~30 s slower here.
import wandb  # noqa: E402, F401

import data  # noqa: E402
import runtime  # noqa: E402


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    path = runtime.gsm8k_dir()
    if path is None:
        pytest.skip("local GSM8K not found: set GSM8K_DIR to a folder with train.jsonl and test.jsonl")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    path = runtime.find_local("qwen-tokenizer", "QWEN_TOKENIZER")
    if path is None:
        pytest.skip("local Qwen tokenizer not found: set QWEN_TOKENIZER to a folder with tokenizer.json")
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return runtime.load_tokenizer(tokenizer_dir)


@pytest.fixture()
def tiny_model(tokenizer):
    return runtime.build_tiny_qwen2(tokenizer, seed=0)


@pytest.fixture()
def one_cpu_thread():
    """The tiny model's many small ops run several times faster on one thread (no OpenMP hand-offs); test modules
    that train or decode use it for every test (``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lively(model):
    """Re-draw a tiny model's weights (seeded, larger scale) so greedy continuations vary token to token."""
    import torch

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


def interrupt_at(step: int):
    """A real trainer callback that raises KeyboardInterrupt at the end of an optimizer step (like Ctrl-C)."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return Interrupt()
