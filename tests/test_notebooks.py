"""The notebooks: generated from one source, self-contained for Colab, and really executed in smoke mode.

Execution uses nbclient with a real Jupyter kernel, in one scratch folder shared by all notebooks in the order a
user runs them (training before its Eval twin, every run before Results), exactly as on Colab: the notebook
writes the shared modules next to itself and imports them from there.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import make_notebooks
import runtime

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


def _executed(sources: list[str], cwd: Path) -> list[list[dict]]:
    """Run code cells in a real Jupyter kernel; each cell's outputs."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return [cell.outputs for cell in notebook.cells]


def _text(outputs: list[dict]) -> str:
    return "".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                   for output in outputs)


def _images(outputs: list[dict]) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs)


def _tables(outputs: list[dict]) -> int:
    """Rendered HTML tables: pandas DataFrames and Stylers (not the trainer's HTML progress bar)."""
    html = [str(output.get("data", {}).get("text/html", "")) for output in outputs]
    return sum("<table" in text and "<progress" not in text for text in html)


def test_runtime_show_and_progress_bar_in_a_real_kernel():
    """The display mechanism itself, in a Jupyter kernel with the inline backend (as on Colab)."""
    outputs = _executed([
        "import runtime\nimport datasets  # imports tqdm.auto: no 'IProgress not found' warning\nruntime.in_notebook()",
        "from matplotlib.figure import Figure\nfigure = Figure()\nfigure.add_subplot().plot([1, 2])\n"
        "runtime.show(figure)",
        # A pyplot figure shows once: runtime.show closes it, so the inline backend does not show it again.
        "import matplotlib.pyplot as plt\nfigure, axes = plt.subplots()\naxes.plot([2, 1])\nruntime.show(figure)",
        "import pandas as pd\nruntime.show(pd.DataFrame({'a': [1]}), text='the text form')\nruntime.show(None)",
        "bar = runtime.progress_bar(total=2, desc='bar')\nbar.update(2)\nbar.close()\ntype(bar).__module__",
    ], REPO)
    setup, figure, pyplot_figure, table, bar = outputs
    assert "True" in _text(setup) and "IProgress" not in _text(setup)
    assert (_images(figure), _images(pyplot_figure), _images(table)) == (1, 1, 0)
    assert "<Figure" not in _text(figure + pyplot_figure)
    assert _tables(table) == 1 and "the text form" not in _text(table)
    widgets = importlib.util.find_spec("ipywidgets") is not None
    assert ("tqdm.notebook" if widgets else "tqdm.std") in _text(bar)
    assert "IProgress" not in _text(bar)


def test_runtime_show_prints_the_text_form_outside_a_notebook(capsys):
    from matplotlib.figure import Figure

    assert not runtime.in_notebook()
    runtime.show(Figure(), text="table as text")
    runtime.show(Figure())
    assert capsys.readouterr().out == "table as text\n"
    assert type(runtime.progress_bar(total=1, disable=True)).__module__ == "tqdm.std"


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory, gsm8k_dir, tokenizer_dir):
    workdir = tmp_path_factory.mktemp("colab")
    env = {"LENGTHRL_SMOKE": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GSM8K_DIR": str(gsm8k_dir), "QWEN_TOKENIZER": str(tokenizer_dir),
           # Jupyter's and Colab's default backend: a figure displayed twice would count twice below.
           "MPLBACKEND": "module://matplotlib_inline.backend_inline",
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
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    # What the user reads: printed text and rendered tables.
    text = "".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/html", ""))
                   for output in outputs)
    _check_outputs(path, text, notebook_workdir)
    _check_displays(path, outputs)


def _check_displays(path: str, outputs: list[dict]) -> None:
    """Every promised plot and table shows inline: (images, tables) per notebook, exactly."""
    folder = path.split("/")[0]
    if path == "Data_analysis.ipynb":
        expected = (3, 1)  # two histograms, answer length by step count; the per-step table
    elif path == "Initial_evaluation.ipynb":
        expected = (1, 1)  # the length histogram; the per-step buckets
    elif path.endswith(f"/{folder}_GRPO.ipynb"):
        expected = (2, 1)  # training curves, length histogram; the per-step buckets
    elif path.startswith("Baseline/Eval_"):
        expected = (1, 1)  # the length histogram (no baseline to compare with); the per-step buckets
    elif "/Eval_" in path:
        expected = (2, 1)  # the length histogram and the overlay on the baseline's; the per-step buckets
    else:
        expected = (3, 2)  # Pareto, length distributions, per-step buckets; the comparison and the pairs
    assert (_images(outputs), _tables(outputs)) == expected, f"{path}: (images, tables)"
    text = _text(outputs)
    assert "<Figure size" not in text, "a figure showed as text"
    assert "IProgress not found" not in text


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
        assert "study: baseline" in printed and "McNemar p" in printed
        for plot in ("pareto.png", "length_distributions.png", "step_buckets.png"):
            assert (outputs / "results" / plot).is_file(), plot
