"""Cheap static checks that keep the files under deploy/ honest.

Nothing here builds an image, starts a unit or talks to a cluster: those need Docker, systemd and
Kubernetes. The checks catch the regressions that are easy to make by editing text: a dropped
hardening key, a root USER, a key file copied into an image, a probe removed, a config that no
longer loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from secretsd.runtime.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "secretsd.service"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBE = DEPLOY / "kubernetes"


def _unit_settings() -> dict[str, list[str]]:
    """``Key=value`` lines of the [Service] section (comments skipped; a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_has_the_hardening_keys() -> None:
    unit = _unit_settings()
    expected = {
        "Type": "simple",
        "User": "secretsd",
        "StateDirectory": "secretsd",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "secretsd",
        "UMask": "0077",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], f"{key}= should be {value!r}, is {unit.get(key)}"
    assert "@system-service" in unit["SystemCallFilter"]
    families = unit["RestrictAddressFamilies"][0].split()
    assert set(families) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert unit["LimitCORE"] == ["0"], "a core dump would hold the unsealed DEKs"


def test_systemd_unit_reloads_with_sighup_and_loads_the_pin_as_a_credential() -> None:
    unit = _unit_settings()
    assert len(unit["ExecReload"]) == 1
    assert re.fullmatch(r"(/(usr/)?bin/)?kill -HUP \$MAINPID", unit["ExecReload"][0])
    assert unit["ExecStart"] == ["/opt/secretsd/bin/secretsd serve --config /etc/secretsd/secretsd.toml"]
    assert any(v.startswith("hsm-pin:") for v in unit["LoadCredential"])
    # The copy the daemon reads must be owner-only, in the unit's RuntimeDirectory.
    assert unit["RuntimeDirectoryMode"] == ["0700"]
    assert any("-m 0400 -o secretsd" in v and "/run/secretsd/hsm-pin" in v for v in unit["ExecStartPre"])
    assert "Environment" not in unit or not any("PIN" in v.upper() for v in unit["Environment"])


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text("utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    out = []
    for line in joined:
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_a_fixed_non_root_user_with_a_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert "python:3.11-slim" in DOCKERFILE.read_text("utf-8")
    users = [args for op, args in instructions if op == "USER"]
    assert users, "no USER: the container would run as root"
    final_user = users[-1].split(":")[0]
    assert final_user.isdigit() and int(final_user) >= 1000, "a numeric, non-root UID (runAsNonRoot checks it)"
    health = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in DOCKERFILE.read_text("utf-8")
    assert "urllib" in health[0] and "curl" not in health[0]
    cmd = [args for op, args in instructions if op == "CMD"][-1]
    assert '"serve", "--config", "/etc/secretsd/secretsd.toml"' in cmd
    assert any(op == "VOLUME" and "/var/lib/secretsd" in args for op, args in instructions)


def test_dockerfile_copies_no_key_token_or_secret_file() -> None:
    forbidden = re.compile(r"(master\.key|\.key\b|\.pem\b|token|pin|\.env\b|secretsd\.db|credentials)", re.I)
    for op, args in _dockerfile_instructions():
        if op in {"COPY", "ADD"}:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert not forbidden.search(src), f"{op} {args}: looks like a secret"
            assert sources not in (["."], ["./"]), "copy what the package needs, not the whole context"
        if op in {"ENV", "ARG"}:
            assert not re.search(r"(PIN|PASSWORD|PASSPHRASE|TOKEN)\w*=", args, re.I), f"{op} {args}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text("utf-8")
    assert "**/master.key" in ignore and "**/*.key" in ignore


def test_dockerfile_copies_what_the_build_needs() -> None:
    # setup.py declares the dependencies (the client among them, from client/): without either, the
    # image's `pip install .` would build a daemon with no dependencies or fail on the client.
    copied = {src.rstrip("/").removeprefix("./") for op, args in _dockerfile_instructions() if op == "COPY"
              for src in [a for a in args.split() if not a.startswith("--")][:-1]}
    assert {"pyproject.toml", "setup.py", "README.md", "client", "keyproviders", "secretsd"} <= copied, copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text("utf-8").splitlines()
    for needed in ("!pyproject.toml", "!setup.py", "!README.md", "!client/", "!keyproviders/", "!secretsd/"):
        assert needed in ignore, needed


def _kube_text() -> str:
    return "\n".join(p.read_text("utf-8") for p in sorted(KUBE.glob("*.yaml")))


def test_kubernetes_manifests_harden_the_pod_and_probe_both_endpoints() -> None:
    statefulset = (KUBE / "statefulset.yaml").read_text("utf-8")
    for needle in ("runAsNonRoot: true", "readOnlyRootFilesystem: true", "allowPrivilegeEscalation: false",
                   'drop: ["ALL"]', "type: RuntimeDefault", "fsGroupChangePolicy: OnRootMismatch",
                   "livenessProbe:", "readinessProbe:", "path: /healthz", "path: /readyz",
                   "SECRETSD_AUDIT__CHAIN", "resources:"):
        assert needle in statefulset, needle
    assert "kind: NetworkPolicy" in _kube_text()


def test_kubernetes_manifests_parse_and_keep_secrets_out_of_the_configmap() -> None:
    yaml = pytest.importorskip("yaml")
    docs = [d for p in sorted(KUBE.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text("utf-8")) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert "Secret" not in by_kind, "no Secret with placeholder values is shipped"
    (sts,) = by_kind["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for env in container.get("env", []):
        assert "value" not in env or not re.search(r"PIN|PASSWORD|DSN|TOKEN", env["name"]), env["name"]
    (config,) = by_kind["ConfigMap"]
    toml_text = config["data"]["secretsd.toml"]
    assert not re.search(r"^\s*(pin|password|passphrase|token)\s*=", toml_text, re.M | re.I)
    assert not re.search(r"postgres(ql)?://[^@\s]*:[^@\s]*@", toml_text)


def test_kubernetes_config_map_settings_load(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((KUBE / "configmap.yaml").read_text("utf-8"))
    path = tmp_path / "secretsd.toml"
    path.write_text(config["data"]["secretsd.toml"], "utf-8")
    settings = load_settings(path, data_dir=tmp_path / "data")
    assert settings.listen == "0.0.0.0:8750" and settings.tls_cert_file is not None


@pytest.mark.parametrize("name", ["secretsd.toml.example", "container/secretsd.toml"])
def test_example_configs_load(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRETSD_CONFIG", raising=False)
    for var in [v for v in os.environ if v.startswith("SECRETSD_")]:
        monkeypatch.delenv(var)
    settings = load_settings(DEPLOY / name, data_dir=tmp_path / "data")
    assert settings.data_dir == (tmp_path / "data").resolve()
    # Off loopback, so TLS must be configured (or the daemon would refuse to start).
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    assert not settings.allow_plaintext
    assert settings.audit.fail_closed
    options = settings.key_provider.options()
    assert "pin" not in options and "passphrase" not in options
    if options["kind"] == "pkcs11":
        assert Path(options["pin_file"]).is_absolute(), "a relative pin_file resolves differently per command"


def test_compose_files_give_each_replica_its_own_audit_chain() -> None:
    single = (DEPLOY / "compose.yaml").read_text("utf-8")
    assert "read_only: true" in single and "cap_drop: [ALL]" in single
    assert "secretsd-data:/var/lib/secretsd" in single
    ha = (DEPLOY / "compose.ha.yaml").read_text("utf-8")
    chains = re.findall(r"SECRETSD_AUDIT__CHAIN:\s*(\S+)", ha)
    assert len(chains) == 2 and len(set(chains)) == 2
    assert not re.search(r"postgres(ql)?://\w+:(?!\$\{)", ha), "a literal password in the DSN"
