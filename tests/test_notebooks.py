"""The notebooks: generated from one source, self-contained for Colab, and really executed in smoke mode.

Execution uses nbclient with a real Jupyter kernel, in one scratch folder shared by all notebooks in the order a
user runs them (training before its Eval twin, every run before Results), exactly as on Colab: the notebook
writes the shared modules next to itself and imports them from there.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import make_notebooks

REPO = Path(make_notebooks.__file__).resolve().parent
NOTEBOOKS = [nb.path for nb in make_notebooks.notebooks()]


def _load(path: str) -> dict:
    return json.loads((REPO / path).read_text(encoding="utf-8"))


def _code_cells(notebook: dict) -> list[str]:
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_committed_notebooks_are_what_the_generator_writes(tmp_path):
    assert make_notebooks.main(["--out", str(tmp_path)]) == 0
    for path in NOTEBOOKS:
        committed = REPO / path
        assert committed.exists(), f"{path} is not committed: run python make_notebooks.py"
        assert committed.read_text(encoding="utf-8") == (tmp_path / path).read_text(encoding="utf-8"), (
            f"{path} is out of date: run python make_notebooks.py")
    assert make_notebooks.main(["--check"]) == 0


def test_generator_check_detects_a_stale_notebook(tmp_path):
    make_notebooks.main(["--out", str(tmp_path)])
    victim = tmp_path / NOTEBOOKS[0]
    victim.write_text(victim.read_text(encoding="utf-8").replace("GSM8K", "GSM9K"), encoding="utf-8")
    assert make_notebooks.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_first_cell_installs_pins_on_colab_only_and_nothing_imports_torch_before(path):
    cells = _code_cells(_load(path))
    install = cells[0]
    assert 'if "google.colab" in sys.modules' in install
    assert "pip" in install and "==" in install
    tree = ast.parse(install)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= {"subprocess", "sys"}


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_embedded_modules_are_the_repository_modules(path):
    embedded = {}
    for source in _code_cells(_load(path)):
        if source.startswith("%%writefile "):
            header, _, body = source.partition("\n")
            embedded[header.split()[1]] = body
    assert embedded, f"{path} embeds no shared module"
    for filename, body in embedded.items():
        assert (REPO / filename).read_text(encoding="utf-8").rstrip("\n") == body.rstrip("\n")
    # Every shared module the notebook imports is embedded (so Colab needs no clone).
    for source in _code_cells(_load(path)):
        if source.startswith("%%"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in make_notebooks.SHARED_MODULES:
                        assert f"{alias.name}.py" in embedded


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory, gsm8k_dir, tokenizer_dir):
    workdir = tmp_path_factory.mktemp("colab")
    env = {"LENGTHRL_SMOKE": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GSM8K_DIR": str(gsm8k_dir), "QWEN_TOKENIZER": str(tokenizer_dir), "MPLBACKEND": "Agg",
           "TOKENIZERS_PARALLELISM": "false"}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield workdir
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs_end_to_end_in_smoke_mode(path, notebook_workdir):
    notebook = nbformat.read(REPO / path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook_workdir)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors
    # The shared modules were written next to the notebook, as on Colab.
    assert (notebook_workdir / "rewards.py").exists() or (notebook_workdir / "runtime.py").exists()
    text = "".join(str(output.get("text", "")) for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []))
    _check_outputs(path, text, notebook_workdir)


def _check_outputs(path: str, printed: str, workdir: Path) -> None:
    """What each notebook must leave behind for the user."""
    outputs = workdir / "outputs"
    run = {nb.path: nb for nb in make_notebooks.notebooks()}[path]
    folder = path.split("/")[0]
    if path == "Data_analysis.ipynb":
        assert "121.79" in printed
        assert list((outputs / "data_analysis").glob("*.png"))
    elif path == "Initial_evaluation.ipynb":
        assert "Accuracy:" in printed and "of 8)" in printed
        assert (outputs / "Initial_evaluation" / "eval_summary.json").is_file()
        assert (outputs / "Initial_evaluation" / "length_histogram.png").is_file()
    elif path.endswith(f"/{folder}_GRPO.ipynb"):
        run_dir = outputs / f"{folder}-smoke"
        for saved in ("adapter/adapter_config.json", "adapter/run_config.json", "training_curves.png",
                      "eval/eval_summary.json", "eval/eval_results.jsonl", "eval/length_histogram.png"):
            assert (run_dir / saved).is_file(), saved
        assert any(mark in printed for mark in "✔★✗"), "the live view printed no completion"
        assert "── Run start" in printed and "Step time  " in printed, "no first-minutes report"
        assert "Accuracy:" in printed
    elif "/Eval_" in path:
        assert "Accuracy:" in printed
        if not path.startswith("Baseline/"):
            assert "McNemar exact test" in printed, "the Eval twin did not compare with the baseline"
    else:
        assert run.path == "Results.ipynb"
        assert "study" in printed
        for plot in ("pareto.png", "length_distributions.png", "step_buckets.png"):
            assert (outputs / "results" / plot).is_file(), plot
