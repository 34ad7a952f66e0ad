#!/usr/bin/env bash
# Wheels for the GPU check of issue 13: unsloth/unsloth_zoo 2026.10.9 without vLLM on the device's torch 2.11
# (Python 3.12, x86-64, no network there). Run from the repository root:
#   benchmarks/device_unsloth_wheels.sh [DIR]          (DIR defaults to .whl-unsloth; keep it git-ignored)
#
# What the device image lacks, from `pip list` there (2026-11-26: torch 2.11.0, torchvision 0.26.0, triton 3.6.0,
# peft 0.21.0, transformers 5.17.0; typer, rich, click, einops, sentencepiece, protobuf, regex, psutil, pyyaml, wheel
# present), against the Requires-Dist of unsloth and unsloth_zoo 2026.10.9:
# - fetched here: peft 0.21.2 (the project's new pin), bitsandbytes, torchao (peft >= 0.19 refuses torchao < 0.16),
#   cut_cross_entropy, msgspec, hf_transfer, tyro and its needs (the releases the Colab set resolves to);
# - left out: xformers (built for torch 2.9.0; unsloth imports it guarded), vllm and flashinfer (the check runs
#   without vLLM), diffusers, pydantic, json5, nest_asyncio, structlog (unsloth and unsloth_zoo import none of them,
#   or only inside try/except), and the project's own set (transformers 4.56.2, trl, datasets, ...), which
#   `../shared/tools/device-wheels .whl` fetches; drop its peft-0.17.1 wheel, the peft here replaces it.
#
# On the device (one pip call, base set and this set together; SITE is any scratch folder):
#   python3 -m pip install -q --no-index --no-deps --target "$SITE" $(ls .whl/*.whl | grep -v peft-0.17) .whl-unsloth/*.whl
#   export PYTHONPATH="$SITE"
# The folder is over one 64 MiB carry: carry bitsandbytes (43 MB) in its own call, or split it with
# ../shared/tools/device-split.
set -eu
dir=${1:-.whl-unsloth}
tools=$(cd "$(dirname "$0")/../.." && pwd)/shared/tools
"$tools/device-wheels" "$dir" \
  "unsloth==2026.10.9" "unsloth_zoo==2026.10.9" "peft==0.21.2" "bitsandbytes==0.50.2" "torchao==0.17.0" \
  "cut_cross_entropy==25.1.1" "msgspec==0.22.0" "hf_transfer==0.1.9" \
  "tyro==1.0.17" "docstring-parser==0.18.0" "typeguard==4.6.1"
