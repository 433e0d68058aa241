"""CLI start-up: the root group imports a command's module only when that command runs.

The lazy table (secretsd.cli.lazy.COMMANDS) is checked against the real commands, and the light
commands are run in a real process that reports which modules it imported.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from secretsd.cli import main
from secretsd.cli.lazy import COMMANDS, LazyGroup
from tests.helpers import DaemonProcess, http, init_store

# What a command that only talks to the daemon has no use for: the server, its storage, crypto
# and audit stacks, the HSM library, the metrics library.
FORBIDDEN = ("aiohttp", "secretsd.runtime", "secretsd.storage", "secretsd.custody", "secretsd.audit",
             "secretsd.api", "secretsd.domain", "cryptography", "pkcs11", "prometheus_client")

# Runs the CLI like the console script, then writes the names of the imported modules.
WRAPPER = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["MODULES_OUT"], "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["secretsd", *sys.argv[1:]]
from secretsd.cli import main
main()
"""


def _load_all() -> None:
    for lazy in COMMANDS.values():
        for module in lazy.modules:
            importlib.import_module(module)


def test_lazy_table_names_every_command_with_its_real_help_and_module() -> None:
    _load_all()
    assert isinstance(main, LazyGroup)
    assert set(main.commands) == set(COMMANDS)
    for name, command in main.commands.items():
        lazy = COMMANDS[name]
        assert command.get_short_help_str(10**6) == lazy.short_help, name
        assert command.callback is not None and command.callback.__module__ in lazy.modules, name


def test_help_lists_every_command_as_click_would_with_them_loaded() -> None:
    _load_all()
    ctx = click.Context(main, info_name="secretsd")
    for width in (80, 60, 200):
        lazy, eager = click.HelpFormatter(width=width), click.HelpFormatter(width=width)
        main.format_commands(ctx, lazy)
        click.Group.format_commands(main, ctx, eager)  # click's own listing, from the real commands
        assert lazy.getvalue() == eager.getvalue()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    data = tmp_path_factory.mktemp("startup") / "d"
    token = init_store(data)
    proc = DaemonProcess(data).start()
    try:
        assert http("PUT", f"{proc.url}/v1/secrets/app/a", token=token, body={"value": "v"}).status == 200
        yield proc.url, token
    finally:
        proc.stop()


def _imported(args: list[str], env: dict[str, str], out: Path) -> set[str]:
    result = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=60,
                            env=os.environ.copy() | env | {"MODULES_OUT": str(out)})
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return set(json.loads(out.read_text()))


@pytest.mark.e2e
@pytest.mark.parametrize("args", [
    ["--version"], ["--help"], ["get", "app/a"], ["set", "app/b", "--stdin"], ["list", "app"],
    ["export-env", "app"], ["run", "--prefix", "app", "--", sys.executable, "-c", "pass"],
], ids=lambda a: a[0])
def test_light_commands_never_import_the_server_storage_or_crypto_stacks(
        args: list[str], daemon: tuple[str, str], tmp_path: Path) -> None:
    url, token = daemon
    env = {"SECRETSD_ADDR": url, "SECRETSD_TOKEN": token}
    modules = _imported(args, env, tmp_path / "modules.json")
    assert "click" in modules  # the report is real: the wrapper ran the CLI
    if args[0] not in ("--version", "--help"):
        assert "secretsd_client.sync" in modules  # the client (the light distribution) did the call
    heavy = sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert heavy == [], args

