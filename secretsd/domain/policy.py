"""Policies: which client may do what on which path. Deny by default; an explicit deny wins.

A policy file is TOML::

    [policies.billing]
    description = "the billing service"
    rules = [
      { path = "billing/**", allow = ["read", "list"] },
      { path = "billing/admin/*", deny = ["read"] },
    ]

Globs match whole segments: ``*`` is one segment (or part of one: ``db-*``), ``**`` is zero or
more segments, so ``app/**`` covers ``app`` itself and everything below it. System resources are
the paths ``sys/status``, ``sys/tokens``, ``sys/keyring``, ``sys/policy`` and
``sys/metrics``. The built-in
``root`` policy allows everything and cannot be redefined.

A file is read once per load (one ``open``, as before: no new path resolution) and its bytes are
both hashed (the digest shown in status and metrics) and parsed, so the digest is always that of
the policies in force. A load is all or nothing: the whole file is parsed before anything is
swapped in (``PolicyStore.reload``, the one path for SIGHUP and ``POST /v1/sys/policy/reload``).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import threading
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from secretsd.clock import Clock, utcnow
from secretsd.errors import ConfigError, NotFoundError, PolicyFileError, RequestError
from secretsd.events import Event, EventBus

log = logging.getLogger("secretsd.domain.policy")

ROOT_POLICY = "root"
#: A policy's name (also the OpenAPI pattern of ``/v1/sys/policies/{name}``).
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN.strip("^$"))
_GLOB_SEGMENT = re.compile(r"[A-Za-z0-9._*-]+")


class Capability(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    LIST = "list"
    DELETE = "delete"
    ROTATE = "rotate"
    ADMIN = "admin"

    @classmethod
    def parse(cls, text: str) -> Capability:
        try:
            return cls(text)
        except ValueError:
            known = ", ".join(c.value for c in cls)
            raise RequestError(f"unknown capability {text!r} (known: {known})") from None


def compile_glob(glob: str) -> re.Pattern[str]:
    """Compile a path glob to an anchored regular expression (see the module docstring)."""
    if glob == "**":
        return re.compile(r".*", re.DOTALL)
    segments = glob.split("/")
    parts: list[str] = []
    need_sep = False
    for i, seg in enumerate(segments):
        if not seg or not _GLOB_SEGMENT.fullmatch(seg):
            raise ConfigError(f"invalid path glob {glob!r}: bad segment {seg!r}")
        if seg == "**":
            parts.append(r"(?:[^/]+/)*" if i == 0 else r"(?:/[^/]+)*")
            need_sep = i != 0
            continue
        if "**" in seg:
            raise ConfigError(f"invalid path glob {glob!r}: '**' must be a whole segment")
        if need_sep:
            parts.append("/")
        parts.append("[^/]+" if seg == "*" else re.escape(seg).replace(r"\*", "[^/]*"))
        need_sep = True
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Rule:
    policy: str
    index: int
    path: str
    allow: frozenset[Capability]
    deny: frozenset[Capability]
    pattern: re.Pattern[str] = field(compare=False, repr=False)

    def describe(self) -> str:
        return f"policy {self.policy!r} rule {self.index + 1} (path {self.path!r})"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Rule | None  # None: nothing matched, so the default deny decided

    def explain(self) -> str:
        if self.rule is None:
            return "denied by default: no rule grants it"
        verb = "allowed" if self.allowed else "denied"
        return f"{verb} by {self.rule.describe()}"


def _capabilities(value: Any, where: str) -> frozenset[Capability]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of capabilities")
    caps = set()
    for item in value:
        try:
            caps.add(Capability(item))
        except ValueError:
            known = ", ".join(c.value for c in Capability)
            raise ConfigError(f"{where}: unknown capability {item!r} (known: {known})") from None
    return frozenset(caps)


def _root_rules() -> tuple[Rule, ...]:
    return (Rule(ROOT_POLICY, 0, "**", frozenset(Capability), frozenset(), compile_glob("**")),)


def sys_rule(rule: Rule) -> bool:
    """Only rules written for system resources (``sys/...``), or root, govern them: a wildcard
    meant for secrets (``*/*``, ``**``) never grants tokens, keyring or policy administration."""
    return rule.policy == ROOT_POLICY or rule.path.startswith("sys/")


@dataclass(frozen=True)
class PolicySet:
    policies: Mapping[str, tuple[Rule, ...]]
    descriptions: Mapping[str, str] = field(default_factory=dict)
    #: ``sha256:<hex>`` of the file's bytes this set was parsed from (None: no file, root only).
    digest: str | None = None

    @classmethod
    def empty(cls) -> PolicySet:
        return cls({ROOT_POLICY: _root_rules()})

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], source: str = "policy file") -> PolicySet:
        unknown = set(doc) - {"policies"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}")
        table = doc.get("policies", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: 'policies' must be a table")
        policies: dict[str, tuple[Rule, ...]] = {ROOT_POLICY: _root_rules()}
        descriptions: dict[str, str] = {ROOT_POLICY: "built in: every capability on every path"}
        for name, body in table.items():
            where = f"{source}: policy {name!r}"
            if name == ROOT_POLICY:
                raise ConfigError(f"{where}: 'root' is built in and cannot be redefined")
            if not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: names are letters, digits, '.', '_', '-' (max 64)")
            if not isinstance(body, dict) or set(body) - {"description", "rules"}:
                raise ConfigError(f"{where}: expected 'description' and 'rules' only")
            description = body.get("description", "")
            if not isinstance(description, str):
                raise ConfigError(f"{where}: 'description' must be a string")
            descriptions[name] = description
            if not isinstance(body.get("rules", []), list):
                raise ConfigError(f"{where}: 'rules' must be a list of tables")
            rules = []
            for i, raw in enumerate(body.get("rules", [])):
                rwhere = f"{where} rule {i + 1}"
                if not isinstance(raw, dict) or set(raw) - {"path", "allow", "deny"}:
                    raise ConfigError(f"{rwhere}: expected keys 'path', 'allow', 'deny'")
                glob = raw.get("path")
                if not isinstance(glob, str):
                    raise ConfigError(f"{rwhere}: 'path' must be a glob string")
                allow = _capabilities(raw.get("allow"), rwhere)
                deny = _capabilities(raw.get("deny"), rwhere)
                if not allow and not deny:
                    raise ConfigError(f"{rwhere}: a rule needs 'allow' or 'deny'")
                try:
                    pattern = compile_glob(glob)
                except ConfigError as exc:  # name the file, policy and rule, as every other error does
                    raise ConfigError(f"{rwhere}: {exc.message}") from exc
                rules.append(Rule(name, i, glob, allow, deny, pattern))
            policies[name] = tuple(rules)
        return cls(policies, descriptions)

    @classmethod
    def parse(cls, data: bytes, source: str) -> PolicySet:
        """Parse a policy file's bytes, whole, or raise ``PolicyFileError`` naming ``source`` and
        the line (TOML syntax) or the policy and rule (everything else)."""
        try:
            doc = tomllib.loads(data.decode("utf-8"))
            parsed = cls.from_mapping(doc, source=source)
        except UnicodeDecodeError as exc:
            raise PolicyFileError(f"policy file {source} is not UTF-8 text (byte {exc.start})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PolicyFileError(f"policy file {source} is not valid TOML: {exc}") from exc
        except ConfigError as exc:
            raise PolicyFileError(exc.message) from exc
        return cls(parsed.policies, parsed.descriptions, "sha256:" + hashlib.sha256(data).hexdigest())

    @classmethod
    def load(cls, path: Path) -> PolicySet:
        try:
            data = path.read_bytes()  # one open of the configured path, as before (no new resolution)
        except OSError as exc:
            raise PolicyFileError(f"cannot read policy file {path}: {exc.strerror}") from exc
        return cls.parse(data, str(path))

    def names(self) -> list[str]:
        return sorted(self.policies)

    def summary(self) -> list[dict[str, Any]]:
        """Each policy's name, description and counts (``policy list``)."""
        return [{"name": name, "description": self.descriptions.get(name, ""),
                 "rules": len(rules), "paths": len({r.path for r in rules}),
                 "capabilities": sorted({c.value for r in rules for c in r.allow | r.deny})}
                for name, rules in sorted(self.policies.items())]

    def describe_policy(self, name: str) -> dict[str, Any]:
        """One policy's rules as written (``policy show``); ``NotFoundError`` if there is none."""
        rules = self.policies.get(name)
        if rules is None:
            raise NotFoundError(f"no policy named {name!r}")
        return {"name": name, "description": self.descriptions.get(name, ""),
                "rules": [{"index": r.index + 1, "path": r.path, "allow": sorted(c.value for c in r.allow),
                           "deny": sorted(c.value for c in r.deny)} for r in rules]}

    def unknown(self, names: Iterable[str]) -> list[str]:
        return sorted(set(names) - set(self.policies))

    def decide(self, policy_names: Sequence[str], capability: Capability, path: str) -> Decision:
        """The authorisation rule: deny by default, any matching deny wins over every allow."""
        allowed_by: Rule | None = None
        system = path.startswith("sys/")
        for name in policy_names:
            for rule in self.policies.get(name, ()):
                if system and not sys_rule(rule):
                    continue
                if not rule.pattern.fullmatch(path):
                    continue
                if capability in rule.deny:
                    return Decision(False, rule)
                if allowed_by is None and capability in rule.allow:
                    allowed_by = rule
        return Decision(allowed_by is not None, allowed_by)


@dataclass(frozen=True)
class ReloadResult:
    """What the last load or reload of the policy file did (status and metrics)."""

    at: datetime
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "result": "ok" if self.ok else "error", "error": self.error}


class PolicyStore:
    """The live policy set; ``reload`` swaps it atomically and keeps the old one on error."""

    def __init__(self, path: Path | None, *, events: EventBus | None = None, clock: Clock = utcnow) -> None:
        self.path = path
        self._events = events
        self._clock = clock
        self._lock = threading.Lock()
        self._current = PolicySet.load(path) if path else PolicySet.empty()
        #: When the set in force was loaded, and what the last attempt (start or reload) did.
        self.loaded_at = clock()
        self.last_reload = ReloadResult(self.loaded_at, True)

    @property
    def current(self) -> PolicySet:
        return self._current

    def reload(self, client: str = "system") -> PolicySet:
        """The one reload path (SIGHUP and ``POST /v1/sys/policy/reload``): parse the whole file,
        then swap. On any error nothing changes (all or nothing: a file that fails half-way never
        widens access), the failure is logged, kept for status and metrics, emitted as a failed
        ``policy.reload`` event, and raised as ``PolicyFileError``."""
        now = self._clock()
        try:
            new = PolicySet.load(self.path) if self.path is not None else self._current
        except PolicyFileError as exc:
            self.last_reload = ReloadResult(now, False, exc.message)
            log.error("policy reload failed, keeping the previous policies: %s", exc)
            self._emit(client, now, {"outcome": "failed"})
            raise
        with self._lock:
            self._current = new
            self.loaded_at = now
            self.last_reload = ReloadResult(now, True)
        log.info("policies reloaded from %s: %s", self.path, ", ".join(new.names()))
        self._emit(client, now, {"policies": new.names()})
        return new

    def _emit(self, client: str, at: datetime, detail: dict[str, Any]) -> None:
        if self._events is not None:
            self._events.emit(Event("policy.reload", at, client, detail=detail))

    def status(self) -> dict[str, Any]:
        """The policy part of ``/v1/sys/status``."""
        current = self._current
        return {"file": None if self.path is None else str(self.path), "digest": current.digest,
                "policies": len(current.policies), "loaded_at": self.loaded_at.isoformat(),
                "last_reload": self.last_reload.to_dict()}
