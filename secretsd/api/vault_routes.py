"""The Vault façade's operations, declared like the native ones (``secretsd.api.routes.Operation``).

The mount is configured (``[vault] kv_mount``), so the table is built per mount and added to the
native table by ``create_app``: one router, one audit action per operation, one OpenAPI document.
Every action is ``vault.*``, so the audit log tells a Vault client's request from a native one.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from secretsd.api import openapi
from secretsd.api import vault as v
from secretsd.api.bodies import MAX_VERSION
from secretsd.api.routes import OPERATIONS, Operation, Query, Variant
from secretsd.api.vault_bodies import KvPatchBody, KvVersionsBody, KvWriteBody
from secretsd.domain.policy import Capability

_LIST = Query("list", "string", "`true`: list the keys one level below (Vault's LIST)", (("enum", ["true"]),))


def _versions(method: str, base: str) -> Operation:
    return Operation(method, f"{base}/{{action}}/{{path:.+}}", v.kv_versions, "Change the state of versions",
                     None, body=KvVersionsBody, ok=204, vault=True, variants=(
                         Variant("delete", "vault.kv.delete", Capability.DELETE, "Vault: delete versions"),
                         Variant("undelete", "vault.kv.undelete", Capability.DELETE, "Vault: undelete versions"),
                         Variant("destroy", "vault.kv.destroy", Capability.ADMIN, "Vault: destroy versions")))


def operations(mount: str) -> tuple[Operation, ...]:
    """The façade's operations for a KV version 2 mount at ``/v1/{mount}``."""
    base = f"/v1/{mount}"
    data = f"{base}/data/{{path:.+}}"
    write = "Vault: write a new version of the map (`options.cas`: check-and-set)"
    return (
        Operation("GET", data, v.kv_read, "Vault: read the map (current version, or ?version=N)",
                  "vault.kv.read", Capability.READ, vault=True, query=(
                      Query("version", "integer", "a version number (0: the current one)",
                            (("minimum", 0), ("maximum", MAX_VERSION))),)),
        Operation("POST", data, v.kv_write, write, "vault.kv.write", Capability.WRITE, body=KvWriteBody, vault=True),
        Operation("PUT", data, v.kv_write, write, "vault.kv.write", Capability.WRITE, body=KvWriteBody, vault=True),
        Operation("PATCH", data, v.kv_patch, "Vault: merge a patch into the current map (also needs `read`)",
                  "vault.kv.patch", Capability.WRITE, body=KvPatchBody, vault=True),
        Operation("DELETE", data, v.kv_delete, "Vault: delete the current version", "vault.kv.delete",
                  Capability.DELETE, ok=204, vault=True),
        _versions("POST", base),
        _versions("PUT", base),
        Operation("GET", f"{base}/metadata/{{path:.+}}", v.kv_metadata,
                  "Vault: the versions of a secret, or with ?list=true the keys below it (needs `list`)", None,
                  Capability.READ, query=(_LIST,), vault=True,
                  query_actions=("list", "true", "vault.kv.list", "vault.kv.metadata")),
        # The top of the mount, as the bao CLI (no slash) and hvac (a slash) name it.
        *(Operation("GET", f"{base}/metadata{slash}", v.kv_list_root,
                    "Vault: the keys at the top of the mount (?list=true)", "vault.kv.list", Capability.LIST,
                    query=(_LIST,), vault=True) for slash in ("", "/")),
        Operation("DELETE", f"{base}/metadata/{{path:.+}}", v.kv_delete_metadata,
                  "Vault: destroy every version of a secret", "vault.kv.delete-metadata", Capability.ADMIN,
                  ok=204, vault=True),
        Operation("GET", f"{base}/config", v.kv_config, "Vault: the mount's settings", "vault.kv.config", vault=True),
        Operation("GET", "/v1/sys/internal/ui/mounts/{path:.+}", v.ui_mounts,
                  "Vault: the mount serving a path (the CLIs' preflight)", "vault.sys.mount", vault=True),
        Operation("GET", "/v1/sys/mounts", v.sys_mounts, "Vault: the one KV mount", "vault.sys.mounts", vault=True),
        Operation("GET", "/v1/sys/health", v.sys_health,
                  "Vault: health (200 active, 503 sealed; `activecode`/`sealedcode` override)", None,
                  public=True, vault=True),
        Operation("GET", "/v1/auth/token/lookup-self", v.lookup_self, "Vault: the calling token",
                  "vault.token.lookup-self", vault=True),
        Operation("POST", "/v1/auth/token/renew-self", v.renew_self,
                  "Vault: renew the calling token (answers its unchanged lifetime)", "vault.token.renew-self",
                  vault=True),
        Operation("PUT", "/v1/auth/token/renew-self", v.renew_self,
                  "Vault: renew the calling token (answers its unchanged lifetime)", "vault.token.renew-self",
                  vault=True),
    )


@cache
def table(mount: str | None) -> tuple[Operation, ...]:
    """The native operations, and the façade's when it is enabled (``mount`` not None)."""
    return OPERATIONS if mount is None else (*OPERATIONS, *operations(mount))


@cache
def document(mount: str | None) -> dict[str, Any]:
    """The OpenAPI document of ``table(mount)``, built once per mount."""
    return openapi.document() if mount is None else openapi.build(table(mount))
