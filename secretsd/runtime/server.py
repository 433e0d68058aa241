"""Run the daemon: listen, reload policies on SIGHUP, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from aiohttp import web

from secretsd.addresses import is_loopback
from secretsd.api.app import create_app, create_metrics_app
from secretsd.errors import ConfigError
from secretsd.events import Event
from secretsd.runtime.config import Settings, parse_listen
from secretsd.runtime.daemon import Daemon
from secretsd.runtime.edge import Edge, EdgeCollector
from secretsd.runtime.edge_listener import EdgeSite
from secretsd.runtime.edge_log import BoundedLog, install_log_scrubbing, loop_exception_handler

log = logging.getLogger("secretsd")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None; refuses plaintext off loopback unless explicitly allowed."""
    host, _ = parse_listen(settings.listen)
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if (cert is None) != (key is None):
        raise ConfigError("set both tls_cert_file and tls_key_file, or neither")
    if cert is None or key is None:
        if not is_loopback(host) and not settings.allow_plaintext:
            raise ConfigError(
                f"refusing to listen on {settings.listen} without TLS: tokens would cross the network "
                "in clear. Set tls_cert_file and tls_key_file, or allow_plaintext = true if a proxy "
                "or sidecar terminates TLS for this daemon"
            )
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    return context


async def serve(settings: Settings, *, on_ready: str | None = None, worker: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT. ``on_ready`` is printed to stdout once listening.

    ``worker``: this process is worker N of ``serve --workers``; the workers share the listening
    port (SO_REUSEPORT) and only worker 0 serves the separate metrics listener.
    """
    context = tls_context(settings)
    # Before anything can fail: no log line quotes what a peer sent, and what a peer can make
    # happen over and over (accept failures, malformed requests) is logged at a bounded rate.
    bounded = BoundedLog(settings.http.error_log_interval_seconds)
    install_log_scrubbing()
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
    edge = Edge(settings.http, bounded=bounded)
    daemon = Daemon(settings)
    await daemon.start()
    daemon.metrics.registry.register(EdgeCollector(edge))
    runner = web.AppRunner(create_app(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_listen(settings.listen)
    try:
        site = EdgeSite(runner, host, port, edge, ssl_context=context, reuse_port=worker is not None)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await daemon.stop()
        raise ConfigError(f"cannot listen on {settings.listen}: {exc.strerror}") from exc

    metrics_runner = None
    if settings.metrics.enabled and settings.metrics.listen and not worker:
        metrics_runner = web.AppRunner(create_metrics_app(daemon), access_log=None, handle_signals=False)
        await metrics_runner.setup()
        m_host, m_port = parse_listen(settings.metrics.listen)
        try:
            await EdgeSite(metrics_runner, m_host, m_port, edge).start()
        except OSError as exc:
            await metrics_runner.cleanup()
            await runner.cleanup()
            await daemon.stop()
            raise ConfigError(f"cannot listen on {settings.metrics.listen} for metrics: {exc.strerror}") from exc
        log.info("metrics on http://%s:%d/metrics (unauthenticated)", m_host, m_port)
        if not is_loopback(m_host):
            log.warning("the metrics listener %s is reachable from the network without authentication; "
                        "metrics hold no secrets, but firewall it to your monitoring hosts", settings.metrics.listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reload_policies() -> None:
        try:
            policies = daemon.policies.reload()
        except ConfigError as exc:
            log.error("policy reload failed, keeping the previous policies: %s", exc)
            daemon.events.emit(Event("policy.reload", daemon.clock(), "system", detail={"outcome": "failed"}))
            return
        daemon.events.emit(Event("policy.reload", daemon.clock(), "system",
                                 detail={"policies": policies.names()}))

    loop.add_signal_handler(signal.SIGHUP, reload_policies)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    scheme = "https" if context else "http"
    log.info("listening on %s://%s:%d (%s; at most %d connections)", scheme, host, port,
             "sealed" if daemon.barrier.sealed else "unsealed", edge.cap)
    if on_ready:
        print(on_ready, flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        await daemon.stop()
