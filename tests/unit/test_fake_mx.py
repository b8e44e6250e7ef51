"""The fake MX's own contract where tests lean on it (tests/fakes/smtpserver.py)."""

from __future__ import annotations

import smtplib

from fakes.smtpserver import MXFactory


def test_rcpt_replies_changed_mid_transaction_apply_to_the_next_one(
        fake_mx: MXFactory) -> None:
    """A test clearing `rcpt_replies` while the relay is between two RCPTs of one
    transaction must not split it: the table is read once, at MAIL."""
    mx = fake_mx("127.0.0.2", rcpt_replies={"ann@a.test": "451 4.3.0 busy",
                                            "amy@a.test": "451 4.3.0 busy"})
    with smtplib.SMTP("127.0.0.2", mx.port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("s@client.test")[0] == 250
        assert c.rcpt("ann@a.test")[0] == 451
        mx.rcpt_replies.clear()  # what a test does while the relay's RCPTs are in flight
        assert c.rcpt("amy@a.test")[0] == 451  # still this transaction's table
        c.rset()
        assert c.mail("s@client.test")[0] == 250
        assert c.rcpt("ann@a.test")[0] == 250  # the next transaction sees the change
        assert c.rcpt("amy@a.test")[0] == 250
        assert c.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
    assert [sorted(m.rcpt_tos) for m in mx.messages] == [["amy@a.test", "ann@a.test"]]
