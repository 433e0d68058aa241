"""The light client distribution (issue 15 item 5): ``jarvis-secretsd-client`` in client/, import package
``secretsd_client``, which the daemon's distribution depends on.

What a service installs must not bring the daemon's stack; the daemon's old import paths must name the
very same objects (one error hierarchy, not two); setup.py's requirement on the client must resolve
from this checkout during development and name an index version in a release (docs/releasing.md).
A fresh virtual environment with only the client wheel installed is .ci/run's example step.
"""

from __future__ import annotations

import email.parser
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import secretsd_client
import secretsd_client.errors
import secretsd_client.problems
import secretsd_client.settings_source
from secretsd_client.calls import Call

import secretsd.client
import secretsd.client.settings_source
import secretsd.errors
import secretsd.problems
from tests.test_layering import lint_imports

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client"
# The daemon's stack: none of it may be imported, or required, by the client distribution. (python-dotenv
# is not here: pydantic-settings itself requires it.)
DAEMON_STACK = ("secretsd", "keyproviders", "softhsm", "cryptography", "pkcs11", "prometheus_client", "rich",
                "aiohttp", "click")


def _load_setup_py(where: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("secretsd_setup_py", where / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": setup() does not run
    return module


def test_the_client_distribution_imports_nothing_of_the_daemon() -> None:
    result = lint_imports("--contract", "client-distribution")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout, result.stdout


# Imports the client with every module of the daemon's stack made unimportable: a service whose
# environment has only the client distribution (and pydantic-settings) gets this far.
BLOCKED_IMPORTS = """
import importlib.abc, sys
BLOCKED = sys.argv[1].split(",")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Blocker())
from secretsd_client import RetryPolicy, SecretsClient
from secretsd_client.settings_source import SecretPath, SecretsdSettingsSource
import secretsd_client.errors, secretsd_client.problems, secretsd_client.paths, secretsd_client.defaults
SecretsClient("http://127.0.0.1:1", "t").close()
try:
    from secretsd_client import AsyncSecretsClient
except ImportError as exc:
    print("aio:", exc)
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_the_sync_client_and_settings_source_load_without_the_daemons_stack() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, ",".join(DAEMON_STACK)], cwd=CLIENT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: []" in result.stdout, result.stdout
    # The async face names the extra that brings aiohttp instead of ending in a bare ModuleNotFoundError.
    assert "aio: AsyncSecretsClient needs aiohttp: pip install 'jarvis-secretsd-client[aio]'" in result.stdout


def test_one_error_hierarchy_the_daemons_names_are_the_clients_classes() -> None:
    classes = {name: cls for name, cls in vars(secretsd_client.errors).items()
               if isinstance(cls, type) and issubclass(cls, Exception)}
    assert len(classes) > 20 and "NotFoundError" in classes
    for name, cls in classes.items():
        assert getattr(secretsd.errors, name) is cls, name
    assert set(secretsd.errors.__all__) == set(classes)
    assert secretsd.problems.PROBLEMS is secretsd_client.problems.PROBLEMS
    # What the client raises from a problem document is what a caller of the daemon's package catches.
    raised = secretsd_client.problems.error_from_problem(
        {"type": "urn:jarvis-secretsd:problem:not-found", "detail": "no such secret"}, 404)
    assert isinstance(raised, secretsd.errors.NotFoundError) and isinstance(raised, secretsd.errors.SecretsdError)


def test_the_old_import_paths_name_the_same_objects() -> None:
    assert secretsd.client.SecretsClient is secretsd_client.SecretsClient
    assert secretsd.client.RetryPolicy is secretsd_client.RetryPolicy
    assert secretsd.client.AsyncSecretsClient is secretsd_client.AsyncSecretsClient
    old, new = secretsd.client.settings_source, secretsd_client.settings_source
    assert old.SecretsdSettingsSource is new.SecretsdSettingsSource and old.SecretPath is new.SecretPath
    from secretsd.client.calls import Call as OldCall
    from secretsd.client.operations import children
    assert OldCall is Call and children is importlib.import_module("secretsd_client.operations").children


def test_the_tests_and_the_daemons_they_start_use_the_client_source() -> None:
    # pip installs the client dependency of `pip install -e '.[test]'` as a copy: an edit to
    # client/secretsd_client must still reach this process and its subprocesses (tests/conftest.py).
    assert Path(secretsd_client.__file__).resolve().is_relative_to(CLIENT)
    result = subprocess.run([sys.executable, "-c", "import secretsd_client; print(secretsd_client.__file__)"],
                            cwd=ROOT / "tests", capture_output=True, text=True, timeout=60, check=True)
    assert Path(result.stdout.strip()).resolve().is_relative_to(CLIENT), result.stdout


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy, so that build/ and egg-info never land in the shared checkout.
    src, out = tmp_path_factory.mktemp("client-src"), tmp_path_factory.mktemp("client-wheel")
    shutil.copytree(CLIENT, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build",
                                                                                 "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("jarvis_secretsd_client-*.whl")
    return zipfile.ZipFile(path)


def test_the_client_wheel_requires_pydantic_settings_and_aiohttp_only_as_the_aio_extra(
        client_wheel: zipfile.ZipFile) -> None:
    (member,) = [n for n in client_wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(client_wheel.read(member).decode())
    requires = sorted(metadata.get_all("Requires-Dist") or [])
    assert requires == ['aiohttp>=3.13; extra == "aio"', "pydantic-settings>=2.3", "pydantic>=2.6"], requires
    packages = {name.split("/")[0] for name in client_wheel.namelist() if not name.endswith((".dist-info/", "RECORD"))}
    assert {p for p in packages if not p.endswith(".dist-info")} == {"secretsd_client"}, packages
    assert "secretsd_client/py.typed" in client_wheel.namelist()


def test_both_distributions_have_one_version() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert client["name"] == "jarvis-secretsd-client" and client["version"] == root["version"]
    assert "dependencies" in root["dynamic"] and "dependencies" not in root  # setup.py declares them


def test_setup_py_takes_the_client_from_this_checkout_by_an_absolute_file_url() -> None:
    setup_py = _load_setup_py(ROOT)
    requirement = setup_py.client_requirement({})
    assert requirement == f"jarvis-secretsd-client @ {CLIENT.resolve().as_uri()}"
    assert requirement.split(" @ ")[1].startswith("file:///")
    assert not any(dep.startswith("jarvis-secretsd-client") for dep in setup_py.DEPENDENCIES)


def test_setup_py_release_override_names_the_index_requirement() -> None:
    setup_py = _load_setup_py(ROOT)
    version = setup_py.version()
    env = {"SECRETSD_CLIENT_REQUIREMENT": f" jarvis-secretsd-client=={version} "}
    assert setup_py.client_requirement(env) == f"jarvis-secretsd-client=={version}"
    for accepted in (f"jarvis_secretsd_client[aio]=={version}", "jarvis-secretsd-client @ file:///tmp/c.whl"):
        assert setup_py.client_requirement({"SECRETSD_CLIENT_REQUIREMENT": accepted}) == accepted


@pytest.mark.parametrize("override", [
    "jarvis-secretsd==0.1.0", "requests", "jarvis-secretsd-clientx==0.1.0", "evil @ https://example.invalid/x.whl",
    # The client holds rules the daemon enforces (the path rule): a release pins exactly its own client.
    "jarvis-secretsd-client>=0.1", "jarvis-secretsd-client", "jarvis-secretsd-client==0.0.9",
    "jarvis-secretsd-client==0.1.0; python_version < '4'", "jarvis-secretsd-client==0.1.0, evil",
])
def test_setup_py_release_override_must_pin_this_client_release(override: str) -> None:
    setup_py = _load_setup_py(ROOT)
    with pytest.raises(SystemExit, match="is not jarvis-secretsd-client pinned to this release"):
        setup_py.client_requirement({"SECRETSD_CLIENT_REQUIREMENT": override})


def test_setup_py_without_the_client_folder_pins_this_version(tmp_path: Path) -> None:
    # An sdist of the daemon (no client/ beside setup.py): the client of the same release, from the index.
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _load_setup_py(tmp_path).client_requirement({}) == f"jarvis-secretsd-client=={version}"


def test_the_conftest_puts_the_client_source_first_on_the_subprocess_path() -> None:
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(CLIENT)
