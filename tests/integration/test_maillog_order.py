"""The maillog's order across processes: a message's `from=` line (written by the
receiving worker) comes before its delivery lines (written by the master), whichever
process's writer thread writes first.

A real `authrelay serve` with two workers delivering to a fake MX on loopback; a
sitecustomize hook in the served interpreter widens every process's gathering of lines
(maillog._GATHER) so that the two writer threads' batches overlap as on a busy machine.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory
from relayproc import RelayProcess
from test_e2e_delivery import mx_overrides

pytestmark = pytest.mark.slow

_HOOK = "import authrelay.maillog\nauthrelay.maillog._GATHER = 0.3\n"


def test_a_delivery_line_never_precedes_the_from_line_of_its_message(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        fake_mx: MXFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    mx = fake_mx("127.0.0.2")
    relay = relay_factory({**mx_overrides(dns, fake_mx.port),
                           "relay": {"smart_host": [], "local_domains": ["example.test"]}},
                          workers=2)
    qids = []
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=20) as s:
        for i in range(12):
            s.ehlo("client.example")
            assert s.mail("someone@remote.example")[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            code, msg = s.data(b"Subject: order %d\r\n\r\nbody\r\n" % i)
            assert code == 250, msg
            qids.append(msg.decode().rsplit(" ", 1)[1])
            time.sleep(0.05)  # the master's lines of the last message still gathering
    relay.wait_for(lambda: len(mx.messages) == len(qids), what="every message delivered")
    relay.wait_for(lambda: all(f"{q}: status=removed" in relay.maillog() for q in qids),
                   what="every removal logged")
    lines = relay.maillog().splitlines()
    for q in qids:
        at = [i for i, ln in enumerate(lines) if re.search(rf" {q}: (from|to)=", ln)]
        assert [re.search(r": (from|to)=", lines[i]).group(1)  # type: ignore[union-attr]
                for i in at] == ["from", "to"], (q, [lines[i] for i in at])
