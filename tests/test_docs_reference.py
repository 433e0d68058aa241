"""The generated reference (docs/reference/, mkdocstrings) lists every public method with types and a docstring.

mkdocs renders a method without a docstring silently, so this is the check that fails instead: every
public function and method of what the reference pages document has a docstring and a fully
annotated signature. (``mkdocs build --strict`` in .ci/run checks the links and the rendering.)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from secretsd_client import AsyncSecretsClient, RetryPolicy, SecretsClient, settings_source

import softhsm.postgres
import softhsm.pytest_plugin

ROOT = Path(__file__).resolve().parents[1]
REFERENCED: list[Any] = [SecretsClient, AsyncSecretsClient, RetryPolicy, settings_source,
                         softhsm.pytest_plugin, softhsm.postgres]


def public_callables(obj: Any) -> Iterator[tuple[str, Callable[..., Any]]]:
    """What mkdocstrings shows for ``obj`` (filters ``!^_``, inherited members included)."""
    if isinstance(obj, ModuleType):
        for name, member in vars(obj).items():
            if name.startswith("_") or getattr(member, "__module__", None) != obj.__name__:
                continue
            if inspect.isclass(member):
                yield from public_callables(member)
            elif inspect.isfunction(member) or hasattr(member, "_fixture_function_marker"):
                yield name, member
        return
    for name, member in inspect.getmembers(obj):
        if not name.startswith("_") and (inspect.isfunction(member) or inspect.ismethod(member)):
            yield f"{obj.__name__}.{name}", member


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    # A pytest fixture wraps its function; the documented signature is the function's.
    unwrapped: Callable[..., Any] = getattr(fn, "_get_wrapped_function", lambda: fn)()
    return unwrapped


def test_the_reference_pages_name_what_this_test_checks() -> None:
    pages = "".join((ROOT / "docs" / "reference" / page).read_text() for page in ("client.md", "plugin.md"))
    named = set(re.findall(r"^::: ([\w.]+)$", pages, re.MULTILINE))
    # The client's reference names the light distribution's modules, where the code lives.
    assert named == {"secretsd_client.SecretsClient", "secretsd_client.AsyncSecretsClient",
                     "secretsd_client.RetryPolicy", "secretsd_client.settings_source",
                     "softhsm.pytest_plugin", "softhsm.postgres"}


@pytest.mark.parametrize("obj", REFERENCED, ids=lambda o: o.__name__)
def test_every_documented_callable_has_a_docstring_and_types(obj: Any) -> None:
    problems = []
    found = list(public_callables(obj))
    assert found, f"nothing public found in {obj.__name__}"
    for name, fn in found:
        target = _unwrap(fn)
        if not inspect.getdoc(target):
            problems.append(f"{name}: no docstring")
        signature = inspect.signature(target)
        untyped = [p.name for p in signature.parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        if untyped:
            problems.append(f"{name}: parameters without a type: {', '.join(untyped)}")
        if signature.return_annotation is inspect.Signature.empty:
            problems.append(f"{name}: no return type")
    assert not problems, "\n".join(problems)
