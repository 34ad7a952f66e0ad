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
