"""Prometheus metrics. Labels are route templates, operations and outcomes: never a path or a value.

Hot-path counts (encryptions, decryptions, audit records) are plain integers kept by their owners
and read at scrape time by a collector, so a request pays nothing for metrics it does not touch.
Each daemon has a registry of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keyproviders import KeyProvider, ProviderHealth, WrappedKey
from secretsd.events import Event

if TYPE_CHECKING:
    from secretsd.runtime.daemon import Daemon

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SECRET_EVENTS = {
    "secret.read": "read", "secret.delete": "deleted", "secret.destroy": "destroyed",
    "secret.undelete": "undeleted", "rotation.succeeded": "rotated",
}


class Metrics:
    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "secretsd_http_requests", "HTTP requests by route template, method and status class",
            ["route", "method", "status_class"], registry=r)
        self.http_duration = Histogram(
            "secretsd_http_request_duration_seconds", "Time to answer a request, audit included",
            ["route", "method"], buckets=_LATENCY, registry=r)
        self.secret_ops = Counter(
            "secretsd_secret_operations", "Secret operations: created, updated, read, rotated, deleted...",
            ["operation"], registry=r)
        self.policy_decisions = Counter(
            "secretsd_policy_decisions", "Authorisation decisions", ["decision"], registry=r)
        self.rotations = Counter(
            "secretsd_rotations", "Secret rotations by outcome", ["outcome"], registry=r)
        self.tokens_purged = Counter(
            "secretsd_tokens_purged", "Token rows deleted by the purge ([tokens] purge_after_days)", registry=r)
        self.token_purge_runs = Counter(
            "secretsd_token_purge_runs", "Token purge sweeps run by the leader", registry=r)
        self.provider_seconds = Histogram(
            "secretsd_key_provider_operation_seconds", "Key provider call latency",
            ["provider", "operation"], buckets=_LATENCY, registry=r)
        self.audit_fsync = Histogram(
            "secretsd_audit_fsync_seconds", "Time to write and fsync one audit batch", buckets=_LATENCY,
            registry=r)
        self.audit_batch = Histogram(
            "secretsd_audit_batch_records", "Records per audit batch (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        # labels() takes a lock and builds a key per call: the children of the hot counters are kept.
        self._secret_op = {op: self.secret_ops.labels(op) for op in ("created", "updated", *_SECRET_EVENTS.values())}
        self._allowed = self.policy_decisions.labels("allow")
        self._denied = self.policy_decisions.labels("deny")
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.gauges: dict[str, float] = {"secrets": 0, "tokens": 0}
        r.register(_StateCollector(daemon, self.gauges))

    def on_event(self, event: Event) -> None:
        if event.action == "secret.write":
            self._secret_op["created" if event.version == 1 else "updated"].inc()
        elif event.action in _SECRET_EVENTS:
            self._secret_op[_SECRET_EVENTS[event.action]].inc()
        if event.action.startswith("rotation."):
            self.rotations.labels(event.action.removeprefix("rotation.")).inc()
        elif event.action == "token.purge":
            self.token_purge_runs.inc()
            self.tokens_purged.inc(int(event.detail.get("count", 0)))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # labels() takes a lock and builds a key on every call; the children are kept here instead.
        key = (route, method, status // 100)
        children = self._request_children.get(key)
        if children is None:
            children = (self.http_requests.labels(route, method, f"{status // 100}xx"),
                        self.http_duration.labels(route, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def policy_decision(self, allowed: bool) -> None:
        (self._allowed if allowed else self._denied).inc()

    def observe_audit_batch(self, records: int, seconds: float) -> None:
        self.audit_batch.observe(records)
        self.audit_fsync.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Read at scrape time from the parts that own the numbers."""

    def __init__(self, daemon: Daemon, gauges: dict[str, float]) -> None:
        self._d = daemon
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        d = self._d
        barrier = d.barrier
        yield GaugeMetricFamily("secretsd_sealed", "1 while the keyring is sealed", value=int(barrier.sealed))
        states = d.providers.states()
        up = GaugeMetricFamily("secretsd_key_provider_up", "1 if the provider is usable",
                               labels=["provider", "role"])
        for index, state in enumerate(states):
            # The role keeps two providers of one kind (file + file recovery) apart.
            up.add_metric([state.kind, "primary" if index == 0 else f"recovery-{index}"], int(state.ok))
        yield up
        yield GaugeMetricFamily("secretsd_keyring_active_term", "The keyring term new values are sealed with",
                                value=barrier.active_term or 0)
        if not barrier.sealed and barrier.active_term is not None:
            yield GaugeMetricFamily("secretsd_keyring_term_encryptions",
                                    "Encryptions under the active term (retired well before 2^32)",
                                    value=barrier.encryptions(barrier.active_term))
        yield CounterMetricFamily("secretsd_encrypt_operations", "Values sealed", value=barrier.seal_count)
        yield CounterMetricFamily("secretsd_decrypt_operations", "Values opened", value=barrier.open_count)
        yield CounterMetricFamily("secretsd_crypto_errors", "Values that failed to open (tampering?)",
                                  value=barrier.crypto_errors)
        audit = d.audit
        yield CounterMetricFamily("secretsd_audit_records", "Audit records written",
                                  value=audit.records_written if audit else 0)
        yield CounterMetricFamily("secretsd_audit_errors", "Audit records that could not be written",
                                  value=audit.errors if audit else 0)
        yield CounterMetricFamily("secretsd_audit_auth_failures_summarised",
                                  "Requests that failed authentication beyond their budget: counted in an "
                                  "auth.failures summary record instead of a record of their own",
                                  value=audit.failures_summarised if audit else 0)
        yield from _policy_metrics(d)
        yield _auth_metrics(d)
        yield from _backup_metrics(d)
        yield GaugeMetricFamily("secretsd_secrets", "Secrets stored", value=self._gauges["secrets"])
        yield GaugeMetricFamily("secretsd_tokens", "Active tokens", value=self._gauges["tokens"])


def _backup_metrics(d: Daemon) -> Iterator[Metric]:
    """Scheduled backups ([backup]): the last success and failure (0: none yet), size, failures."""
    sched = d.backup_schedule
    ok, bad = sched.last_success, sched.last_failure
    yield GaugeMetricFamily("secretsd_backup_last_success_timestamp_seconds",
                            "When the last scheduled backup was written (0: none since start)",
                            value=ok.at.timestamp() if ok else 0)
    yield GaugeMetricFamily("secretsd_backup_last_failure_timestamp_seconds",
                            "When a scheduled backup last failed (0: none since start)",
                            value=bad.at.timestamp() if bad else 0)
    yield GaugeMetricFamily("secretsd_backup_last_size_bytes", "Size of the last scheduled backup file",
                            value=(ok.size or 0) if ok else 0)
    yield CounterMetricFamily("secretsd_backup_failures", "Scheduled backups that failed", value=sched.failures)


def _auth_metrics(d: Daemon) -> Metric:
    """Authentications per method (token, unix, ... ; "none": nothing recognised) and outcome."""
    family = CounterMetricFamily("secretsd_auth_attempts", "Requests authenticated (success) or refused "
                                 "(failure), by the method that decided", labels=["method", "outcome"])
    # Login methods (jwt) are no members, but count under their own name too.
    counts = d.authenticators.counts
    for method in dict.fromkeys((*d.authenticators.methods, *(m for m, _ in counts), "jwt", "none")):
        for outcome in ("success", "failure"):
            family.add_metric([method, outcome], counts.get((method, outcome), 0))
    return family


def _policy_metrics(d: Daemon) -> Iterator[Metric]:
    """The policy file in force and the last reload (SIGHUP or POST /v1/sys/policy/reload)."""
    store = d.policies
    info = GaugeMetricFamily("secretsd_policy_info", "1, labelled with the SHA-256 digest of the policy "
                             "file in force ('' when there is none: root only)", labels=["digest"])
    info.add_metric([store.current.digest or ""], 1)
    yield info
    yield GaugeMetricFamily("secretsd_policies", "Policies loaded, root included", value=len(store.current.policies))
    yield GaugeMetricFamily("secretsd_policy_loaded_timestamp_seconds", "When the policies in force were loaded",
                            value=store.loaded_at.timestamp())
    last = store.last_reload
    yield GaugeMetricFamily("secretsd_policy_reload_success", "1 if the last load or reload of the policy "
                            "file succeeded, 0 if it was refused (the previous policies stay)", value=int(last.ok))
    yield GaugeMetricFamily("secretsd_policy_last_reload_timestamp_seconds",
                            "When the policy file was last loaded or reloaded, successfully or not",
                            value=last.at.timestamp())


class TimedProvider:
    """A key provider that reports each call's latency; everything else passes through."""

    def __init__(self, inner: KeyProvider, observe: Callable[[str, str, float], None]) -> None:
        self._inner = inner
        self._observe = observe
        self.name = inner.name

    def _timed(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._observe(self.name, operation, time.perf_counter() - started)

    def key_id(self) -> str:
        return self._inner.key_id()

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        result: WrappedKey = self._timed("wrap", self._inner.wrap, key, aad)
        return result

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        result: bytes = self._timed("unwrap", self._inner.unwrap, wrapped, aad)
        return result

    def health(self) -> ProviderHealth:
        result: ProviderHealth = self._timed("health", self._inner.health)
        return result

    def rotate(self) -> str:
        result: str = self._timed("rotate", self._inner.rotate)
        return result

    def refresh(self) -> None:
        self._timed("refresh", self._inner.refresh)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # Provider-specific extras (kek_attributes, options...) stay reachable.
        return getattr(self._inner, name)
