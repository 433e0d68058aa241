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
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secretsd.errors import ConfigError, RequestError

log = logging.getLogger("secretsd.domain.policy")

ROOT_POLICY = "root"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
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
        for name, body in table.items():
            where = f"{source}: policy {name!r}"
            if name == ROOT_POLICY:
                raise ConfigError(f"{where}: 'root' is built in and cannot be redefined")
            if not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: names are letters, digits, '.', '_', '-' (max 64)")
            if not isinstance(body, dict) or set(body) - {"description", "rules"}:
                raise ConfigError(f"{where}: expected 'description' and 'rules' only")
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
                rules.append(Rule(name, i, glob, allow, deny, compile_glob(glob)))
            policies[name] = tuple(rules)
        return cls(policies)

    @classmethod
    def load(cls, path: Path) -> PolicySet:
        try:
            doc = tomllib.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"policy file {path} is not valid TOML: {exc}") from exc
        return cls.from_mapping(doc, source=str(path))

    def names(self) -> list[str]:
        return sorted(self.policies)

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


class PolicyStore:
    """The live policy set; ``reload`` swaps it atomically and keeps the old one on error."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._current = PolicySet.load(path) if path else PolicySet.empty()

    @property
    def current(self) -> PolicySet:
        return self._current

    def reload(self) -> PolicySet:
        """Re-read the file; raise ``ConfigError`` (keeping the old set) if it is invalid."""
        if self.path is None:
            return self._current
        new = PolicySet.load(self.path)
        with self._lock:
            self._current = new
        log.info("policies reloaded from %s: %s", self.path, ", ".join(new.names()))
        return new
