"""``serve``'s and ``Daemon``'s lifecycles, in process: every way out unwinds exactly what was set up.

The daemon is real (a SQLite store in a temp dir, the file provider), so "stopped" is observable
from outside: the audit log's lock and the listening ports are free again, and a second daemon
on the same store opens its audit log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretsd.errors import AuditError, ConfigError, StorageUnavailableError
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from secretsd.runtime.server import SignalHandlers, serve
from tests.helpers import free_port

HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


@pytest.fixture
def sighup_ignored() -> Iterator[None]:
    """What `secretsd serve` sets before the loop runs (SIGHUP ignored); put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in HANDLED}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def dispositions() -> dict[signal.Signals, object]:
    return {sig: signal.getsignal(sig) for sig in HANDLED}


async def _settings(tmp_path: Path, **overrides: object) -> Settings:
    settings = load_settings(None, data_dir=tmp_path / "data", listen=f"127.0.0.1:{free_port()}", **overrides)
    await initialize_store(settings)
    return settings


async def assert_daemon_stopped(settings: Settings) -> None:
    """The previous daemon let go of the store and its audit log: a new one opens both."""
    fresh = Daemon(settings)
    await fresh.start()
    try:
        assert fresh.audit is not None and not fresh.barrier.sealed
    finally:
        await fresh.stop()


def assert_port_free(listen: str) -> None:
    host, port = listen.rsplit(":", 1)
    with socket.socket() as s:
        s.bind((host, int(port)))


async def test_stopping_removes_the_signal_handlers_and_restores_what_they_replaced(
        tmp_path: Path, sighup_ignored: None) -> None:
    before = dispositions()
    settings = await _settings(tmp_path, metrics={"listen": f"127.0.0.1:{free_port()}"})
    task = asyncio.create_task(serve(settings))
    host, port = settings.listen.rsplit(":", 1)
    for _ in range(200):  # listening means the handlers are in place (installed before yielding again)
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        break
    assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 30)
    for sig in HANDLED:  # SIGHUP back to ignored, not reset to "terminate"
        assert signal.getsignal(sig) is before[sig], sig
    assert_port_free(settings.listen)
    assert settings.metrics.listen is not None
    assert_port_free(settings.metrics.listen)
    await assert_daemon_stopped(settings)


async def test_a_main_listener_that_cannot_bind_stops_the_daemon(
        tmp_path: Path, sighup_ignored: None) -> None:
    before = dispositions()
    settings = await _settings(tmp_path)
    host, port = settings.listen.rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        with pytest.raises(ConfigError, match=f"cannot listen on {settings.listen}: "):
            await serve(settings)
    for sig in HANDLED:
        assert signal.getsignal(sig) is before[sig], sig
    await assert_daemon_stopped(settings)


async def test_a_metrics_listener_that_cannot_bind_unwinds_the_main_listener_and_the_daemon(
        tmp_path: Path, sighup_ignored: None) -> None:
    before = dispositions()
    metrics = f"127.0.0.1:{free_port()}"
    settings = await _settings(tmp_path, metrics={"listen": metrics})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(metrics.rsplit(":", 1)[1])))
        taken.listen()
        with pytest.raises(ConfigError, match=f"cannot listen on {metrics} for metrics: "):
            await serve(settings)
    assert_port_free(settings.listen)
    for sig in HANDLED:
        assert signal.getsignal(sig) is before[sig], sig
    await assert_daemon_stopped(settings)


async def test_signal_handlers_restore_the_previous_disposition_once(
        sighup_ignored: None) -> None:
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    with SignalHandlers(loop) as signals:
        signals.install(signal.SIGHUP, lambda: calls.append("first"))
        signals.install(signal.SIGHUP, lambda: calls.append("second"))  # replaces; the original is kept
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
    assert calls == ["second"]
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


async def test_a_daemon_whose_start_fails_forgets_its_keys_and_closes_the_store(tmp_path: Path) -> None:
    settings = await _settings(tmp_path)
    first = Daemon(settings)
    await first.start()
    try:
        # Same configured audit chain: its log is locked by the first (an unconfigured chain would
        # derive a free one and start: tests/test_audit_chains.py).
        second = Daemon(settings.model_copy(update={"audit": settings.audit.model_copy(update={"chain": "main"})}))
        with pytest.raises(AuditError, match="another process is writing the audit log"):
            await second.start()
        assert second.barrier.sealed  # unsealed before the audit log failed; the keys are gone
        with pytest.raises(StorageUnavailableError, match="not open"):  # the store was closed
            await second.storage.ping()
        await second.stop()  # nothing left to undo
    finally:
        await first.stop()
    await assert_daemon_stopped(settings)


async def test_stopping_a_daemon_twice_undoes_its_start_once(tmp_path: Path) -> None:
    settings = await _settings(tmp_path)
    daemon = Daemon(settings)
    await daemon.start()
    tasks = list(daemon._tasks)
    await daemon.stop()
    assert tasks and all(task.done() for task in tasks) and daemon.barrier.sealed
    await daemon.stop()
    await assert_daemon_stopped(settings)
