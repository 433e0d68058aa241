from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    commands = [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]
    return commands


def test_readme_opens_with_install_run_and_test_commands() -> None:
    install_run, test = readme_commands()[:2]
    assert "secretsd serve --dev" in install_run
    assert "pytest" in test


def test_ci_runs_the_readmes_test_command() -> None:
    test = readme_commands()[1]
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
