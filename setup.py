"""The daemon's install requirements, computed here: one of them is the client distribution.

``jarvis-secretsd`` depends on ``jarvis-secretsd-client`` (the client and its settings source, in
``client/``). During development that distribution is not on any index, so ``pip install .`` and
``pip install -e '.[test]'`` from a checkout take it from the sibling folder through an absolute
``file:`` URL computed from this file's location. A release build sets ``SECRETSD_CLIENT_REQUIREMENT``
(``jarvis-secretsd-client==X.Y.Z``) so that the published wheel names an index requirement, never a
path on the build machine; a build from a tree without ``client/`` (an sdist) pins the same version as
this distribution. docs/releasing.md has the procedure; tests/test_client_distribution.py the rules.

Everything else about the distribution is in pyproject.toml (``dependencies`` is declared dynamic there).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_DIR = HERE / "client"
CLIENT_DISTRIBUTION = "jarvis-secretsd-client"
CLIENT_REQUIREMENT_ENV = "SECRETSD_CLIENT_REQUIREMENT"

# The daemon's own stack, besides the client distribution.
DEPENDENCIES = [
    "aiohttp>=3.13",
    "cryptography>=42",
    "pydantic>=2.6",
    "pydantic-settings>=2.3",
    "prometheus-client>=0.20",
    "click>=8.1",
    "rich>=13",
    "python-dotenv>=1.2.4",
    "python-pkcs11>=0.7",  # the pkcs11 key provider and the `hsm` commands work right after `pip install` (wheels)
    "PyJWT[crypto]>=2.10",  # workload JWT login (secretsd.auth.jwt): JWKS keys, RS256/ES256/EdDSA only
    "shamir-mnemonic>=0.3",  # recovery shares (SLIP-0039 reference implementation): init --recovery-shares
]

# The client distribution (any spelling PEP 503 normalises to it), optional extras, then either an exact
# version or a direct URL.
_CLIENT_NAME = r"jarvis[-_.]+secretsd[-_.]+client\s*(?:\[[\w,\s-]*\])?\s*"
_PINNED = re.compile(_CLIENT_NAME + r"==\s*(?P<version>[\w.+!-]+)", re.IGNORECASE)
_DIRECT_URL = re.compile(_CLIENT_NAME + r"@\s*\S+", re.IGNORECASE)


def client_requirement(environ: Mapping[str, str] | None = None) -> str:
    """The requirement on the client distribution: the override, else the sibling folder, else this version."""
    env = os.environ if environ is None else environ
    override = env.get(CLIENT_REQUIREMENT_ENV, "").strip()
    if override:
        check_override(override)
        return override
    if (CLIENT_DIR / "pyproject.toml").is_file():
        return f"{CLIENT_DISTRIBUTION} @ {CLIENT_DIR.as_uri()}"
    return f"{CLIENT_DISTRIBUTION}=={version()}"


def check_override(override: str) -> None:
    """Refuse a release requirement that could install some other package, or another client release.

    The client distribution holds rules the daemon enforces too (the secret path rule, the problem
    table), so a daemon release requires exactly its own client release (or a URL, for a test build).
    """
    pinned = _PINNED.fullmatch(override)
    if pinned and pinned["version"] == version():
        return
    if _DIRECT_URL.fullmatch(override):
        return
    raise SystemExit(f"{CLIENT_REQUIREMENT_ENV}={override!r} is not {CLIENT_DISTRIBUTION} pinned to this "
                     f"release: set it to '{CLIENT_DISTRIBUTION}=={version()}' (or '{CLIENT_DISTRIBUTION} @ URL')")


def version() -> str:
    project: dict[str, str] = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]
    return project["version"]


if __name__ == "__main__":  # setuptools runs this file as __main__; the tests import it
    from setuptools import setup

    setup(install_requires=[client_requirement(), *DEPENDENCIES])
