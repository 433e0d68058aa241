"""Where a copy of each audit line can go besides the log: standard output or syslog (``[audit] mirror``)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def stdout_mirror(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def syslog_mirror() -> Callable[[str], None]:
    import syslog

    syslog.openlog("secretsd-audit", 0, syslog.LOG_AUTH)

    def emit(line: str) -> None:
        syslog.syslog(syslog.LOG_INFO, line)

    return emit
