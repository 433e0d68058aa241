"""Run the daemon: listen, reload policies on SIGHUP, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
from collections.abc import Callable
from types import FrameType
from typing import Any

from aiohttp import web

from secretsd.addresses import is_loopback
from secretsd.api.app import create_app, create_metrics_app
from secretsd.auth.jwt import JwtLogin
from secretsd.auth.jwt import parse_rules as parse_jwt_rules
from secretsd.auth.tls import TlsAuthenticator, client_verification
from secretsd.auth.tls import parse_rules as parse_tls_rules
from secretsd.auth.unix import UnixAuthenticator
from secretsd.errors import ConfigError, PolicyFileError
from secretsd.runtime.config import Settings, parse_listen
from secretsd.runtime.daemon import Daemon
from secretsd.runtime.edge import Edge, EdgeCollector
from secretsd.runtime.edge_listener import EdgeSite
from secretsd.runtime.edge_log import BoundedLog, install_log_scrubbing, loop_exception_handler
from secretsd.runtime.logs import access_log
from secretsd.runtime.unix_listener import UnixEdgeSite, parse_mode, reload_unix_rules, resolve_group

log = logging.getLogger("secretsd")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None; refuses plaintext off loopback unless explicitly allowed."""
    if settings.tcp_listen is None:
        return None  # the Unix socket alone: nothing crosses a network
    host, _ = parse_listen(settings.tcp_listen)
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if (cert is None) != (key is None):
        raise ConfigError("set both tls_cert_file and tls_key_file, or neither")
    clients = settings.auth.tls
    if clients.client_ca_file is not None and cert is None:
        raise ConfigError("[auth.tls] client_ca_file needs the TLS listener: set tls_cert_file and tls_key_file")
    if cert is None or key is None:
        if not is_loopback(host) and not settings.allow_plaintext:
            raise ConfigError(
                f"refusing to listen on {settings.listen} without TLS: tokens would cross the network "
                "in clear. Set tls_cert_file and tls_key_file, or allow_plaintext = true if a proxy "
                "or sidecar terminates TLS for this daemon"
            )
        return None
    if clients.client_ca_file is None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    else:
        # Not create_default_context: it would trust the system's CAs for client certificates too.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client_verification(context, client_ca_file=clients.client_ca_file,
                            require=clients.require_client_cert, crl_file=clients.crl_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    return context


def _reload_tls(settings: Settings, site: EdgeSite) -> None:
    """SIGHUP: the TLS context built again from its files (the CRL above all, the client CA bundle and
    the server certificate too) for connections accepted from now on. A file that no longer loads
    keeps the context in force, and says why."""
    try:
        context = tls_context(settings)
    except ConfigError as exc:
        log.error("TLS files not reloaded, the previous ones stay in force: %s", exc)
        return
    closed = site.replace_ssl_context(context)
    log.info("TLS context reloaded (client CA, CRL, server certificate); %d connections of client "
             "certificates closed, to meet the new files when they reconnect", closed)


async def serve(settings: Settings, *, on_ready: str | None = None, worker: int | None = None,
                reload_settings: Callable[[], Settings] | None = None) -> None:
    """Serve until SIGTERM or SIGINT. ``on_ready`` is printed to stdout once listening.

    ``reload_settings``: how to read the configuration again on SIGHUP (the ``[[auth.unix.rules]]``
    are taken from it); None: they stay as they started.

    ``worker``: this process is worker N of ``serve --workers``; the workers share the listening
    port (SO_REUSEPORT) and only worker 0 serves the separate metrics listener.

    Each resource registers its own cleanup on one exit stack as soon as it exists, so a failure
    at any step (or the normal stop) unwinds exactly what was set up, newest first: metrics
    listener, main listener, daemon, and last the signal handlers.
    """
    context = tls_context(settings)
    edge = _edge(settings)
    async with contextlib.AsyncExitStack() as stack:
        # Entered first so that it is left last: the handlers stay in force until the daemon has
        # stopped (a second SIGTERM while stopping is a no-op; a SIGHUP the workers' supervisor
        # forwards to a stopping worker must not kill it with the default action).
        signals = stack.enter_context(SignalHandlers(asyncio.get_running_loop()))
        daemon = await _start_daemon(stack, settings, edge, worker)
        login = JwtLogin.from_settings(settings.auth.jwt)
        if login is not None:
            await login.keys.start()  # a jwks_file that does not load stops the start (ConfigError)
            stack.push_async_callback(login.keys.stop)
        where, tcp_site = await _listen_main(stack, settings, daemon, edge, context, reuse_port=worker is not None,
                                             jwt_login=login)
        if settings.metrics.enabled and settings.metrics.listen and not worker:
            await _listen_metrics(stack, settings.metrics.listen, daemon, edge)
        stop = _install_signal_handlers(signals, daemon)
        reloads: list[Callable[[], object]] = [functools.partial(_reload_policies, daemon)]
        if context is not None and tcp_site is not None:
            reloads.append(functools.partial(_reload_tls, settings, tcp_site))
        unix = daemon.authenticators.member("unix")
        if isinstance(unix, UnixAuthenticator) and reload_settings is not None:
            reloads.append(functools.partial(reload_unix_rules, unix, reload_settings))
        tls_rules = daemon.authenticators.member("tls")
        if isinstance(tls_rules, TlsAuthenticator) and reload_settings is not None:
            reloads.append(functools.partial(_reload_tls_rules, tls_rules, reload_settings))
        if login is not None and reload_settings is not None:
            reloads.append(functools.partial(_reload_jwt_rules, login, reload_settings))
        if len(reloads) > 1:
            signals.install(signal.SIGHUP, functools.partial(_reload_all, reloads))
        log.info("listening on %s (%s; at most %d connections)", " and ".join(where),
                 "sealed" if daemon.barrier.sealed else "unsealed", edge.cap)
        if on_ready:
            print(on_ready, flush=True)
        await _wait(stop)


def _edge(settings: Settings) -> Edge:
    """The HTTP edge, and the logging guards that must be in place before anything can fail: no log
    line quotes what a peer sent, and what a peer can make happen over and over (accept failures,
    malformed requests) is logged at a bounded rate."""
    bounded = BoundedLog(settings.http.error_log_interval_seconds)
    install_log_scrubbing()
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
    vault = settings.vault
    return Edge(settings.http, bounded=bounded,
                list_prefix=f"/v1/{vault.kv_mount}/metadata".encode() if vault.enabled else None)


async def _start_daemon(stack: contextlib.AsyncExitStack, settings: Settings, edge: Edge,
                        worker: int | None) -> Daemon:
    daemon = Daemon(settings, worker=worker)
    await daemon.start()  # a failed start cleans up after itself
    stack.push_async_callback(daemon.stop)
    daemon.metrics.registry.register(EdgeCollector(edge))
    return daemon


async def _runner(stack: contextlib.AsyncExitStack, app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)  # also stops the runner's sites
    return runner


async def _listen_main(stack: contextlib.AsyncExitStack, settings: Settings, daemon: Daemon, edge: Edge,
                       context: ssl.SSLContext | None, *, reuse_port: bool,
                       jwt_login: JwtLogin | None = None) -> tuple[list[str], EdgeSite | None]:
    """The API on TCP ``listen`` and/or the Unix socket ``listen_unix`` (one app, one edge); their URLs
    and the TCP site (its TLS context is replaced on SIGHUP)."""
    requests_log = access_log(settings.log_level, settings.log_format)
    runner = await _runner(stack, create_app(daemon, access_log=requests_log, jwt_login=jwt_login,
                                             vault_mount=settings.vault.kv_mount if settings.vault.enabled else None))
    where = []
    tcp_site = None
    if settings.tcp_listen is not None:
        host, port = parse_listen(settings.tcp_listen)
        tcp_site = EdgeSite(runner, host, port, edge, ssl_context=context, reuse_port=reuse_port)
        try:
            await tcp_site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {settings.listen}: {exc.strerror}") from exc
        where.append(f"{'https' if context else 'http'}://{host}:{port}")
    if settings.listen_unix is not None:
        if reuse_port:
            # One path cannot be bound by N processes (docs/auth.md); `serve` refuses it earlier.
            raise ConfigError("listen_unix cannot be combined with serve --workers")
        site = UnixEdgeSite(runner, settings.listen_unix, edge, mode=parse_mode(settings.unix_socket_mode),
                            gid=resolve_group(settings.unix_socket_group))
        await site.start()  # runner.cleanup stops it (and removes its file)
        where.append(site.name)
    if not where:
        raise ConfigError('listen = "none" needs listen_unix: there would be nothing to serve on')
    return where, tcp_site


async def _listen_metrics(stack: contextlib.AsyncExitStack, listen: str, daemon: Daemon, edge: Edge) -> None:
    """The separate, unauthenticated metrics listener (worker 0 only)."""
    runner = await _runner(stack, create_metrics_app(daemon))
    m_host, m_port = parse_listen(listen)
    try:
        await EdgeSite(runner, m_host, m_port, edge).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen} for metrics: {exc.strerror}") from exc
    log.info("metrics on http://%s:%d/metrics (unauthenticated)", m_host, m_port)
    if not is_loopback(m_host):
        log.warning("the metrics listener %s is reachable from the network without authentication; "
                    "metrics hold no secrets, but firewall it to your monitoring hosts", listen)


# What signal.getsignal returns: a Python handler, SIG_DFL/SIG_IGN, or None (set outside Python).
_Disposition = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SignalHandlers:
    """Signal handlers on the event loop that, when the context is left, are removed again and the
    dispositions they replaced restored (the loop's own removal would reset SIGHUP to "terminate",
    which ``secretsd serve`` ignores until its handler is in place)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous: dict[signal.Signals, _Disposition] = {}

    def install(self, signum: signal.Signals, callback: Callable[[], object]) -> None:
        self._previous.setdefault(signum, signal.getsignal(signum))
        self._loop.add_signal_handler(signum, callback)

    def __enter__(self) -> SignalHandlers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            self._loop.remove_signal_handler(signum)
            if previous is not None:  # None: installed outside Python, nothing to restore
                signal.signal(signum, previous)
        self._previous.clear()


def _install_signal_handlers(signals: SignalHandlers, daemon: Daemon) -> asyncio.Event:
    """SIGHUP reloads the policies; SIGTERM and SIGINT set the returned event (stop)."""
    stop = asyncio.Event()
    signals.install(signal.SIGHUP, functools.partial(_reload_policies, daemon))
    signals.install(signal.SIGTERM, stop.set)
    signals.install(signal.SIGINT, stop.set)
    return stop


def _reload_tls_rules(authenticator: TlsAuthenticator, load: Callable[[], Settings]) -> None:
    """SIGHUP: the ``[[auth.tls.rules]]`` read again; a configuration that no longer loads, or rules
    that do not parse, keep the rules in force (logged)."""
    try:
        specs = load().authenticator_specs()
        rules = parse_tls_rules(next((s.get("rules", []) for s in specs if s["method"] == "tls"), []))
    except ConfigError as exc:
        log.error("tls rules not reloaded, the previous ones stay in force: %s", exc)
        return
    authenticator.replace_rules(rules)
    log.info("tls rules reloaded (%d rules)", len(rules))


def _reload_jwt_rules(login: JwtLogin, load: Callable[[], Settings]) -> None:
    """SIGHUP: the ``[[auth.jwt.rules]]`` read again (the JWKS follows its own refresh interval)."""
    try:
        rules = parse_jwt_rules(load().auth.jwt.rules)
    except ConfigError as exc:
        log.error("jwt rules not reloaded, the previous ones stay in force: %s", exc)
        return
    login.replace_rules(rules)
    log.info("jwt rules reloaded (%d rules)", len(rules))


def _reload_all(reloads: list[Callable[[], object]]) -> None:
    """SIGHUP: the policies, then the TLS files (on a TLS listener), then the unix rules (with
    ``listen_unix``); each one that fails keeps what is in force and says why."""
    for reload in reloads:
        reload()


def _reload_policies(daemon: Daemon) -> None:
    # The same path as POST /v1/sys/policy/reload: PolicyStore.reload logs a failure, keeps it for
    # status and metrics and emits the policy.reload event (audited as client "system").
    with contextlib.suppress(PolicyFileError):
        daemon.policies.reload()


async def _wait(stop: asyncio.Event) -> None:
    try:
        await stop.wait()
    finally:  # then the exit stack stops the listeners and the daemon
        log.info("shutting down")
