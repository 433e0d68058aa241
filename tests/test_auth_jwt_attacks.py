"""Attacks on workload JWT login (issue 13 item 3, the holes an attacker found): a signed token with an
absurd ``exp``, a JWKS URL that redirects to plain http or is not https at all, and a JWKS server that
drips its answer to hold the daemon's threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from secretsd.addresses import check_jwks_url
from secretsd.auth.jwt import MAX_EXP, JwksCache, token_expiry
from secretsd.errors import ConfigError, UnauthenticatedError
from secretsd.runtime.config import load_settings
from tests.helpers import free_port
from tests.test_auth_jwt import JWKS, _login, claims, sign


# -- H7: exp out of range or not an integer -------------------------------------------------------
@pytest.mark.parametrize("exp", [10**18, MAX_EXP + 1, 2**63, "9999999999", 1e12, True, 0, -5])
async def test_rule_exp_is_an_integer_within_range(tmp_path: Path, exp: Any) -> None:
    login = await _login(tmp_path)
    with pytest.raises(UnauthenticatedError) as caught:
        login.verify(sign(claims(exp=exp)))  # validly signed by the issuer's key
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    with pytest.raises(ValueError):
        token_expiry({"exp": exp})
    assert token_expiry({"exp": MAX_EXP}).year == 9999


# -- H5: the JWKS only over https -----------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://idp.example/jwks", "http://10.0.0.1/jwks", "ftp://idp.example/jwks",
                                 "https:///jwks", "http://localhost.evil.example/jwks"])
def test_rule_jwks_url_is_https(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError):
        check_jwks_url(url)
    with pytest.raises(ConfigError, match="https"):
        JwksCache(file=None, url=url)
    config = tmp_path / "secretsd.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n[auth.jwt]\njwks_url = "{url}"\nissuer = "i"\naudiences = ["a"]\n')
    with pytest.raises(ConfigError, match="https"):
        load_settings(config)


@pytest.mark.parametrize("url", ["https://idp.example/jwks", "http://127.0.0.1:8080/jwks", "http://localhost/j",
                                 "http://[::1]:9/jwks"])
def test_https_or_loopback_jwks_urls_are_accepted(url: str) -> None:
    assert check_jwks_url(url) == url


async def test_a_jwks_redirect_is_not_followed() -> None:
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/plain")

    async def plain(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response(JWKS)

    app = web.Application()
    app.router.add_get("/jwks", redirect)
    app.router.add_get("/plain", plain)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        keys = JwksCache(file=None, url=f"http://127.0.0.1:{port}/jwks", timeout=2)
        with pytest.raises(OSError, match="redirect"):
            await keys.refresh()
        await keys.stop()
        assert hits == []
        with pytest.raises(UnauthenticatedError):
            keys.key("rsa1")
    finally:
        await runner.cleanup()


# -- H4: a dripping JWKS server -------------------------------------------------------------------
@pytest.fixture
def dripping_url() -> Iterator[str]:
    """An HTTP server that promises 100 MB and sends one byte every 0.1 s, forever."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b" ")
                    time.sleep(0.1)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/jwks"
    stop.set()
    server.close()


async def test_a_dripping_jwks_url_never_holds_the_shared_thread_pool(dripping_url: str) -> None:
    loop = asyncio.get_running_loop()
    # A shared pool of one thread: any JWKS read left running in it starves everything else.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    keys = JwksCache(file=None, url=dripping_url, timeout=0.5, refresh=60, max_stale=60)
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(OSError):
                await keys.refresh()
            assert time.monotonic() - started < 2
            # The read ends by its deadline, not when the server stops dripping.
            for _ in range(40):
                if not keys.reading:
                    break
                await asyncio.sleep(0.05)
            assert not keys.reading
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 1), timeout=2) == 1
        assert await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 80), timeout=2)
    finally:
        await keys.stop()


async def test_no_second_jwks_read_while_one_runs(dripping_url: str) -> None:
    keys = JwksCache(file=None, url=dripping_url, timeout=1.0, refresh=60, max_stale=60)
    first = asyncio.get_running_loop().create_task(keys.refresh())
    await asyncio.sleep(0.2)
    assert keys.reading
    with pytest.raises(OSError, match="still running"):
        await keys.refresh()
    with pytest.raises(OSError):
        await first
    await keys.stop()
