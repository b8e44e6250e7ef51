"""policy/ownership.py: which From:/Sender: mailboxes a user may send as (issue 17)."""

from __future__ import annotations

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authrelay.dkim.signer import from_domain
from authrelay.policy.ownership import Owner, header_verdict, may_send_as, normalize

OWNED = {"bob@other.test"}

OWNED_HEADERS = [
    b"From: bob@other.test\r\n",
    b"From: Bob <BOB@Other.Test>\r\n",
    b"From: Bob\r\n <bob@other.test>\r\n",  # folded
    b'From: "bob"@other.test\r\n',  # quoted local part
    b'From: "Smith, Bob" <bob@other.test>\r\n',
    b"From: =?UTF-8?B?Qm9i?= <bob@other.test>\r\n",
    b"From: b\xc3\xb6b <bob@other.test>\r\n",  # RFC 6532 UTF-8 display name
    b"From: team: bob@other.test;\r\n",  # a group of one
    b"From: bob@other.test (ceo@probe.test)\r\n",  # a comment is not a mailbox
    b"From: bob@other.test\r\nSender: bob@other.test\r\n",
    b"Subject: x\r\nfrom: bob@other.test\r\nTo: a@b\r\n",
]

NOT_OWNED = [
    (b"From: ceo@probe.test\r\n", "From: <ceo@probe.test> not owned by bob"),
    (b'From: "bob@other.test" <ceo@probe.test>\r\n', "From: <ceo@probe.test> not owned"),
    (b"From: =?utf-8?q?bob=40other.test?= <ceo@probe.test>\r\n", "<ceo@probe.test>"),
    (b"From: ceo@probe.test\r\nSender: bob@other.test\r\n", "From: <ceo@probe.test>"),
    (b"From: bob@other.test\r\nSender: ceo@probe.test\r\n", "Sender: <ceo@probe.test>"),
    (b"From: bob@other.test\r\nFrom: ceo@probe.test\r\n", "From: <ceo@probe.test>"),
    (b"From: bob@other.test, ceo@probe.test\r\n", "From: <ceo@probe.test>"),
    (b"From: bob@other.test <ceo@probe.test>\r\n", "From: not parsable"),
    (b"From: =?utf-8?q?ceo=40probe.test?=\r\n", "From: not parsable"),
    (b"From: undisclosed:;\r\n", "not an address"),
    (b"From: bob@other.test@probe.test\r\n", "From: not parsable"),
    (b"Subject: no from\r\n", "no From: field"),
    (b"", "no From: field"),
    (b"Sender: ceo@probe.test\r\n", "Sender: <ceo@probe.test> not owned"),
    (b"Sender: bob@other.test\r\n", "no From: field"),
    # obs-optional WSP before the colon (RFC 5322 4.5.3): still a From: field here
    (b"From : ceo@probe.test\r\nFrom: bob@other.test\r\n", "From: <ceo@probe.test>"),
    (b"From: \xff@other.test\r\n", "not owned"),  # not UTF-8: never equal to an owned one
    (b"From: bob@other.test.evil\r\n", "not owned"),
]


@pytest.mark.parametrize("head", OWNED_HEADERS)
def test_owned(head: bytes) -> None:
    assert header_verdict(head + b"\r\n", "bob", OWNED) == ""
    assert Owner.of("bob", OWNED).verdict(head) == ""


@pytest.mark.parametrize(("head", "why"), NOT_OWNED)
def test_not_owned(head: bytes, why: str) -> None:
    got = header_verdict(head + b"\r\n", "bob", OWNED)
    assert why in got, got


def test_a_user_named_like_an_address_owns_it() -> None:
    assert header_verdict(b"From: Bob@Example.org\r\n\r\n", "bob@example.org", ()) == ""
    assert may_send_as("BOB@example.org.", "bob@example.org", ())
    assert not may_send_as("alice@example.org", "bob@example.org", ())
    assert not may_send_as("", "bob", OWNED)


def test_normalize() -> None:
    assert normalize('"Bob"@Other.Test.') == "bob@other.test"
    assert normalize("x@b\u00fccher.test") == "x@xn--bcher-kva.test"
    assert normalize("no-at-sign") == ""


_PARTS = st.sampled_from([
    b"From: ", b"Sender: ", b"From : ", b"X: ", b"\r\n", b"\r\n ", b" ", b"<", b">", b'"',
    b"\\", b",", b";", b"g:", b"(", b")", b"=?utf-8?q?", b"?=", b"[", b"]", b"@", b".",
    b"bob@other.test", b"ceo@probe.test", b"BOB@Other.Test", b"bob", b"probe.test",
    b"\xc3\xa9", b"\xff"])


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(st.lists(_PARTS, max_size=30).map(b"".join))
def test_owned_means_the_signer_never_picks_another_domain(head: bytes) -> None:
    """Whatever the header, the verdict never raises, and when it says "owned" the DKIM
    signer's own reading (dkimpy's header split, its From: domain) is bob's domain or
    none: the two parsers cannot be played against each other."""
    msg = head + b"\r\n\r\nbody\r\n"
    if header_verdict(msg, "bob", OWNED):
        return
    try:
        d = dkim.DKIM(msg, linesep=b"\r\n")
    except dkim.MessageFormatError:
        return
    domain, _why = from_domain(d.headers)
    assert domain in (None, "other.test"), (msg, domain)
