"""The Colab dependency set (requirements-colab.txt): exact pins, shared with the CPU set, and resolvable.

The resolve test asks pip, through its own configured index, whether the whole pinned set installs on
Colab's platform (CPython 3.12, glibc x86-64). It skips when that index cannot be reached. With pip >= 25.3
a dry run fetches only metadata; older pips download every wheel of the set (about 5.5 GB, a few minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CPU_REQUIREMENTS = REPO / "requirements.txt"
COLAB_REQUIREMENTS = REPO / "requirements-colab.txt"

# Pinned identically in both sets so that CI exercises the library versions Colab runs.
SHARED = ("trl", "transformers", "peft", "datasets")

# Colab: CPython 3.12 on Ubuntu 22.04 (glibc 2.35), x86-64. pip does not expand a manylinux_2_N tag to the
# older glibc tags it implies, so every one is listed; manylinux2014 brings manylinux2010 and manylinux1.
COLAB_PYTHON = "3.12"
COLAB_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)]
COLAB_PLATFORMS += ["manylinux2014_x86_64", "linux_x86_64"]

PROBE_TIMEOUT_S = 60
RESOLVE_TIMEOUT_S = 1800


def read_pins(path: Path) -> dict[str, Requirement]:
    """Requirements of a requirements file by canonical name (comment and blank lines skipped)."""
    pins: dict[str, Requirement] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            req = Requirement(text)
            pins[canonicalize_name(req.name)] = req
    return pins


def exact_version(req: Requirement) -> str | None:
    """The version of a plain ``name==version`` requirement, else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
        return specs[0].version
    return None


def pip_env() -> dict[str, str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # A constraints file set for this machine's own installs must not bend a resolve for another platform.
    env["PIP_CONSTRAINT"] = ""
    return env


def pip(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=pip_env(),
        check=False,
    )


def pip_version() -> Version:
    import pip as pip_module

    return Version(pip_module.__version__)


def test_colab_lines_are_plain_exact_pins():
    lines = [
        line.split("#", 1)[0].strip() for line in COLAB_REQUIREMENTS.read_text(encoding="utf-8").splitlines()
    ]
    lines = [line for line in lines if line]
    assert lines, "requirements-colab.txt pins nothing"
    names = []
    for line in lines:
        assert not line.startswith("-"), f"pip option in requirements-colab.txt: {line!r}"
        req = Requirement(line)
        assert exact_version(req) and not req.extras and req.marker is None and req.url is None, (
            f"not a plain name==version pin: {line!r}"
        )
        names.append(canonicalize_name(req.name))
    assert len(names) == len(set(names)), f"a package is pinned twice: {sorted(names)}"


def test_shared_pins_are_identical_in_cpu_and_colab_sets():
    cpu, colab = read_pins(CPU_REQUIREMENTS), read_pins(COLAB_REQUIREMENTS)
    for name in SHARED:
        assert name in cpu, f"{name} missing from requirements.txt"
        assert name in colab, f"{name} missing from requirements-colab.txt"
        cpu_version, colab_version = exact_version(cpu[name]), exact_version(colab[name])
        assert cpu_version, f"requirements.txt does not pin {name} exactly: {cpu[name]}"
        assert cpu_version == colab_version, (
            f"{name}: requirements.txt pins {cpu[name]}, requirements-colab.txt pins {colab[name]}"
        )


@pytest.fixture(scope="module")
def package_index():
    """Skip unless pip's configured index answers (a short probe, no retries)."""
    try:
        probe = pip(
            "index", "versions", "unsloth", "--retries", "0", "--timeout", "15", timeout=PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"package index unreachable: `pip index versions unsloth` took over {PROBE_TIMEOUT_S}s")
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"package index unreachable (`pip index versions unsloth` failed: {reason})")


def test_colab_set_resolves_for_python_312_linux_x86_64(package_index, tmp_path):
    pins = {name: exact_version(req) for name, req in read_pins(COLAB_REQUIREMENTS).items()}
    report = tmp_path / "report.json"
    args = [
        "install",
        "--dry-run",
        "--ignore-installed",
        "--no-cache-dir",
        f"--target={tmp_path / 'target'}",  # pip takes platform options only with --target
        "--only-binary=:all:",  # ... and only for wheels, so nothing in the set may be sdist-only
        f"--python-version={COLAB_PYTHON}",
        "--implementation=cp",
        *(f"--platform={platform}" for platform in COLAB_PLATFORMS),
        f"--report={report}",
        f"--requirement={COLAB_REQUIREMENTS}",
    ]
    if pip_version() >= Version("25.3"):
        # Since pip 25.3 a dry run needs only metadata. An index without PEP 658 metadata files would still
        # make pip fetch whole wheels to read it; lazy wheels (HTTP range requests) avoid that.
        result = pip(*args, "--use-feature=fast-deps", timeout=RESOLVE_TIMEOUT_S)
        if result.returncode != 0 and "invalid choice: 'fast-deps'" in result.stderr:  # pip dropped it
            result = pip(*args, timeout=RESOLVE_TIMEOUT_S)
    else:
        result = pip(*args, timeout=RESOLVE_TIMEOUT_S)
    assert result.returncode == 0, f"the Colab set does not resolve:\n{result.stderr[-6000:]}"

    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text(encoding="utf-8"))["install"]
    }
    wrong = {
        name: (version, resolved.get(name))
        for name, version in pins.items()
        if name not in resolved or Version(resolved[name]) != Version(version)
    }
    assert not wrong, f"pinned vs resolved versions differ: {wrong}"


# --------------------------------------------------------------------------------------------------
# The install cell (make_notebooks.py): numpy/pillow kept, uv or pip, restart detection
# --------------------------------------------------------------------------------------------------

def _install_cell_source(kind: str) -> str:
    import make_notebooks

    return "".join(make_notebooks.install_cell(kind)["source"])


def test_install_keeps_colabs_numpy_and_pillow_at_their_installed_versions():
    import make_notebooks

    pinned = ["vllm==0.11.2", "torch==2.9.0"]
    pins = make_notebooks.keep_installed(pinned, {"numpy": "2.0.2", "pillow": "11.3.0"})
    assert pins == ["vllm==0.11.2", "torch==2.9.0", "numpy==2.0.2", "pillow==11.3.0"]
    # Not installed: nothing to keep. Already pinned (any spelling): not pinned twice.
    assert make_notebooks.keep_installed(pinned, {"numpy": None, "pillow": "11.3.0"}) == [*pinned, "pillow==11.3.0"]
    assert make_notebooks.keep_installed(["Pillow==12.0.0"], {"numpy": None, "pillow": "11.3.0"}) == ["Pillow==12.0.0"]
    # The versions are read from this interpreter at run time.
    numpy_version = make_notebooks.installed_version("numpy")
    assert numpy_version and f"numpy=={numpy_version}" in make_notebooks.keep_installed(
        pinned, {"numpy": numpy_version})
    assert make_notebooks.installed_version("no-such-distribution-lengthrl") is None


def test_install_uses_uv_pip_when_uv_is_on_the_path_else_pip():
    import make_notebooks

    uv = make_notebooks.install_command("/usr/bin/python3", "/usr/local/bin/uv")
    assert uv[:3] == ["/usr/local/bin/uv", "pip", "install"]
    assert uv[uv.index("--python") + 1] == "/usr/bin/python3"  # into Colab's interpreter, not a uv venv
    pip_command = make_notebooks.install_command(sys.executable, None)
    assert pip_command[:4] == [sys.executable, "-m", "pip", "install"]
    assert subprocess.run([*pip_command, "--help"], capture_output=True, check=False).returncode == 0


def test_restart_is_asked_for_exactly_when_an_imported_package_changed_on_disk():
    import make_notebooks

    before = {"torch": "2.8.0+cu126", "numpy": "2.0.2"}
    reason = make_notebooks.restart_reason(before, {"torch": "2.9.0", "numpy": "2.0.2"})
    assert reason and "\n" not in reason and "Restart" in reason
    assert "torch 2.8.0+cu126 -> 2.9.0" in reason and "numpy" not in reason
    assert make_notebooks.restart_reason(before, dict(before)) is None  # imported, but unchanged: no restart
    assert make_notebooks.restart_reason({}, {"torch": "2.9.0"}) is None  # nothing imported before the install
    # What the kernel loaded is read from the imported modules themselves (pillow imports as PIL).
    import numpy
    import PIL

    loaded = make_notebooks.imported_versions(["numpy", "pillow", "no-such-distribution-lengthrl"], sys.modules)
    assert loaded == {"numpy": numpy.__version__, "pillow": PIL.__version__}


def _write_wheel(folder: Path, version: str) -> Path:
    """A minimal pure-Python wheel of the distribution ``lengthrl-probe`` (module ``lengthrl_probe``)."""
    import zipfile

    path = folder / f"lengthrl_probe-{version}-py3-none-any.whl"
    info = f"lengthrl_probe-{version}.dist-info"
    files = {
        "lengthrl_probe.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: lengthrl-probe\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            wheel.writestr(name, text)
    return path


def test_install_cell_runs_in_a_bare_environment_and_asks_for_a_restart_after_replacing_an_imported_package(
        tmp_path):
    """The cell's own code, in a fresh virtual environment without this project: a package imported at 1.0 and
    installed at 2.0 yields the timing line and the one-line restart request."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "1.0")
    _write_wheel(wheels, "2.0")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = dict(pip_env(), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PATH=str(venv / "bin") + os.pathsep + "/bin")
    subprocess.run([python, "-m", "pip", "install", "-q", "lengthrl-probe==1.0"], check=True, env=env, timeout=300)
    script = tmp_path / "cell.py"
    script.write_text(_install_cell_source("full") + "\n\nimport lengthrl_probe\n"
                      "colab_install(['lengthrl-probe==2.0'])\n", encoding="utf-8")
    result = subprocess.run([python, str(script)], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Installed 1 pinned packages with pip in "), result.stdout
    assert len(lines) == 2 and "Restart the runtime" in lines[1] and "lengthrl-probe 1.0 -> 2.0" in lines[1]
    # Installed again with nothing imported first: no restart request.
    script.write_text(_install_cell_source("full") + "\n\ncolab_install(['lengthrl-probe==2.0'])\n",
                      encoding="utf-8")
    result = subprocess.run([python, str(script)], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0 and "Restart" not in result.stdout, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["full", "light"])
def test_install_cell_is_self_contained_standard_library_code_from_one_source(kind):
    import ast
    import inspect

    import make_notebooks

    source = _install_cell_source(kind)
    tree = ast.parse(source)
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules <= set(sys.stdlib_module_names), f"the install cell imports {modules - set(sys.stdlib_module_names)}"
    for helper in make_notebooks.INSTALL_HELPERS:
        assert inspect.getsource(helper) in source, f"{helper.__name__} is not embedded verbatim"
    namespace: dict = {}
    exec(compile(source, "install_cell", "exec"), namespace)  # outside Colab: defines the helpers, installs nothing
    assert all(callable(namespace[helper.__name__]) for helper in make_notebooks.INSTALL_HELPERS)
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "colab_install"]
    assert len(calls) == 1 and isinstance(tree.body[-1], ast.If), "the cell must end in one guarded colab_install"
    listed = ast.literal_eval(calls[0].args[0])
    expected = [line for line in make_notebooks.pinned_packages()
                if kind == "full" or line.split("==")[0].lower() in make_notebooks.LIGHT_PACKAGES]
    assert listed == expected


# --------------------------------------------------------------------------------------------------
# Precision and the T4's vLLM settings from the device's compute capability (runtime.py)
# --------------------------------------------------------------------------------------------------

def _fake_gpu(monkeypatch, capability: tuple[int, int] | None) -> None:
    """Make torch report a CUDA GPU of this compute capability (None: no GPU). Emulated bf16 counts as
    supported, as ``torch.cuda.is_bf16_supported()`` says by default on a T4 in torch 2.9."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability is not None)


@pytest.mark.parametrize(("capability", "precision"), [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                       ((8, 9), "bf16"), ((9, 0), "bf16"), (None, "fp32")])
def test_bf16_only_on_compute_capability_8_or_newer(monkeypatch, capability, precision):
    import runtime
    import training

    _fake_gpu(monkeypatch, capability)
    assert runtime.cuda_capability() == capability
    assert runtime.supports_bf16() is (precision == "bf16")
    assert runtime.default_precision() == precision
    assert training.resolve_precision("auto") == precision  # training and HF evaluation share default_precision
    assert training.resolve_precision("fp32") == "fp32"  # an explicit choice is kept


@pytest.fixture
def clean_vllm_environment(monkeypatch):
    import runtime

    for name in runtime.T4_VLLM_ENVIRONMENT:
        monkeypatch.setenv(name, "placeholder")  # records the original state, restored after the test
        monkeypatch.delenv(name)


def test_t4_switches_flashinfer_off_and_newer_gpus_keep_vllms_choice(monkeypatch, clean_vllm_environment):
    import runtime

    assert runtime.t4_vllm_settings((7, 5)) == {"UNSLOTH_VLLM_NO_FLASHINFER": "1",
                                                "VLLM_ATTENTION_BACKEND": "TRITON_ATTN"}
    assert runtime.t4_vllm_settings((8, 0)) == runtime.t4_vllm_settings((9, 0)) == runtime.t4_vllm_settings(None) == {}
    _fake_gpu(monkeypatch, (9, 0))
    assert runtime.t4_vllm_environment() == {}
    assert not any(name in os.environ for name in runtime.T4_VLLM_ENVIRONMENT)
    _fake_gpu(monkeypatch, (7, 5))
    assert runtime.t4_vllm_environment() == runtime.T4_VLLM_ENVIRONMENT
    assert all(os.environ[name] == value for name, value in runtime.T4_VLLM_ENVIRONMENT.items())


def test_t4_settings_keep_a_variable_the_user_set(monkeypatch, clean_vllm_environment):
    import runtime

    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "XFORMERS")
    assert runtime.t4_vllm_environment((7, 5)) == {"UNSLOTH_VLLM_NO_FLASHINFER": "1"}
    assert os.environ["VLLM_ATTENTION_BACKEND"] == "XFORMERS"
