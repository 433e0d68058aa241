from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from secretsd.api.app import create_app
from secretsd.runtime.config import Settings, load_settings
from secretsd.runtime.daemon import Daemon, initialize_store
from secretsd.storage.sqlite import SQLiteStorage
from secretsd.storage.testing import initialized
from tests.helpers import DaemonProcess, init_store

# The light client distribution's source, client/, ahead of any installed copy, for this process
# (pyproject's pytest pythonpath) and every process the tests start (daemons, CLI runs):
# `pip install -e '.[test]'` installs jarvis-secretsd-client from client/ as a copy (pip installs a
# dependency's direct URL non-editable, and even replaces an editable install of it), so without this
# an edit to client/secretsd_client would reach neither the tests nor the daemons until a reinstall.
CLIENT_SOURCE = str(Path(__file__).resolve().parents[1] / "client")
if CLIENT_SOURCE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [CLIENT_SOURCE, os.environ.get("PYTHONPATH")]))


def pytest_configure(config: pytest.Config) -> None:
    # The SoftHSM2 fixtures come from the installed package's pytest11 entry point, as they do for our
    # users (loading softhsm.pytest_plugin here as well would register it twice).
    if not config.pluginmanager.has_plugin("secretsd-softhsm"):
        raise pytest.UsageError(
            "the secretsd-softhsm pytest plugin is not loaded: install this checkout with "
            "pip install -e '.[test]' (and do not set PYTEST_DISABLE_PLUGIN_AUTOLOAD)"
        )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return load_settings(None, data_dir=data_dir)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    """An opened, initialised SQLite store of its own (storage-level tests: no daemon)."""
    store = SQLiteStorage(tmp_path / "db.sqlite")
    await store.open()
    await initialized(store)
    yield store
    await store.close()


@pytest.fixture
def admin_token(settings: Settings) -> str:
    return asyncio.run(initialize_store(settings)).admin_token


@dataclass
class Api:
    """An in-process daemon behind a real aiohttp test server."""

    client: TestClient[web.Request, web.Application]
    daemon: Daemon
    admin: str

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    async def put(self, path: str, value: str, token: str | None = None, **extra: object) -> dict[str, Any]:
        resp = await self.client.put(f"/v1/secrets/{path}", json={"value": value, **extra}, headers=self.auth(token))
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    async def get(self, path: str, token: str | None = None, **params: object) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/secrets/{path}", params={k: str(v) for k, v in params.items()},
                                     headers=self.auth(token))
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    async def token(self, client: str, *policies: str) -> str:
        resp = await self.client.post("/v1/auth/tokens", json={"client": client, "policies": list(policies)},
                                      headers=self.auth())
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["token"])


@asynccontextmanager
async def running(settings: Settings, admin: str | None = None) -> AsyncIterator[Api]:
    """An in-process daemon behind a real aiohttp test server (the store initialised unless ``admin``)."""
    if admin is None:
        admin = (await initialize_store(settings)).admin_token
    daemon = Daemon(settings)
    await daemon.start()
    client = TestClient(TestServer(create_app(daemon)))
    await client.start_server()
    try:
        yield Api(client, daemon, admin)
    finally:
        await client.close()
        await daemon.stop()


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return load_settings(None, data_dir=data_dir, **overrides)


@pytest.fixture
async def api(settings: Settings, admin_token: str) -> AsyncIterator[Api]:
    async with running(settings, admin_token) as api:
        yield api


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    data = tmp_path / "proc-data"
    token = init_store(data)
    proc = DaemonProcess(data)
    try:
        yield proc.start(), token
    finally:
        proc.stop()
