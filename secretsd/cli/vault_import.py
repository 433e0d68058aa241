"""``secretsd import-vault``: copy a Vault or OpenBao KV version 2 mount into this daemon.

It reads through the source's own HTTP API with a Vault token (``VAULT_TOKEN`` or ``BAO_TOKEN``,
never an argument: it would land in the shell history) and writes through ours, 1,000 secrets per
``POST /v1/secrets:batch``, each map stored by the façade's one value mapping
(``secretsd.domain.kv_map``), so the copy reads back identically through the Vault façade.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from secretsd.cli.common import Ctx, emit_json, json_option, main, remote, table
from secretsd.errors import RequestError, SecretsdError, UnreachableError

#: Writes per POST /v1/secrets:batch (the API's limit).
BATCH = 1000
#: The environment variables the source's token is read from, in order.
TOKEN_ENV = ("VAULT_TOKEN", "BAO_TOKEN")


class VaultSource:
    """The source mount, read over Vault's HTTP API (stdlib only: the CLI stays light)."""

    def __init__(self, addr: str, token: str, mount: str, *, ca_file: Path | None = None, timeout: float = 30) -> None:
        self._base = addr.rstrip("/") + "/v1/" + mount.strip("/")
        self._headers = {"X-Vault-Token": token}
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._timeout = timeout

    def _get(self, path: str, *, listing: bool = False) -> dict[str, Any] | None:
        """The JSON answer to GET ``path`` under the mount (``?list=true`` if ``listing``); None for a 404."""
        url = self._base + "/" + urllib.parse.quote(path) + ("?list=true" if listing else "")
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310 (the operator's own URL)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._context) as resp:  # noqa: S310
                found: dict[str, Any] = json.loads(resp.read())
                return found
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            # The source's own reasons, never our token (it is in a header, not in the URL).
            try:
                reasons = "; ".join(str(e) for e in json.loads(exc.read()).get("errors") or [])
            except (ValueError, AttributeError):
                reasons = ""
            raise RequestError(f"the source answered {exc.code} to GET {path}" + (f": {reasons}" if reasons else "")
                               ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UnreachableError(f"cannot read the source at {self._base}: {type(exc).__name__}") from None

    def walk(self, folder: str = "") -> list[str]:
        """Every secret's path at and below ``folder`` (a LIST per folder, as the CLIs do)."""
        found: list[str] = []
        todo = [folder.strip("/") + "/" if folder.strip("/") else ""]
        while todo:
            current = todo.pop()
            page = self._get(f"metadata/{current}", listing=True)
            keys = (page or {}).get("data", {}).get("keys") or []
            for key in keys:
                (todo if key.endswith("/") else found).append(current + key)
        return sorted(found)

    def read(self, path: str) -> dict[str, Any] | None:
        """The current map at ``path`` (None: its current version is deleted or destroyed)."""
        answer = self._get(f"data/{path}")
        data = ((answer or {}).get("data") or {}).get("data")
        return data if isinstance(data, dict) else None


def _target(prefix: str, path: str) -> str:
    return f"{prefix.strip('/')}/{path}" if prefix.strip("/") else path


@main.command(name="import-vault")
@click.option("--vault-addr", envvar=["VAULT_ADDR", "BAO_ADDR"], required=True, metavar="URL",
              help="The source Vault or OpenBao (default: $VAULT_ADDR, then $BAO_ADDR). Its token is read "
                   "from $VAULT_TOKEN or $BAO_TOKEN.")
@click.option("--vault-ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA bundle for the source's TLS certificate.")
@click.option("--mount", default="secret", show_default=True, help="The source's KV version 2 mount.")
@click.option("--from", "source", default="", metavar="PATH", help="Copy only this folder of the mount (default: all).")
@click.option("--prefix", default="", help="Store each secret under this prefix of ours (default: the same path).")
@click.option("--overwrite", is_flag=True,
              help="Write a new version over a secret that exists here (by default it is left and reported).")
@click.option("--dry-run", is_flag=True, help="Read the source and show what would be written; write nothing.")
@json_option
@remote
def import_vault(ctx: Ctx, vault_addr: str, vault_ca_file: Path | None, mount: str, source: str, prefix: str,
                 overwrite: bool, dry_run: bool, as_json: bool) -> None:
    """Copy a Vault or OpenBao KV version 2 mount into this daemon (current versions).

    Each secret's map is stored as the Vault façade stores it (docs/vault-compat.md): exactly
    {"value": s} as s, any other map of strings as canonical JSON; a map with other values is
    reported and skipped. Exit 1 if anything was skipped or refused.

    \b
    Example:
      VAULT_ADDR=https://vault:8200 VAULT_TOKEN=hvs.... secretsd import-vault --mount secret
    """
    from secretsd.client.calls import value_field
    from secretsd.domain.kv_map import check_map, stored_value

    token = next((os.environ[name] for name in TOKEN_ENV if os.environ.get(name)), None)
    if token is None:
        raise click.UsageError("set VAULT_TOKEN (or BAO_TOKEN) to a token that may read the source mount")
    vault = VaultSource(vault_addr, token, mount, ca_file=vault_ca_file)
    items: list[dict[str, Any]] = []
    problems: list[tuple[str, str]] = []
    for path in vault.walk(source):
        data = vault.read(path)
        if data is None:
            problems.append((path, "its current version is deleted or destroyed"))
            continue
        try:
            value = stored_value(check_map(data))
        except SecretsdError as exc:
            problems.append((path, exc.message))
            continue
        items.append({"path": _target(prefix, path)} | value_field(value) | ({} if overwrite else {"cas": 0}))
    written = 0
    if not dry_run and items:
        with ctx.client() as client:
            for start in range(0, len(items), BATCH):
                for result in client.write_batch(items[start:start + BATCH])["results"]:
                    if result["status"] == 200:
                        written += 1
                    elif result["status"] == 409 and not overwrite:
                        problems.append((result["path"], "exists here (--overwrite writes a new version)"))
                    else:
                        problems.append((result["path"], str(result["error"].get("detail"))))
    if as_json:
        emit_json({"dry_run": dry_run, "paths": [i["path"] for i in items], "written": written,
                   "problems": [{"path": p, "reason": why} for p, why in problems]})
    else:
        if dry_run:
            table("Would write", ["path"], [[i["path"]] for i in items])
        else:
            click.echo(f"wrote {written} of {len(items)} secret(s) from {mount}/")
        if problems:
            table("Not copied", ["path", "reason"], [[p, why] for p, why in problems])
    if problems:
        raise SystemExit(1)
