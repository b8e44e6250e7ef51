"""The benchmark's load generator against a real authrelay process (CI smoke of bench/).

Same shape as the bench's scenarios (a) plain from a trusted network and (b) STARTTLS +
AUTH PLAIN on the submission port, at tiny counts: load.py's report must agree with what
authrelay queued. Throughput is measured by bench/run.sh, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess

pytestmark = pytest.mark.slow

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load.py"


def _load(*args: str) -> dict:
    p = subprocess.run([sys.executable, str(LOAD), *args], capture_output=True, text=True,
                       timeout=120)
    assert p.stdout.strip(), p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0, out.get("errors")
    return out


def test_load_plain_trusted_and_submission(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({"relay": {"trusted_networks": ["127.0.0.0/8"]},
                                     "limits": {"connection_rate_per_ip": 0}}, workers=2)
    out = _load("smtp", "--port", str(r.ports["smtp"]), "-c", "4", "-n", "8", "-m", "3",
                "--size", "1024", "-p", "2")
    assert out["messages_ok"] == 24 and out["messages_failed"] == 0
    out2 = _load("smtp", "--port", str(r.ports["submission"]), "--tls", "starttls",
                 "--auth", "plain", "--user", "alice", "--password", PASSWORD,
                 "-c", "3", "-n", "6", "-p", "1")
    assert out2["messages_ok"] == 6 and out2["sessions_ok"] == 6
    r.wait_for(lambda: len(r.queued()) == 30)
    log = r.maillog()
    assert log.count("nrcpts=1") == 30
    assert log.count("auth=alice") >= 6
