"""A next hop out of step, against a real `serve`: the maillog's delivery line.

Both MX hosts of example.test (tests/fakes/rawmx.py, no PIPELINING) answer MAIL twice,
"250" and then a refusal whose text holds an ESC: read as the RCPT's reply, that
refusal bounced the recipient. Now the reply already waiting when RCPT goes out is out
of step: each host fails `451 4.5.0`, the message stays queued, its delivery line is
`stat=Deferred (451 4.5.0 protocol error from ...: replies out of step: ...)` with the
reply escaped (`\\x1b`), no bounce, no traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.rawmx import RawMX, verbs
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import RelayProcess
from test_e2e_delivery import gone, log_lines, mx_overrides, submit

pytestmark = pytest.mark.slow


def test_a_next_hop_answering_mail_twice_is_deferred_in_the_maillog(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    script = verbs({b"EHLO": b"250 raw.test\r\n",
                    b"MAIL": b"250 2.1.0 ok\r\n550 5.1.1 \x1b[31mno such user\r\n",
                    b"DATA": b"354 go ahead\r\n"})
    with RawMX("127.0.0.2", fake_mx.port, script) as mx1, \
            RawMX("127.0.0.3", fake_mx.port, script) as mx2:
        relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"]))
        qid = submit(relay, ["bob@example.test"])
        line = relay.wait_for(lambda: next(
            (ln for ln in log_lines(relay, qid) if "stat=" in ln), None),
            what="the delivery line")
    assert ("stat=Deferred (451 4.5.0 protocol error from mx2.example.test [127.0.0.3]:"
            in line), line
    assert ("replies out of step: a reply came before the next command was sent: "
            "550 5.1.1 \\x1b[31mno such user)") in line, line
    log = relay.maillog()
    failed = [ln for ln in log_lines(relay, qid) if "status=host failed" in ln]
    assert len(failed) == 2 and all("replies out of step" in ln for ln in failed), failed
    assert "stat=Bounced" not in log and "Traceback" not in log, log
    assert not gone(relay, qid)  # kept for the next attempt
    assert b"message" not in mx1.received and b"message" not in mx2.received
    assert not sender_mx.messages  # no bounce
