"""Rotation hooks: tell a target system about a new value before it becomes current.

The AWS Secrets Manager four-step model: secretsd *creates* the pending version, the hook is
called to *set* it in the target system and then to *test* it there, and secretsd *finishes* by
making it current. Hooks are declared by the operator in the daemon's configuration
(``[rotation.hooks.NAME]``) and a secret's policy names one: an API caller can never make the
daemon run a program or send a value to a URL of its choosing.

Contract (both kinds), once per step:

- input: a JSON object ``{"step": "set"|"test", "path", "version", "current_version", "value"}``,
  for an executable on its standard input (never in argv or the environment, where other
  processes could read it), for a URL as the body of a ``POST`` (``application/json``);
- success: exit status 0, or an HTTP 2xx answer; anything else, or no answer within the hook's
  ``timeout_seconds``, is a failure (a timed-out executable and its process group are killed);
- steps must be idempotent: after a daemon restart mid-rotation the steps run again with the
  same pending value.

Executables run with a minimal environment (``PATH``, ``LANG`` and the hook's own ``env``), not
the daemon's, in ``/``; their output is discarded, so a careless hook cannot put the value in the
daemon's logs. URL hooks must be ``https://`` or ``http://`` on a loopback address, never follow
redirects, and their answer's body is ignored. Failure reasons name what happened (exit status,
HTTP status, timeout), never the value or the hook's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from secretsd.addresses import is_loopback
from secretsd.domain.policy import compile_glob

STEPS = ("set", "test")
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HookSettings(BaseModel):
    """``[rotation.hooks.NAME]``: exactly one of ``command`` (argv) and ``url``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Path globs of the secrets this hook may rotate. Required: a hook sets values in another
    #: system, so a caller who may rotate one secret must not be able to aim it at another's.
    paths: tuple[str, ...] = Field(min_length=1)
    command: tuple[str, ...] | None = None
    url: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    #: Extra environment for an executable (its only environment besides PATH and LANG).
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> HookSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError("set exactly one of command and url")
        for glob in self.paths:
            compile_glob(glob)
        if self.command is not None and (not self.command or not os.path.isabs(self.command[0])):
            raise ValueError("command must be a list whose first item is an absolute path")
        if self.url is not None:
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            if not (parts.scheme == "https" and host) and not (parts.scheme == "http" and is_loopback(host)):
                raise ValueError("url must be https://, or http:// on a loopback address")
            if parts.username or parts.password:
                raise ValueError("url must not carry credentials")
        return self

    def allows(self, path: str) -> bool:
        return any(compile_glob(glob).fullmatch(path) for glob in self.paths)

    @property
    def kind(self) -> Literal["command", "url"]:
        return "command" if self.command is not None else "url"


class HookFailed(Exception):
    """A hook step failed; ``reason`` is safe to log and audit (never the value)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HookCall:
    path: str
    version: int
    current_version: int
    value: str = field(repr=False)

    def body(self, step: str) -> bytes:
        doc: dict[str, Any] = {"step": step, "path": self.path, "version": self.version,
                               "current_version": self.current_version, "value": self.value}
        return json.dumps(doc).encode("utf-8")


class Hook:
    """One configured hook; ``run`` calls every step in order and raises ``HookFailed``."""

    def __init__(self, name: str, settings: HookSettings) -> None:
        self.name = name
        self.settings = settings

    async def run(self, call: HookCall) -> None:
        for step in STEPS:
            try:
                await asyncio.wait_for(self._step(step, call), self.settings.timeout_seconds)
            except TimeoutError:
                raise HookFailed(
                    f"hook {self.name!r} step {step!r} timed out after {self.settings.timeout_seconds:g}s"
                ) from None

    async def _step(self, step: str, call: HookCall) -> None:
        if self.settings.command is not None:
            await self._exec(step, call, self.settings.command)
        else:
            assert self.settings.url is not None
            await self._post(step, call, self.settings.url)

    async def _exec(self, step: str, call: HookCall, command: tuple[str, ...]) -> None:
        env = {"PATH": HOOK_PATH, "LANG": "C.UTF-8", **self.settings.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env=env, cwd="/", start_new_session=True,
            )
        except OSError as exc:
            raise HookFailed(f"hook {self.name!r} could not start: {exc.strerror or type(exc).__name__}") from None
        try:
            await proc.communicate(call.body(step))
        except BaseException:  # timeout (cancellation) or anything else: leave nothing running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Reap it outside the cancelled scope, so no zombie is left behind.
            asyncio.get_running_loop().create_task(proc.wait())
            raise
        if proc.returncode != 0:
            raise HookFailed(f"hook {self.name!r} step {step!r} exited with status {proc.returncode}")

    async def _post(self, step: str, call: HookCall, url: str) -> None:
        # Imported here: the settings (and every CLI command that reads them) must not pay for
        # aiohttp, and only a daemon with a URL hook ever posts.
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                url, data=call.body(step), headers={"Content-Type": "application/json"}, allow_redirects=False,
            ) as resp:
                status = resp.status
        except aiohttp.ClientError as exc:
            raise HookFailed(f"hook {self.name!r} step {step!r} could not reach its URL ({type(exc).__name__})") \
                from None
        if not 200 <= status < 300:
            raise HookFailed(f"hook {self.name!r} step {step!r} answered HTTP {status}")
