"""The root group loads a command's module only when that command runs.

Importing every command module up front pulled the server, storage and crypto stacks into each
``secretsd get`` (about 30x the start-up of a bare interpreter). ``COMMANDS`` names, for each
top-level command, the modules that register it (a group may be extended by a second module,
e.g. ``keyring rewrap`` lives beside the HSM commands) and its one-line help, so ``--help`` lists
every command without importing any. ``tests/test_cli_startup.py`` checks the table against the
real commands so it cannot drift.
"""

from __future__ import annotations

import importlib
import textwrap
from typing import NamedTuple

import click


class LazyCommand(NamedTuple):
    modules: tuple[str, ...]
    short_help: str


_P = "secretsd.cli."

COMMANDS: dict[str, LazyCommand] = {
    "init": LazyCommand((_P + "local",), "Create a store and print its admin token, once."),
    "serve": LazyCommand((_P + "local",), "Run the daemon."),
    "get": LazyCommand((_P + "secrets",), "Print a secret's value: its stored bytes and nothing else."),
    "set": LazyCommand((_P + "secrets",), "Store a new version of a secret."),
    "list": LazyCommand((_P + "secrets",), "List secret paths below PREFIX (never values)."),
    "versions": LazyCommand((_P + "secrets",), "Show a secret's versions: when, by whom, and their state."),
    "delete": LazyCommand((_P + "secrets",),
                          "Soft-delete the current version (or --versions); undelete can restore it."),
    "undelete": LazyCommand((_P + "secrets",), "Restore soft-deleted versions."),
    "destroy": LazyCommand((_P + "secrets",), "Erase versions for good (their metadata stays)."),
    "rotate": LazyCommand((_P + "rotation",),
                          "Rotate a secret now: a new value becomes current, the old one previous."),
    "rotation": LazyCommand((_P + "rotation",), "Rotation policies and the scheduler's view of them."),
    "status": LazyCommand((_P + "system",), "Seal state, key provider, keyring term and version."),
    "health": LazyCommand((_P + "system",), "Is the daemon ready? Exit 0 if so, 1 if not."),
    "policy": LazyCommand((_P + "system",), "Policy tools."),
    "keyring": LazyCommand((_P + "system", _P + "masterkey"), "Keyring (data-key) operations."),
    "token": LazyCommand((_P + "system", _P + "recovery"), "Create, list and revoke tokens."),
    "hsm": LazyCommand((_P + "masterkey",), "Provision and check the HSM (PKCS#11) key provider."),
    "recovery": LazyCommand((_P + "recovery",),
                            "Recovery shares: a recovery key split among operators (docs/recovery.md)."),
    "storage": LazyCommand((_P + "storage",), "Storage backends: copy a store from one to another."),
    "backup": LazyCommand((_P + "backup",), "Back up a store to one authenticated file, verify it, restore it."),
    "audit": LazyCommand((_P + "audit",), "Verify the tamper-evident audit trail."),
    "login": LazyCommand((_P + "login",),
                         "Keep a token for the CLI (0600, under ~/.config/secretsd), after the daemon accepts it."),
    "whoami": LazyCommand((_P + "login",), "Who the daemon takes this CLI for: client, method, policies and expiry."),
    "import-env": LazyCommand((_P + "env",), "Import a .env file: each KEY becomes the secret PREFIX/KEY."),
    "import-vault": LazyCommand((_P + "vault_import",),
                                "Copy a Vault or OpenBao KV version 2 mount into this daemon (current versions)."),
    "export-env": LazyCommand((_P + "env",),
                              "Write the secrets directly under PREFIX as a dotenv file (NAME=value)."),
    "run": LazyCommand((_P + "env",), "Run COMMAND with secrets in its environment; exit with its exit code."),
}


def shorten(text: str, limit: int) -> str:
    """What click's own listing does to a command's one-line help that is too long for the width."""
    if len(text) <= limit:
        return text
    if limit < len("..."):
        return "..."
    return textwrap.shorten(text, limit, placeholder="...", break_on_hyphens=False)


class LazyGroup(click.Group):
    """A click group whose commands come from ``COMMANDS``: each module is imported on first use.

    The modules register their commands on this group themselves (``@main.command()``), as before.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            for module in COMMANDS[cmd_name].modules:
                importlib.import_module(module)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The table's help, not the commands', so that --help imports nothing.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            lazy = COMMANDS.get(name)
            text = lazy.short_help if lazy else self.commands[name].get_short_help_str(limit)
            rows.append((name, shorten(text, limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
