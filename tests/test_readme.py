"""The README's two set-up commands stay true: CI runs the second one verbatim, the first names real files."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    assert block, "README.md must open with a bash block of the two set-up commands"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()][:2]


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_command = _readme_commands()
    assert "pytest" in test_command
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in [line.strip() for line in ci_lines]


def test_the_install_command_names_files_that_exist():
    for command in _readme_commands():
        for requirement in re.findall(r"-r (\S+)", command):
            assert (REPO / requirement).is_file(), requirement
        for script in re.findall(r"python (\w+\.py)", command):
            assert (REPO / script).is_file(), script
