"""Unconditional writes to one path under contention (issue 17): every one is stored, none is a 409."""

from __future__ import annotations

import asyncio

from tests.conftest import Api


async def test_concurrent_unconditional_puts_to_one_path_never_conflict(api: Api) -> None:
    await api.put("app/hot", "v0")
    writers = 24
    responses = await asyncio.gather(*[
        api.client.put("/v1/secrets/app/hot", json={"value": f"w{i}"}, headers=api.auth()) for i in range(writers)])
    statuses = [r.status for r in responses]
    assert statuses == [200] * writers, [await r.text() for r in responses if r.status != 200]
    versions = sorted([(await r.json())["version"] for r in responses])
    assert versions == list(range(2, writers + 2))
    # Each value was sealed for the version it got: every one still reads back under its number.
    current = await api.get("app/hot")
    assert current["version"] == writers + 1 and current["value"].startswith("w")


async def test_check_and_set_writes_still_conflict(api: Api) -> None:
    await api.put("app/cas", "v1")
    responses = await asyncio.gather(*[
        api.client.put("/v1/secrets/app/cas", json={"value": f"c{i}", "cas": 1}, headers=api.auth())
        for i in range(6)])
    assert sorted(r.status for r in responses) == [200] + [409] * 5
