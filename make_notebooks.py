"""Generate every notebook of the project from one source: the templates below plus the shared modules.

    python make_notebooks.py           # write the notebooks
    python make_notebooks.py --check   # exit 1 if a committed notebook differs from what would be written

Each notebook is self-contained for Colab: its first cell installs the pinned packages (on Colab only, before
anything imports torch), then one collapsed ``%%writefile`` cell per shared module it needs, so ``import
rewards`` works in a fresh runtime while the code keeps a single source in this repository. The modules it needs
are found, not declared: those its own cells import, and everything they import in turn (``modules_needed``,
imports inside functions included). The remaining cells are configuration (Colab form fields), calls and narrative.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent
# The project's modules, lowest layer first (tests/test_architecture.py checks that no module imports a later one);
# decoding.py is optional until it exists.
SHARED_MODULES = ("runtime", "rewards", "data", "analysis", "budgets", "metrics", "decoding", "evaluation", "config",
                  "rollouts", "backends", "training", "results")
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


def imported_modules(source: str) -> set[str]:
    """Shared modules that Python ``source`` imports anywhere (top level or inside functions). Notebook magics
    (``%...``, ``!...``) are skipped."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    found: set[str] = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(SHARED_MODULES)


def module_imports(name: str) -> set[str]:
    """Shared modules that ``name`` imports anywhere (top level or inside functions)."""
    return imported_modules(module_source(name))


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


# The install cell's helpers run in the notebook before anything else is there, so they use the standard library
# only; the cell embeds their source, and tests/test_colab_pins.py calls them here.

def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``; None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def keep_installed(packages: list[str], installed: dict[str, str | None],
                   keep: tuple[str, ...] = ("numpy", "pillow")) -> list[str]:
    """``packages`` plus ``name==<installed version>`` for each ``keep`` package that is installed and not listed.

    Unsloth's T4 notebooks pin Colab's own numpy and pillow this way, so that vLLM's resolver cannot replace them
    under a running kernel (imports then break until a restart)."""
    listed = {package.split("==")[0].strip().lower().replace("_", "-") for package in packages}
    kept = [f"{name}=={installed[name]}" for name in keep if installed.get(name) and name not in listed]
    return [*packages, *kept]


def install_command(python: str, uv: str | None) -> list[str]:
    """``uv pip install`` when uv is on the PATH (``uv``: its path; it resolves this set far faster than pip),
    else ``pip install``; both install into the environment of the interpreter ``python``."""
    if uv:
        return [uv, "pip", "install", "--quiet", "--python", python]
    return [python, "-m", "pip", "install", "--quiet"]


def imported_versions(names: list[str], modules: dict) -> dict[str, str]:
    """The version this kernel loaded of each distribution in ``names`` whose module is already imported
    (``modules``: ``sys.modules``). Read it before installing."""
    versions: dict[str, str] = {}
    for name in names:
        module = modules.get({"pillow": "PIL"}.get(name, name.replace("-", "_")))
        if module is not None:
            version = getattr(module, "__version__", None) or installed_version(name)
            if version:
                versions[name] = str(version)
    return versions


def restart_reason(imported: dict[str, str], installed: dict[str, str | None]) -> str | None:
    """One line asking for a restart when a package this kernel imported before the install (``imported``: the
    version it loaded) has another version on disk now (``installed``); None when nothing imported has changed."""
    changed = [f"{name} {version} -> {installed[name]}" for name, version in sorted(imported.items())
               if installed.get(name) not in (None, version)]
    if not changed:
        return None
    return ("Restart the runtime now (Runtime > Restart session) and run all cells again: the install replaced "
            f"packages this kernel had already imported ({', '.join(changed)}).")


def colab_install(packages: list[str], keep: tuple[str, ...] = ("numpy", "pillow")) -> None:
    """Install ``packages`` the way Unsloth's T4 notebooks do (uv when present, Colab's ``keep`` packages pinned to
    their installed versions), print how long it took, and say in one line when the runtime must restart."""
    import subprocess
    import sys
    from importlib import invalidate_caches
    from shutil import which
    from time import perf_counter

    names = [package.split("==")[0].strip().lower().replace("_", "-") for package in packages] + list(keep)
    before = imported_versions(names, sys.modules)
    pins = keep_installed(packages, {name: installed_version(name) for name in keep}, keep)
    uv = which("uv")
    command = install_command(sys.executable, uv)
    start = perf_counter()
    code = subprocess.run([*command, *pins], check=False).returncode
    if code != 0:
        raise RuntimeError(f"installing the pinned packages failed ({' '.join(command[:3])} exited with {code}); "
                           "its output is above")
    invalidate_caches()
    print(f"Installed {len(pins)} pinned packages with {'uv pip' if uv else 'pip'} in {perf_counter() - start:.0f} s")
    reason = restart_reason(before, {name: installed_version(name) for name in before})
    if reason:
        print(reason)


INSTALL_HELPERS = (installed_version, keep_installed, install_command, imported_versions, restart_reason,
                   colab_install)


def install_cell(kind: str) -> dict:
    packages = pinned_packages()
    if kind == "light":
        packages = [p for p in packages if p.split("==")[0].lower() in LIGHT_PACKAGES]
    listing = ",\n".join(f"        {p!r}" for p in packages)
    helpers = "\n\n".join(inspect.getsource(helper) for helper in INSTALL_HELPERS)
    return code(
        f'''
# @title Install pinned packages (on Colab only)
# Runs before anything imports torch, so the pinned builds are the ones that load. Locally, install
# requirements.txt instead (see README.md). As in Unsloth's T4 notebooks: uv when present, Colab's numpy
# and pillow kept as they are. The helpers below are generated from make_notebooks.py (tested there).
import sys


{helpers}

if "google.colab" in sys.modules:
    colab_install([
{listing},
    ])
''', form=True)


def cells_imports(cells: list[dict]) -> tuple[str, ...]:
    """Shared modules the code cells import (the notebook's entry points), in ``SHARED_MODULES`` order."""
    found: set[str] = set()
    for cell in cells:
        if cell["cell_type"] == "code":
            found |= imported_modules("".join(cell["source"]))
    return tuple(name for name in SHARED_MODULES if name in found)


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
    body: list[dict] = field(default_factory=list)

    def entry_points(self) -> tuple[str, ...]:
        """The shared modules the notebook's own cells import."""
        return cells_imports(self.body)

    def modules(self) -> list[str]:
        """Every shared module the notebook embeds: its entry points and all they import."""
        return modules_needed(self.entry_points())

    def cells(self) -> list[dict]:
        return [markdown(f"# {self.title}\n\n{self.intro.strip()}"), install_cell(self.install),
                *module_cells(self.entry_points()), *self.body]


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
            "and the per-step table behind the step-aware length budgets; then the histograms of answer and "
            "question lengths and the answer length by step count (the study's point: more steps, longer "
            "solutions), with each step count's 97.5% trimmed max, the step-aware budget, marked in red. The "
            "plots are also saved as PNGs in `OUT_DIR`."),
        code('''
import analysis

stats = analysis.run_analysis(gsm8k_dir=GSM8K_DIR or None, tokenizer=TOKENIZER or None, out_dir=OUT_DIR)
'''),
    ]
    return Notebook("Data_analysis.ipynb", "GSM8K data analysis",
                    "Reproduces the study's token-length statistics of GSM8K (train split, 7473 questions).",
                    "light", body)


# The study's four runs: folder, method, title and what the method adds.
STUDY_RUNS = (
    ("Baseline", "baseline", "Baseline",
     "GRPO with the format and correctness rewards only: the reference every length method is compared with."),
    ("Ans_len_considering", "ans_len", "Method 1: answer-length considering",
     "Adds a penalty for deviating from the reference solution's token length: "
     "$r_i = -\\lambda\\,|o_i - o_i^{gt}| / \\max_j |o_j - o_j^{gt}|$ within each prompt's group."),
    ("Group_method", "group", "Method 2: group method",
     "Adds a penalty for excess length over the shortest *correct* completion of the prompt's group, scaled by "
     "the group's accuracy $c$: $r_i = -\\lambda\\,c\\,\\max(0, o_i - o_{min}) / \\max_j \\max(0, o_j - o_{min})$."),
    ("Group_method_with_ans_len_considering", "group_ans_len", "Methods 1 + 2",
     "Adds both length penalties: the deviation from the reference length and the excess over the group's "
     "shortest correct completion."),
)


def all_methods() -> tuple[str, ...]:
    """Every registered reward method (the training notebooks' METHOD choices)."""
    sys.path.insert(0, str(REPO))
    import rewards

    return tuple(rewards.METHODS)


def training_notebook(folder: str, method: str, title: str, about: str) -> Notebook:
    methods = ", ".join(f'"{m}"' for m in all_methods())
    body = [
        markdown(f"""
## Settings
The defaults reproduce the study (Qwen2.5-0.5B-Instruct with LoRA, 4000 training questions of at most 5 steps,
512 completion tokens, β = 0.005, `constant_with_warmup`, fixed seed) and fit a free 15 GB T4.
`METHOD` may be any reward method of `rewards.METHODS`; the literature methods are described in README.md.
`BUDGET` gives each question a token budget, stated in the prompt and used as the target of `l1_exact`.

**Never lose a run.** With `SAVE_TO_DRIVE` the run folder lives on Google Drive. Checkpoints are written every
`SAVE_STEPS` steps; after a disconnect, run all cells again and training resumes from the latest checkpoint with the
same data order. A finished run is re-used, not trained again: a larger `MAX_STEPS` trains it further, and a changed
training setting (e.g. `LAMBDA`, `LEARNING_RATE`) needs another folder. Weights & Biases logs online with a
`WANDB_API_KEY` Colab secret, otherwise offline (see README.md to sync later); `PUSH_TO_HUB` uses the `HF_TOKEN`
secret.

{SMOKE_NOTE}"""),
        code(f'''
METHOD = "{method}"  # @param [{methods}]
LAMBDA = 0.5  # @param {{type:"number"}}
BACKEND = "auto"  # @param ["auto", "unsloth", "trl"]
ROLLOUT = "auto"  # @param ["auto", "vllm", "static", "generate"]
SAVE_TO_DRIVE = False  # @param {{type:"boolean"}}
PUSH_TO_HUB = False  # @param {{type:"boolean"}}
HUB_REPO = ""  # @param {{type:"string"}}
LEARNING_RATE = 1e-5  # @param {{type:"number"}}
NUM_GENERATIONS = 8  # @param {{type:"integer"}}
MAX_COMPLETION_LENGTH = 512  # @param {{type:"integer"}}
TRAIN_SIZE = 4000  # @param {{type:"integer"}}
SAVE_STEPS = 50  # @param {{type:"integer"}}
MAX_STEPS = 0  # @param {{type:"integer"}}
BUDGET = ""  # @param ["", "steps", "reference", "question"]
SEED = 3407  # @param {{type:"integer"}}
EVAL_LIMIT = 0  # @param {{type:"integer"}}
''', form=True),
        markdown("## Train\nPrints one line per completion at every step: ✔ correct, ★ right format but wrong "
                 "answer, ✗ otherwise, with its length and reward; a rule separates the prompts' groups."),
        code('''
import training

config = training.TrainConfig(
    method=METHOD, lam=LAMBDA, backend=BACKEND, rollout=ROLLOUT, save_to_drive=SAVE_TO_DRIVE,
    push_to_hub=PUSH_TO_HUB,
    hub_repo=HUB_REPO or None, learning_rate=LEARNING_RATE, num_generations=NUM_GENERATIONS,
    max_completion_length=MAX_COMPLETION_LENGTH, train_size=TRAIN_SIZE, save_steps=SAVE_STEPS,
    max_steps=MAX_STEPS or None, budget=BUDGET or None, seed=SEED,
)
result = training.train(config)
'''),
        markdown("## Training curves\nReward, accuracy, mean length, efficiency and the length correlations per "
                 "step, from the trainer's log history (no Weights & Biases needed)."),
        code("import runtime\n\nruntime.show(training.plot_training_curves(result.output_dir))"),
        markdown("## Evaluate the adapter on the GSM8K test split\nGreedy decoding, 512 new tokens; the "
                 "per-question results and the summary are saved beside the adapter."),
        code("summary = training.evaluate_adapter(result, limit=EVAL_LIMIT or None)"),
        markdown("## Response lengths\nSaved as `length_histogram.png` beside the results."),
        code("import evaluation\n\nruntime.show(evaluation.plot_length_histogram(summary))"),
    ]
    intro = f"{about}\n\nOne of the study's four GRPO runs; `Eval_{folder}_GRPO.ipynb` re-evaluates the saved adapter."
    return Notebook(f"{folder}/{folder}_GRPO.ipynb", f"{title}: GRPO training", intro, "full", body)


def eval_notebook(folder: str, method: str, title: str, about: str) -> Notebook:
    body = [
        markdown(f"""
## Settings
`ADAPTER`: a Google Drive folder, a Hugging Face Hub repo id, or empty for the folder where
`{folder}_GRPO.ipynb` saves its adapter (on Drive when `SAVE_TO_DRIVE` is ticked). Results already computed are
only reported again unless `REDO` is ticked.

{SMOKE_NOTE}"""),
        code(f'''
METHOD = "{method}"
ADAPTER = ""  # @param {{type:"string"}}
SAVE_TO_DRIVE = False  # @param {{type:"boolean"}}
BACKEND = "auto"  # @param ["auto", "vllm", "unsloth", "hf"]
EVAL_LIMIT = 0  # @param {{type:"integer"}}
REDO = False  # @param {{type:"boolean"}}
''', form=True),
        markdown("## Evaluate\nAccuracy with its 95% interval, format accuracy, lengths, out-of-limit rate, "
                 "efficiency and per-step buckets; then the paired comparison with the baseline when its results "
                 "are present."),
        code('''
import evaluation

summary = evaluation.evaluate_run(ADAPTER or None, method=METHOD, save_to_drive=SAVE_TO_DRIVE,
                                  limit=EVAL_LIMIT or None, backend=BACKEND, redo=REDO)
'''),
        markdown("## Response lengths\nThis run's lengths, correct and incorrect answers stacked, then overlaid on "
                 "the baseline's when its results are present. Saved as `length_histogram.png` and "
                 "`length_vs_baseline.png` beside the results."),
        code("""
import evaluation
import runtime

runtime.show(evaluation.plot_length_histogram(summary))
runtime.show(evaluation.plot_against_baseline(summary))
"""),
    ]
    intro = f"Re-evaluates the LoRA adapter saved by `{folder}_GRPO.ipynb` ({title}). {about}"
    return Notebook(f"{folder}/Eval_{folder}_GRPO.ipynb", f"{title}: evaluation", intro, "full", body)


def initial_evaluation() -> Notebook:
    body = [
        markdown(f"""
## Settings
The untrained `Qwen/Qwen2.5-0.5B-Instruct`, no adapter, on the 1319 GSM8K test questions (the study measured 9.55%
accuracy, 66.34% format accuracy and 144.9 tokens). `BUDGET` optionally runs it under a hard length budget:
`steps` (the step bucket's 97.5% trimmed max), `reference` (the reference solution's length) or `question`
(question-length buckets), as a token limit, in the prompt, or both.

{SMOKE_NOTE}"""),
        code('''
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # @param {type:"string"}
BACKEND = "auto"  # @param ["auto", "vllm", "hf"]
EVAL_LIMIT = 0  # @param {type:"integer"}
BUDGET = ""  # @param ["", "steps", "reference", "question"]
BUDGET_MODE = "limit"  # @param ["limit", "prompt", "both"]
REDO = False  # @param {type:"boolean"}
''', form=True),
        markdown("## Evaluate"),
        code('''
import evaluation

config = evaluation.EvalConfig(model=MODEL, backend=BACKEND, limit=EVAL_LIMIT or None, budget=BUDGET or None,
                               budget_mode=BUDGET_MODE, redo=REDO, output_dir="outputs/Initial_evaluation")
summary = evaluation.evaluate(config)
evaluation.print_summary(summary)
'''),
        markdown("## Response lengths\nSaved as `length_histogram.png` beside the results."),
        code("import runtime\n\nruntime.show(evaluation.plot_length_histogram(summary))"),
    ]
    return Notebook("Initial_evaluation.ipynb", "Initial evaluation: the untrained model",
                    "Accuracy, format and length of Qwen2.5-0.5B-Instruct before any training, the study's "
                    "starting point.", "full", body)


def results_notebook() -> Notebook:
    body = [
        markdown(f"""
## Settings
`RUNS`: folders that hold run outputs (each run's `eval/eval_summary.json` and `eval_results.jsonl`), separated by
commas: local folders or Google Drive folders (`/content/drive/MyDrive/...`, mounted on demand).

{SMOKE_NOTE}"""),
        code('''
RUNS = "outputs"  # @param {type:"string"}
OUT_DIR = "outputs/results"  # @param {type:"string"}
''', form=True),
        markdown("## Comparison\nOne row per run: accuracy ± 95% CI, format accuracy, mean length, out-of-limit "
                 "rate, efficiency and training time, with the study's published numbers as reference rows; then "
                 "each run paired with the baseline (accuracy difference with a bootstrap CI, McNemar's exact "
                 "p-value, length difference). Below the tables: the accuracy–length Pareto chart, the length "
                 "distributions and the per-step buckets, also saved as PNGs in `OUT_DIR`."),
        code('''
import results

report = results.report([path.strip() for path in RUNS.split(",") if path.strip()], out_dir=OUT_DIR)
'''),
    ]
    return Notebook("Results.ipynb", "Results: comparing the methods honestly",
                    "Loads the evaluation results of any number of runs and compares them, with confidence "
                    "intervals and paired tests, against the baseline and the study's published numbers.",
                    "full", body)


def notebooks() -> list[Notebook]:
    """Every notebook, in the order a user runs them (CI executes them in this order)."""
    return [
        data_analysis(),
        initial_evaluation(),
        *(training_notebook(*run) for run in STUDY_RUNS),
        *(eval_notebook(*run) for run in STUDY_RUNS),
        results_notebook(),
    ]


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
