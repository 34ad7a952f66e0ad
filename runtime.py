"""Where are we running, and where do models, data and outputs live? The bottom layer: imports no project module.

One small module so that notebooks, CLIs and tests agree on:
- smoke mode (a tiny random model on the CPU; set ``LENGTHRL_SMOKE=1``, or automatic without a GPU) and its sizes,
- local copies of the Hub assets (``GSM8K_DIR``, ``QWEN_TOKENIZER``, or a ``shared/`` folder beside the repo),
- Colab specifics (Drive, secrets) and Weights & Biases without interactive prompts,
- where a run lives (``run_dir``: method -> folder), the process rank, the device, the git commit, the dtype,
- the command lines' shared parts: options from a dataclass's fields, one-line errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_ID = "Qwen/Qwen2.5-0.5B-Instruct"
# Sentinel model name: a tiny randomly initialised Qwen2 with the real Qwen tokenizer (tests, smoke runs).
TINY_MODEL = "tiny-random-qwen2"
GSM8K_HUB_ID = "openai/gsm8k"
# The smoke configuration's size, shared by training and evaluation: questions trained on and evaluated,
# and new tokens per completion.
SMOKE_QUESTIONS = 8
SMOKE_NEW_TOKENS = 32
# The study's four runs live in these folders (the notebooks' folders); any other method in a folder of its name.
METHOD_FOLDERS = {
    "baseline": "Baseline",
    "ans_len": "Ans_len_considering",
    "group": "Group_method",
    "group_ans_len": "Group_method_with_ans_len_considering",
}

_REPO_DIR = Path(__file__).resolve().parent


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (None when absent), for run records."""
    import platform
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "vllm", "unsloth", "unsloth_zoo",
                    "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def default_precision() -> str:
    """``bf16`` on GPUs that run it natively (``supports_bf16``), ``fp16`` on other GPUs (the T4), ``fp32`` on the CPU.

    Training and Hugging Face evaluation both take it from here."""
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if supports_bf16() else "fp16"


def supports_bf16() -> bool:
    """True on a CUDA GPU of compute capability >= 8.0 (Ampere and newer), the GPUs with bf16 in hardware.

    Not ``torch.cuda.is_bf16_supported()``: in torch 2.9 it counts emulation by default (``including_emulation=True``)
    and says True on a T4 (7.5), where only Unsloth's import patches it back to False. vLLM refuses bf16 below 8.0
    for the same reason (``check_if_supports_dtype`` in vllm 0.11.2 ``platforms/cuda.py``)."""
    capability = cuda_capability()
    return capability is not None and capability >= BF16_MIN_CAPABILITY


def in_colab() -> bool:
    return "google.colab" in sys.modules


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def wants_smoke(smoke: bool | None) -> bool:
    """A configuration's ``smoke`` field resolved: True or False as set, None -> ``smoke_mode()``."""
    return smoke_mode() if smoke is None else bool(smoke)


def smoke_mode() -> bool:
    """True when ``LENGTHRL_SMOKE`` is set to 1/true, or when it is unset and no CUDA GPU is present."""
    value = os.environ.get("LENGTHRL_SMOKE", "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    if value:
        raise ValueError(f"LENGTHRL_SMOKE must be 1 or 0, got {value!r}")
    return not has_cuda()


def _shared_candidates(name: str) -> list[Path]:
    # ``shared/`` sits beside the repository in this project's workplace; notebooks may run from a
    # sub-folder or from a copy of the repo, so also look upwards from the working directory.
    roots = [_REPO_DIR, Path.cwd(), *Path.cwd().parents]
    seen: list[Path] = []
    for root in roots:
        for candidate in (root / "shared" / name, root.parent / "shared" / name):
            if candidate not in seen:
                seen.append(candidate)
    return seen


def find_local(name: str, env_var: str, explicit: str | os.PathLike | None = None) -> Path | None:
    """Resolve a local asset: explicit argument, then ``$env_var``, then ``shared/<name>``; else None.

    An explicit path or environment variable that does not exist is an error (a typo must not silently
    fall back to a download).
    """
    for source, value in (("argument", explicit), (env_var, os.environ.get(env_var))):
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"{source} points to {str(path)!r}, which does not exist")
            return path
    for candidate in _shared_candidates(name):
        if candidate.exists():
            return candidate
    return None


def gsm8k_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """Folder with GSM8K ``train.jsonl``/``test.jsonl``, or None to load ``openai/gsm8k`` from the Hub."""
    return find_local("gsm8k", "GSM8K_DIR", explicit)


def tokenizer_source(explicit: str | os.PathLike | None = None, model_name: str = MODEL_ID) -> str:
    """Where to load the tokenizer from: a local folder when one is found, else the model's Hub id."""
    local = find_local("qwen-tokenizer", "QWEN_TOKENIZER", explicit)
    if local is not None:
        return str(local)
    if model_name == TINY_MODEL:
        return MODEL_ID
    return model_name


def load_tokenizer(explicit: str | os.PathLike | None = None, model_name: str = MODEL_ID):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(explicit, model_name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_tokenizer(tokenizer: Any = None, model_name: str = MODEL_ID) -> Any:
    """A tokenizer object as given; None -> the default (``load_tokenizer``); a path -> loaded from there."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer, model_name)
    return tokenizer


def tiny_qwen2_config(vocab_size: int) -> Any:
    """A 2-layer Qwen2 small enough to train on a laptop CPU in seconds (same architecture as the real one)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def build_tiny_qwen2(tokenizer, seed: int = 0):
    """Deterministic tiny random Qwen2: the same seed always gives the same weights (train then re-evaluate)."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = tiny_qwen2_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


_PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(precision: str | None = None) -> Any:
    """The torch dtype of ``"bf16"``/``"fp16"``/``"fp32"`` (or ``"bfloat16"``/``"float16"``/``"float32"``);
    None or ``"auto"``: ``default_precision()``."""
    import torch

    if precision in (None, "auto"):
        precision = default_precision()
    name = _PRECISIONS.get(precision, precision)
    if name not in _PRECISIONS.values():
        raise ConfigError(f"unknown precision {precision!r}; choose one of {[*_PRECISIONS, *_PRECISIONS.values()]}")
    return getattr(torch, name)


def device_name() -> str:
    """The GPU's name, else the CPU's with its core count (for run records and benchmarks)."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str | None:
    """The repository's commit (40 hex digits), None outside a git checkout (e.g. a notebook's copy)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_DIR, capture_output=True, text=True,
                                timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _process_group() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank: torch.distributed's once it is initialised, else ``$RANK`` (set by ``accelerate
    launch``/``torchrun`` before it is), 0 for a single process."""
    group = _process_group()
    return group.get_rank() if group is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes of this launch, read like ``rank`` (``$WORLD_SIZE`` before torch.distributed starts)."""
    group = _process_group()
    return group.get_world_size() if group is not None else int(os.environ.get("WORLD_SIZE", "1"))


def import_wandb_early() -> None:
    """Import wandb (when installed) before torch and transformers: TRL imports it anyway, and wandb's pydantic
    models look up their source module (``inspect.getmodule`` scans ``sys.modules``) at import, so importing it
    first is ~3x faster (44 s -> 16 s for ``from trl import GRPOTrainer`` on a 2-core machine)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass


def get_secret(name: str) -> str | None:
    """A secret from the environment, else from Colab's secrets panel; None when absent or not granted."""
    value = os.environ.get(name)
    if value:
        return value
    if in_colab():
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            return userdata.get(name)
        except Exception:  # SecretNotFoundError, NotebookAccessError, ...: treat as absent
            return None
    return None


def setup_wandb(project: str = "length-rl-gsm8k") -> str:
    """Configure Weights & Biases without ever prompting; returns the mode ("online" or "offline").

    With a ``WANDB_API_KEY`` (environment or Colab secret) runs log online; otherwise offline, to be
    synced later with ``wandb sync <run dir>/wandb/offline-run-*``.
    """
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("WANDB_SILENT", "true")
    key = get_secret("WANDB_API_KEY")
    if key and os.environ.get("WANDB_MODE", "") != "offline":
        os.environ["WANDB_API_KEY"] = key
        os.environ["WANDB_MODE"] = "online"
    else:
        os.environ["WANDB_MODE"] = "offline"
    return os.environ["WANDB_MODE"]


DRIVE_MOUNT = Path("/content/drive")


def mount_drive() -> Path:
    """Mount Google Drive at ``/content/drive`` unless it is mounted already (Colab only); returns the mount."""
    if not (DRIVE_MOUNT / "MyDrive").exists():
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(str(DRIVE_MOUNT))
    return DRIVE_MOUNT


def drive_path(text: str) -> Path | None:
    """``/content/drive/...``, ``drive/...`` or ``MyDrive/...`` as a mounted Google Drive path (mounted on demand
    in Colab); None for anything else, including a local folder that happens to be called ``drive/`` or ``MyDrive/``.
    A Drive path outside Colab is a ``ConfigError``."""
    if Path(text).expanduser().exists():
        return None
    prefixes = (("/content/drive/", DRIVE_MOUNT), ("drive/", DRIVE_MOUNT), ("MyDrive/", DRIVE_MOUNT / "MyDrive"))
    for prefix, base in prefixes:
        if text.startswith(prefix):
            if not (DRIVE_MOUNT / "MyDrive").exists():
                if not in_colab():
                    raise ConfigError(f"{text!r} is a Google Drive path, but this is not Colab: copy the folder "
                                      "locally and pass that path")
                mount_drive()
            return Path(base) / text[len(prefix):]
    return None


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file, then rename it: an interrupted run never leaves a half file that looks
    complete (the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def output_dir(folder: str, save_to_drive: bool = False, drive_root: str = "MyDrive/length-rl") -> Path:
    """Where a run writes: Google Drive when asked (mounted on demand in Colab), else ``outputs/<folder>``."""
    if save_to_drive:
        if not in_colab():
            raise RuntimeError("save_to_drive=True needs Google Colab; set it to False to write to local disk")
        path = mount_drive() / drive_root / folder
    else:
        path = Path("outputs") / folder
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_folder(method: str, smoke: bool = False, folder: str | None = None) -> str:
    """The folder name of a run: ``folder`` when given, else the method's (``METHOD_FOLDERS``, else the method's own
    name); smoke runs add ``-smoke`` so that they never mix with real runs."""
    name = folder or METHOD_FOLDERS.get(method, method)
    return name if not smoke or name.endswith("-smoke") else f"{name}-smoke"


def run_dir(method: str, save_to_drive: bool = False, smoke: bool = False, folder: str | None = None) -> Path:
    """Where the run of ``method`` lives: ``outputs/<run_folder>``, or on Google Drive with ``save_to_drive``
    (never for a smoke run)."""
    return output_dir(run_folder(method, smoke, folder), save_to_drive and not smoke)


class ConfigError(ValueError):
    """A setting or input the user must change. CLIs print it as one line (no traceback unless ``--debug``)."""


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value`` (cache lengths, batch splits)."""
    return -(-value // multiple) * multiple


@contextlib.contextmanager
def one_line_errors(debug: bool = False, prog: str = sys.argv[0]) -> Iterator[None]:
    """CLI guard: a ``ConfigError`` (or a missing file) ends the program with one line naming the problem and
    exit status 2; ``debug`` re-raises it with the full traceback instead."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"{Path(prog).name}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------------
# The GPU's compute capability, and the vLLM settings a T4 (7.5) needs
# --------------------------------------------------------------------------------------------------

BF16_MIN_CAPABILITY = (8, 0)

# Set before unsloth or vllm is imported on GPUs below compute capability 8.0. Each setting was read in the pinned
# sources (requirements-colab.txt), not run: unverified on a T4.
T4_VLLM_ENVIRONMENT = {
    # unsloth_zoo 2026.10.9 vllm_utils.py, load_vllm: without this switch it sets VLLM_ATTENTION_BACKEND=FLASHINFER
    # and VLLM_USE_FLASHINFER_SAMPLER=1 on every GPU once vLLM >= 0.11 ("On 0.11.0, Flashinfer also works!"), and
    # vllm 0.11.2 always installs flashinfer-python 0.5.2, which JIT-compiles its kernels and is reported broken on
    # sm_75. With UNSLOTH_VLLM_NO_FLASHINFER=1 it turns the FlashInfer sampler off, drops a FLASHINFER backend and
    # hides the flashinfer package from vLLM. Unverified on a T4.
    "UNSLOTH_VLLM_NO_FLASHINFER": "1",
    # vllm 0.11.2 platforms/cuda.py, _get_backend_priorities: decoder attention is FLASH_ATTN (needs 8.0), then
    # FLASHINFER (7.5 to 12.1), then TRITON_ATTN (any GPU). Naming TRITON_ATTN skips FlashInfer where Unsloth is
    # not in charge too (TRL's colocated vLLM, evaluation's vllm backend); unsloth_zoo keeps any non-empty value
    # other than FLASHINFER. Unverified on a T4.
    "VLLM_ATTENTION_BACKEND": "TRITON_ATTN",
}
# Not set, because the pinned sources show no T4-specific need: enforce_eager (no capability check in either
# library), max_num_seqs (unsloth_zoo picks it from free memory and honours an explicit value), and the memory
# share (with UNSLOTH_VLLM_STANDBY=1 unsloth_zoo moves gpu_memory_utilization to 0.8 x 0.95 = 0.76 on a 15 GB
# GPU, up or down, unless UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE=1).


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) compute capability of the current CUDA GPU; None without one (or without torch)."""
    if not has_cuda():
        return None
    import torch

    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def t4_vllm_settings(capability: tuple[int, int] | None) -> dict[str, str]:
    """The environment variables vLLM needs on a GPU of this compute capability: ``T4_VLLM_ENVIRONMENT`` below
    8.0, nothing on newer GPUs or without a GPU (None)."""
    if capability is None or tuple(capability) >= BF16_MIN_CAPABILITY:
        return {}
    return dict(T4_VLLM_ENVIRONMENT)


def t4_vllm_environment(capability: tuple[int, int] | None = None) -> dict[str, str]:
    """Put ``t4_vllm_settings`` for this GPU (``capability`` defaults to the current one) into ``os.environ``.

    Call it before unsloth or vllm is imported. A variable that is already set (the user's choice) is kept.
    Returns the variables this call set, for the run record."""
    if capability is None:
        capability = cuda_capability()
    applied: dict[str, str] = {}
    for name, value in t4_vllm_settings(capability).items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return applied


# --------------------------------------------------------------------------------------------------
# Notebooks: figures and tables inline, progress bars without warnings
# --------------------------------------------------------------------------------------------------

def in_notebook() -> bool:
    """True inside a Jupyter or Colab kernel; False in a script, a terminal IPython or pytest."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def show(item: Any, text: str | None = None) -> None:
    """The one way figures and tables reach the user: inline in a notebook, as ``text`` (when given) elsewhere.

    In a notebook a matplotlib figure is rendered to PNG here, so it shows whatever the backend (a figure made
    without pyplot has no inline formatter, and would display as ``<Figure size ...>``); a pyplot figure is then
    closed so the inline backend does not show it a second time. Anything else (a pandas DataFrame or Styler,
    shown as an HTML table) goes to IPython's ``display``. ``None`` shows nothing.
    """
    if not in_notebook():
        if text is not None:
            print(text, flush=True)
        return
    if item is None:
        return
    from IPython.display import Image, display

    if hasattr(item, "savefig"):
        buffer = io.BytesIO()
        item.savefig(buffer, format="png", dpi=100)
        display(Image(data=buffer.getvalue(), format="png"))
        if getattr(item.canvas, "manager", None) is not None:  # made by pyplot
            import matplotlib.pyplot as plt

            plt.close(item)
    else:
        display(item)


def _has_widgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(**tqdm_arguments: Any) -> Any:
    """A tqdm bar: the notebook widget where ipywidgets is installed (Colab), else the text bar (terminals, and
    Jupyter without widgets, where ``tqdm.auto`` would warn "IProgress not found" first)."""
    if in_notebook() and _has_widgets():
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(**tqdm_arguments)


def _quiet_tqdm_auto() -> None:
    # In a kernel without ipywidgets, the first import of ``tqdm.auto`` (by datasets, transformers, ...) warns
    # "IProgress not found" and falls back to the text bar, which is what we want: import it once, quietly.
    # Every module imports runtime before those libraries, so this import is the first.
    if "tqdm.auto" in sys.modules or not in_notebook() or _has_widgets():
        return
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        try:
            import tqdm.auto  # noqa: F401
        except ImportError:  # no tqdm: nothing will warn either
            pass


_quiet_tqdm_auto()
# Command lines from dataclasses (training.py, evaluation.py and results.py)
# --------------------------------------------------------------------------------------------------

_SCALARS = {"int": int, "float": float, "str": str}


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (the value through ``parse_value``), for dict-valued options."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, defaults: bool = True) -> None:
    """One option per field of the dataclass ``cls`` (``--field-name``), typed by its annotation (``int``,
    ``float``, ``str``, ``bool`` as ``--x/--no-x``, optionally ``| None``; ``dict`` as repeatable ``KEY=VALUE``),
    its help text from the field's ``metadata["help"]``. With ``defaults`` an option left out takes the field's
    default; without, it stays None (left out by ``dataclass_values``: the caller fills it in)."""
    for spec in dataclasses.fields(cls):
        option = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata.get("help", "")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        given = default if defaults else None
        type_name = str(spec.type).replace(" | None", "").strip()
        if type_name.startswith("dict"):
            parser.add_argument(option, dest=spec.name, type=key_value, action="append", default=None,
                                metavar="KEY=VALUE", help=f"{help_text} (repeatable)")
        elif type_name == "bool":
            parser.add_argument(option, dest=spec.name, action=argparse.BooleanOptionalAction, default=given,
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(option, dest=spec.name, type=_SCALARS[type_name], default=given,
                                help=f"{help_text} (default: {default})")


def dataclass_values(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The options of ``add_dataclass_options`` as keyword arguments for ``cls``; options that are None are left
    out (the field's default applies)."""
    values = {}
    for spec in dataclasses.fields(cls):
        value = getattr(namespace, spec.name, None)
        if str(spec.type).startswith("dict"):
            values[spec.name] = dict(value or [])
        elif value is not None:
            values[spec.name] = value
    return values


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (anything else as its ``str``), for run records."""
    import json

    return json.loads(json.dumps(value, default=str))


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (a disconnect never leaves half a file)."""
    import json

    return write_atomic(path, json.dumps(jsonable(payload), indent=2))


def first_line(error: BaseException) -> str:
    """The first line of an error's message (empty messages included), short enough for one printed line."""
    return (str(error).splitlines() or [""])[0][:160]
