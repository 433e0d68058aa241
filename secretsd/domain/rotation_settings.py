"""``[rotation]``: the rotation scheduler and the hooks secrets' policies may name (docs/rotation.md)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from secretsd.domain.hooks import HookSettings

HOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RotationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Run the scheduler in this process (it still only works while it holds the leader lock).
    scheduler: bool = True
    #: How often the scheduler looks for due rotations, and a standby retries the leader lock.
    tick_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Candidates handled per tick.
    batch: int = Field(default=100, ge=1, le=10_000)
    #: Retry after a failed rotation: base * 2^(failures - 1), at most max.
    retry_base_seconds: float = Field(default=60.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    #: A pending version older than this with no rotation in progress in this process was left by
    #: a daemon that died mid-rotation: the leader finishes it (re-running the hook) or discards it.
    #: Keep it above the slowest hook's total time (two steps).
    pending_timeout_seconds: float = Field(default=600.0, gt=0)
    hooks: dict[str, HookSettings] = Field(default_factory=dict)

    @field_validator("hooks")
    @classmethod
    def _names(cls, value: dict[str, HookSettings]) -> dict[str, HookSettings]:
        for name in value:
            if not HOOK_NAME.fullmatch(name):
                raise ValueError(f"hook name {name!r}: letters, digits, '.', '_', '-' (max 64)")
        return value

    @model_validator(mode="after")
    def _recovery_after_the_slowest_hook(self) -> RotationSettings:
        # A rotation still running its hook must never look abandoned to another replica, or the
        # hook would run twice at once.
        slowest = max((2 * h.timeout_seconds for h in self.hooks.values()), default=0.0)
        if self.pending_timeout_seconds <= slowest + 30:
            raise ValueError(f"pending_timeout_seconds must exceed {slowest + 30:g} (two steps of the slowest "
                             "hook, plus a margin)")
        return self
