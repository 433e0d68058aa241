"""Exit statuses of the ``secretsd`` command (the contract documented in docs/cli.md).

A script tells "not there" from "not allowed" from "daemon down" by the status alone. The rule
lives in ``exit_code``, the one function every remote command's errors pass through.
"""

from __future__ import annotations

from enum import IntEnum

from secretsd.errors import ConfigError, PolicyFileError, SecretsdError, UnreachableError
from secretsd.problems import problem_for


class Exit(IntEnum):
    OK = 0
    ERROR = 1  # anything not below, including a request the daemon refuses as malformed (400)
    USAGE = 2  # the command line or the client's settings (--addr, SECRETSD_ADDR, token format)
    NOT_FOUND = 3  # no such secret, version or token (404, 410)
    DENIED = 4  # unauthenticated or denied by policy (401, 403)
    UNAVAILABLE = 5  # the daemon cannot be reached, or answers 503 (sealed, storage or provider down)
    CONFLICT = 6  # check-and-set or another 409
    # secretsd backup verify / restore (docs/backup.md): which check refused the file
    INTEGRITY = 7  # damaged, truncated, not a backup, or a section/byte that does not match its manifest
    AUTHENTICITY = 8  # the manifest does not verify under the store's keyring (altered, or another store's)
    NO_KEY = 9  # no configured key provider unwraps the backup's keyring


# The client turns each problem document back into its error class; the class's problem status
# (the one table in secretsd.problems) decides the code, so the CLI and the API cannot disagree.
_BY_STATUS = {
    404: Exit.NOT_FOUND,
    410: Exit.NOT_FOUND,
    401: Exit.DENIED,
    403: Exit.DENIED,
    503: Exit.UNAVAILABLE,
    409: Exit.CONFLICT,
}


def exit_code(exc: SecretsdError) -> Exit:
    """The exit status of a command that talks to the daemon and failed with ``exc``."""
    if isinstance(exc, UnreachableError):
        return Exit.UNAVAILABLE
    if isinstance(exc, ConfigError) and not isinstance(exc, PolicyFileError):
        # The daemon sends no configuration error but a refused policy reload (422, exit 1):
        # this one is about our own address, token or CA file, i.e. how the command was invoked.
        return Exit.USAGE
    return _BY_STATUS.get(problem_for(exc).status, Exit.ERROR)


def error_document(exc: SecretsdError, code: Exit) -> dict[str, object]:
    """What ``--json`` prints for a failed remote command: the problem's type and status as the
    daemon would give them (none for an error of our own side, such as an unreachable daemon)."""
    remote = not isinstance(exc, (UnreachableError, ConfigError)) or isinstance(exc, PolicyFileError)
    ptype = problem_for(exc)
    return {"error": {"type": ptype.slug if remote else ("unreachable" if code == Exit.UNAVAILABLE else "usage"),
                      "status": ptype.status if remote else None, "detail": exc.message, "exit_code": int(code)}}
