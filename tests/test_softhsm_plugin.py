"""The SoftHSM2 kit as our users get it (issue 15 item 2): a pytest plugin in the wheel, loaded by entry point.

The wheel test builds the distribution from a copy of the packaged sources and reads the archive (no
install). The plugin tests run pytest in a separate process on a project in a temporary directory
that has no conftest.py: the fixtures reach it only through the installed ``pytest11`` entry point,
exactly as in a service's own suite.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from softhsm.postgres import _unavailable, find_bindir
from softhsm.pytest_plugin import SoftHSMToken
from tests.test_layering import lint_imports

ROOT = Path(__file__).resolve().parents[1]
# No client/: the tree of an sdist (setup.py then pins the client distribution by version).
PACKAGED = ("pyproject.toml", "setup.py", "README.md", "keyproviders", "secretsd", "softhsm")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # A copy, so that the build's egg-info and build/ directories never land in the shared checkout.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("jarvis_secretsd-*.whl")
    return zipfile.ZipFile(path)


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(member).decode()


def test_the_wheel_ships_the_plugin_its_package_data_and_the_pytest11_entry_point(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {
        "softhsm/__init__.py",
        "softhsm/pytest_plugin.py",
        "softhsm/softhsm2.conf.template",
        "softhsm/provision-token.sh",
        "softhsm/py.typed",
    } <= names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = dist_info(wheel, "entry_points.txt")
    assert "[pytest11]\nsecretsd-softhsm = softhsm.pytest_plugin\n" in entry_points


def test_the_wheel_depends_on_python_pkcs11_and_keeps_the_pkcs11_extra(wheel: zipfile.ZipFile) -> None:
    metadata = email.parser.Parser().parsestr(dist_info(wheel, "METADATA"))
    requires = metadata.get_all("Requires-Dist") or []
    # A base dependency: no "; extra == ..." marker, so `pip install jarvis-secretsd` brings it.
    assert any(r.startswith("python-pkcs11") and ";" not in r for r in requires), requires
    assert "pkcs11" in (metadata.get_all("Provides-Extra") or []), "old install commands name the extra"


def test_the_wheel_depends_on_the_client_distribution_of_its_own_version(wheel: zipfile.ZipFile) -> None:
    # Built from a tree without client/ (as from an sdist): the light client of the same release, from
    # the index; never a file: URL of the build machine. The client's modules are not in this wheel.
    metadata = email.parser.Parser().parsestr(dist_info(wheel, "METADATA"))
    requires = metadata.get_all("Requires-Dist") or []
    assert f"jarvis-secretsd-client=={metadata['Version']}" in requires, requires
    assert not any("file:" in r for r in requires), requires
    assert not any(n.startswith("secretsd_client/") for n in wheel.namelist())


def test_the_softhsm_kit_imports_nothing_of_secretsd_but_its_client() -> None:
    result = lint_imports("--contract", "softhsm-kit")
    assert result.returncode == 0, result.stdout + result.stderr


# -- the plugin in a downstream project -----------------------------------------------------------
DOWNSTREAM = '''
import asyncio
import os
import stat

import pytest


def test_token(softhsm_token):
    assert os.path.isfile(softhsm_token.module) and softhsm_token.label
    assert softhsm_token.pin and softhsm_token.so_pin and softhsm_token.pin != softhsm_token.so_pin
    assert os.environ["SOFTHSM2_CONF"] == str(softhsm_token.conf) and softhsm_token.conf.is_file()
    assert stat.S_IMODE(softhsm_token.conf.parent.stat().st_mode) == 0o700


def test_hsm_key(hsm_key):
    assert hsm_key.key_id == hsm_key.key_label + "/v1"


def test_server_and_client(secretsd_server, secretsd_client, secretsd_async_client):
    assert secretsd_server.url.startswith("http://127.0.0.1:") and secretsd_server.admin_token
    assert secretsd_server.config_file.is_file() and secretsd_server.data_dir.is_dir()
    assert not (secretsd_server.data_dir / "master.key").exists()
    secretsd_server.seed({"app/db-password": "s3cret", "app/api-key": "k"})
    assert secretsd_client.get("app/db-password")["value"] == "s3cret"
    status = secretsd_client.status()
    assert status["provider"] == "pkcs11" and status["key_id"].endswith("/v1")

    async def read():
        async with secretsd_async_client as client:
            return (await client.get("app/api-key"))["value"]

    assert asyncio.run(read()) == "k"
'''

FAILING = '''
def test_fails(secretsd_server):
    print("DATA_DIR=" + str(secretsd_server.data_dir))
    assert False, "on purpose"
'''

FAILING_TOKEN = '''
def test_fails(softhsm_token):
    print("CONF=" + str(softhsm_token.conf))
    assert False, "on purpose"
'''


def printed(name: str, output: str) -> str:
    """The absolute path a downstream test printed as NAME=/path (not the source line that prints it)."""
    match = re.search(rf"\b{name}=(/\S+)", output)
    assert match, output
    return match.group(1)


def run_downstream(project: Path, test_source: str, *args: str, ci: bool = False) -> subprocess.CompletedProcess[str]:
    project.mkdir(exist_ok=True)
    (project / "test_downstream.py").write_text(test_source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD")}
    if ci:
        env["CI"] = "true"
    # Other installed plugins stay out: schemathesis alone takes ~3 s to import.
    quiet = ("-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest", "-p", "no:anyio")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *quiet, "-rs", "--rootdir", str(project), *args, str(project)],
        cwd=project, capture_output=True, text=True, timeout=300, check=False, env=env,
    )


@pytest.mark.e2e
def test_a_downstream_suite_gets_every_fixture_from_the_entry_point(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    # softhsm_token: run only where SoftHSM2 is installed (skips locally, fails under CI, like the rest).
    assert not (tmp_path / "conftest.py").exists()
    result = run_downstream(tmp_path / "project", DOWNSTREAM, "--softhsm-module", softhsm_token.module)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout


def test_a_missing_softhsm_is_a_skip_locally_and_a_failure_under_ci(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-libsofthsm2.so")
    local = run_downstream(tmp_path / "local", DOWNSTREAM, "--softhsm-module", missing)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "3 skipped" in local.stdout and f"--softhsm-module {missing} is not a file" in local.stdout
    under_ci = run_downstream(tmp_path / "ci", DOWNSTREAM, "--softhsm-module", missing, ci=True)
    assert under_ci.returncode == 1, under_ci.stdout + under_ci.stderr
    assert "SoftHSM2 is required under CI" in under_ci.stdout and "3 errors" in under_ci.stdout


@pytest.mark.e2e
def test_keep_on_failure_keeps_the_token_and_the_daemon_data_and_shows_the_daemon_log(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    kept = run_downstream(tmp_path / "kept", FAILING, "--softhsm-keep", "-s")
    assert kept.returncode == 1, kept.stdout + kept.stderr
    assert "secretsd daemon log" in kept.stdout and "listening on" in kept.stdout
    data_dir = Path(printed("DATA_DIR", kept.stdout))
    paths = [Path(line.split("kept ", 1)[1].split(" (")[0]) for line in kept.stderr.splitlines() if " kept " in line]
    try:
        assert data_dir.parent in paths and data_dir.is_dir(), kept.stderr
        token_home = next(p for p in paths if p.name.startswith("secretsd-softhsm-"))
        assert (token_home / "softhsm2.conf").is_file() and any((token_home / "tokens").iterdir())
    finally:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
    # Without the flag the token directory goes (the daemon's data goes by the same loop; no daemon
    # here, to keep the test short).
    plain = run_downstream(tmp_path / "plain", FAILING_TOKEN)
    assert plain.returncode == 1 and " kept " not in plain.stderr, plain.stdout + plain.stderr
    conf = Path(printed("CONF", plain.stdout))
    assert conf.name == "softhsm2.conf" and not conf.parent.exists(), "without --softhsm-keep nothing is left behind"


DOWNSTREAM_POSTGRES = '''
import asyncio

import asyncpg

from softhsm.postgres import fresh_database


def test_a_fresh_database(postgres_server):
    async def check():
        async with fresh_database(postgres_server) as name:
            conn = await asyncpg.connect(postgres_server.dsn(name))
            try:
                return await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            finally:
                await conn.close()

    assert asyncio.run(check()) == 0
'''


@pytest.mark.e2e
def test_a_downstream_suite_gets_the_postgres_fixture_from_the_same_plugin(tmp_path: Path) -> None:
    if find_bindir() is None:
        _unavailable("initdb/pg_ctl were not found")  # a skip locally, a failure under CI
    result = run_downstream(tmp_path / "project", DOWNSTREAM_POSTGRES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
