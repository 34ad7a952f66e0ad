"""Generate every notebook of the project from one source: the templates below plus the shared modules.

    python make_notebooks.py           # write the notebooks
    python make_notebooks.py --check   # exit 1 if a committed notebook differs from what would be written

Each notebook is self-contained for Colab: its first cell installs the pinned packages (on Colab only, before
anything imports torch), then one collapsed ``%%writefile`` cell per shared module it needs, so ``import
rewards`` works in a fresh runtime while the code keeps a single source in this repository. The remaining
cells are configuration (Colab form fields), calls and narrative.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent
SHARED_MODULES = ("runtime", "rewards", "data", "analysis", "budgets", "evaluation", "training", "results")
# Installed on Colab by the notebooks that only tokenize and plot (no torch needed).
LIGHT_PACKAGES = ("transformers", "tokenizers", "huggingface_hub", "datasets")


# --------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------

def markdown(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": _lines(text.strip("\n"))}


def code(text: str, form: bool = False, hidden: bool = False) -> dict:
    metadata: dict = {}
    if form:
        metadata["cellView"] = "form"
    if hidden:
        metadata["jupyter"] = {"source_hidden": True}
    return {"cell_type": "code", "execution_count": None, "metadata": metadata, "outputs": [],
            "source": _lines(text.strip("\n"))}


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


# --------------------------------------------------------------------------------------------------
# Shared modules and pinned packages
# --------------------------------------------------------------------------------------------------

def module_source(name: str) -> str:
    return (REPO / f"{name}.py").read_text(encoding="utf-8")


def module_imports(name: str) -> set[str]:
    """Shared modules that ``name`` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_source(name))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(SHARED_MODULES)


def modules_needed(entry_points: tuple[str, ...]) -> list[str]:
    """The entry modules and everything they import, transitively, in a stable order."""
    needed: set[str] = set()
    todo = list(entry_points)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(module_imports(name))
    return [name for name in SHARED_MODULES if name in needed]


def pinned_packages() -> list[str]:
    """Requirement lines of requirements-colab.txt (comments and blanks dropped)."""
    lines = (REPO / "requirements-colab.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def install_cell(kind: str) -> dict:
    packages = pinned_packages()
    if kind == "light":
        packages = [p for p in packages if p.split("==")[0].lower() in LIGHT_PACKAGES]
    listing = ",\n".join(f"        {p!r}" for p in packages)
    return code(
        f'''
# @title Install pinned packages (on Colab only)
# Runs before anything imports torch, so the pinned builds are the ones that load. Locally, install
# requirements.txt instead (see README.md).
import subprocess
import sys

if "google.colab" in sys.modules:
    PINNED = [
{listing},
    ]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *PINNED], check=True)
''', form=True)


def module_cells(entry_points: tuple[str, ...]) -> list[dict]:
    names = modules_needed(entry_points)
    cells = [markdown(
        "### Shared code\n"
        f"The next {len(names)} collapsed cells write this project's modules ({', '.join(f'`{n}.py`' for n in names)}) "
        "next to the notebook, so it runs in a fresh Colab runtime without cloning anything. They are generated "
        "from the repository by `make_notebooks.py`; edit the modules there, not here.")]
    for name in names:
        cells.append(code(f"%%writefile {name}.py\n{module_source(name)}", form=True, hidden=True))
    return cells


# --------------------------------------------------------------------------------------------------
# Notebook templates
# --------------------------------------------------------------------------------------------------

@dataclass
class Notebook:
    path: str
    title: str
    intro: str
    install: str  # "full" | "light"
    entry_points: tuple[str, ...]
    body: list[dict] = field(default_factory=list)

    def cells(self) -> list[dict]:
        return [markdown(f"# {self.title}\n\n{self.intro.strip()}"), install_cell(self.install),
                *module_cells(self.entry_points), *self.body]


SMOKE_NOTE = (
    "**Smoke mode.** Without a GPU (or with the environment variable `LENGTHRL_SMOKE=1`) the notebook runs a "
    "tiny random model on a few questions so that every cell can be checked in seconds; set "
    "`LENGTHRL_SMOKE=0` to force the full configuration."
)


def data_analysis() -> Notebook:
    body = [
        markdown("## Settings\nLeave the folder empty to load `openai/gsm8k` from the Hugging Face Hub."),
        code('''
GSM8K_DIR = ""  # @param {type:"string"}
TOKENIZER = ""  # @param {type:"string"}
OUT_DIR = "outputs/data_analysis"  # @param {type:"string"}
''', form=True),
        markdown(
            "## Token-length statistics of the GSM8K train split\n"
            "Question and solution lengths in Qwen2.5 tokens (raw text, no special tokens), their correlations, "
            "and the per-step table behind the step-aware length budgets."),
        code('''
import analysis

stats = analysis.run_analysis(gsm8k_dir=GSM8K_DIR or None, tokenizer=TOKENIZER or None, out_dir=OUT_DIR)
'''),
    ]
    return Notebook("Data_analysis.ipynb", "GSM8K data analysis",
                    "Reproduces the study's token-length statistics of GSM8K (train split, 7473 questions).",
                    "light", ("analysis",), body)


def notebooks() -> list[Notebook]:
    return [data_analysis()]


def render(notebook: Notebook) -> str:
    document = {
        "cells": notebook.cells(),
        "metadata": {
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "T4"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    # Stable cell ids keep regeneration byte-identical.
    for index, cell in enumerate(document["cells"]):
        cell["id"] = f"cell-{index:02d}"
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed notebooks are current")
    parser.add_argument("--out", type=Path, default=REPO, help="write under this folder (default: the repo)")
    args = parser.parse_args(argv)
    stale = []
    for notebook in notebooks():
        target = args.out / notebook.path
        text = render(notebook)
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(notebook.path)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    if stale:
        print("out of date (run `python make_notebooks.py`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
