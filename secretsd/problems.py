"""Problem documents (RFC 9457) for the daemon's responses.

The table between the error hierarchy and problem types, and the client's way back
(``error_from_problem``), live in ``secretsd_client.problems`` so that both directions read one table;
this module re-exports them and adds what only the server does: write a document whose detail never
carries a token.
"""

from __future__ import annotations

from typing import Any

from secretsd_client.problems import (
    INTERNAL,
    PROBLEM_CONTENT_TYPE,
    PROBLEMS,
    TYPE_PREFIX,
    ProblemType,
    error_from_problem,
    problem_for,
)

from secretsd import tokens

__all__ = [
    "INTERNAL",
    "PROBLEMS",
    "PROBLEM_CONTENT_TYPE",
    "TYPE_PREFIX",
    "ProblemType",
    "error_from_problem",
    "problem_document",
    "problem_for",
]

# Problem types whose detail may reveal internals are replaced by a fixed text.
_OPAQUE = {"internal"}


def problem_document(
    ptype: ProblemType, detail: str, *, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": ptype.uri,
        "title": ptype.title,
        "status": ptype.status,
        # A detail may quote what the caller sent (a path): a token pasted there is not sent back.
        "detail": ptype.title if ptype.slug in _OPAQUE else tokens.redact_secrets(detail),
    }
    if instance:
        doc["instance"] = instance
    doc.update(extra)
    return doc
