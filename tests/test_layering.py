"""The layering rules (issue 11 item 6), so the README's test command checks them too.

The contracts live in pyproject.toml ``[tool.importlinter]``; import-linter reads the real import
graph (imports inside functions and under ``TYPE_CHECKING`` included) and follows indirect chains,
so "keyproviders never imports secretsd" also fails if keyproviders imports a third module of ours
that imports secretsd. docs/architecture.md ("Layout and layering") lists the contracts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    # --no-cache: nothing is written into the checkout, and a stale cache can never hide an import.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_every_import_linter_contract_is_kept() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken." in result.stdout, result.stdout


def test_keyproviders_never_imports_secretsd() -> None:
    # The contract that replaced the source-text search of keyproviders/*.py must stay declared:
    # lint-imports refuses an unknown contract id.
    result = lint_imports("--contract", "keyproviders-standalone")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize("contract", ["api-below-runtime", "api-no-storage"])
def test_handlers_see_services_never_the_assembly_or_storage(contract: str) -> None:
    # Issue 11 "Direction": the HTTP surface uses the daemon through secretsd.api.services only and
    # never imports a storage module itself; both contracts must stay declared and kept.
    result = lint_imports("--contract", contract)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout, result.stdout


def test_the_client_loads_no_aiohttp_server_module() -> None:
    # import-linter can forbid only whole external packages, and the async client needs aiohttp's
    # client half; what it must never pull into a service is the server half (aiohttp.web*).
    code = ("import sys, secretsd.client, secretsd.client.aio, secretsd.client.settings_source\n"
            "print(sorted(m for m in sys.modules if m.startswith('aiohttp.web')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_previous_releases_module_paths_still_import() -> None:
    # The shared peer-bench kit (and any operator script) imports these before every run.
    code = ("import secretsd.cli, secretsd.server, secretsd.daemon, secretsd.runtime.daemon as d\n"
            "assert secretsd.daemon.Daemon is d.Daemon and secretsd.server.serve is not None")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
