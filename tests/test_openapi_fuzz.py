"""Schemathesis against the served OpenAPI document and a real daemon, for a bounded time.

Every generated request must get a documented status, content type and headers, a body that
conforms to the document, and never a 5xx; the daemon must log nothing "unhandled". The budget
(``FUZZ_SECONDS``, ~45 s plus start-up) keeps it inside the CI run on a 2-core machine; set
``SECRETSD_FUZZ_SECONDS`` for a longer hunt.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess

FUZZ_SECONDS = int(os.environ.get("SECRETSD_FUZZ_SECONDS", "45"))
# A document schemathesis cannot fully use is a failure too: a $ref it cannot resolve, a pattern it
# cannot generate from, or a token that never got past 401/403.
CONFIG = """
[warnings]
fail-on = ["unresolvable_reference", "unsupported_regex", "missing_auth"]

# A login's body is its credential: a generated JWT is refused (401) by design, so "only 401s" is
# its contract, not a token that failed (tests/test_auth_jwt.py logs in for real). Every check
# still runs on it; only that warning is not a failure there.
[[operations]]
include-path = "/v1/auth/jwt/login"
warnings.fail-on = ["unresolvable_reference", "unsupported_regex"]
"""
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance",
])


@pytest.mark.e2e
@pytest.mark.fuzz
def test_schemathesis_finds_no_5xx_and_no_contract_violation(
    daemon_process: tuple[DaemonProcess, str], tmp_path: Path
) -> None:
    daemon, token = daemon_process
    schemathesis = Path(sys.executable).parent / "schemathesis"
    assert schemathesis.exists(), "schemathesis comes with the test extras: pip install -e '.[test]'"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    # cwd: schemathesis and hypothesis keep their state (.hypothesis/) there, not in the checkout.
    result = subprocess.run(
        [str(schemathesis), "--config-file", str(config), "run", f"{daemon.url}/v1/openapi.json",
         "--header", f"Authorization: Bearer {token}",
         "--checks", CHECKS, "--phases", "coverage,fuzzing", "--max-time", str(FUZZ_SECONDS), "--workers", "1",
         "--request-timeout", "10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120,
        env=os.environ | {"NO_COLOR": "1", "COLUMNS": "120"},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and int(counts[1]) > 100 and counts[1] == counts[2], out[-4000:]
    print(f"schemathesis: {counts[0]} in {FUZZ_SECONDS} s")  # pytest -s shows the figure
    logs = daemon.logs()
    assert "unhandled" not in logs and "Traceback" not in logs, logs[-4000:]
    assert not re.search(r"secretsd\.http: \S+ \S+ 5\d\d ", logs), logs[-4000:]
