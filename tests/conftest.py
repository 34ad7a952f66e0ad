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
