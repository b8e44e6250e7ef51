"""Pure delivery helpers: route keys, MX ordering, address literals, CRLF normalisation,
reply parsing. No I/O."""

from __future__ import annotations

import random
import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authrelay.config import from_dict
from authrelay.delivery.client import normalize_crlf, reply_result
from authrelay.delivery.mx import (
    RouteError,
    is_own_listener,
    listener_addresses,
    order_mx,
    parse_literal,
)
from authrelay.delivery.router import route_key

MX_CFG = from_dict({})
SMART_CFG = from_dict({"relay": {"smart_host": ["smtp.example.org:587"]}})


@pytest.mark.parametrize("address,key", [
    ("bob@Example.ORG", "example.org"),
    ("bob@example.org.", "example.org"),
    ('"a@b"@Example.net', "example.net"),  # quoted local part containing "@"
    ("bob@[192.0.2.1]", "[192.0.2.1]"),
    ("bob@[IPv6:2001:DB8::1]", "[IPv6:2001:DB8::1]"),  # literal kept as is
    # One key per domain however it is spelt (IDNA 2008 A-label, lower case).
    ("bob@bücher.example", "xn--bcher-kva.example"),
    ("bob@BÜCHER.example.", "xn--bcher-kva.example"),
    ("bob@XN--BCHER-KVA.Example", "xn--bcher-kva.example"),
])
def test_route_key_by_domain(address: str, key: str) -> None:
    assert route_key(MX_CFG, address) == key


def test_route_key_smarthost() -> None:
    assert route_key(SMART_CFG, "bob@example.org") == "smarthost"
    assert route_key(SMART_CFG, "bob@[192.0.2.1]") == "smarthost"


def test_order_mx_by_preference_shuffled_among_equals() -> None:
    records = [(20, "c"), (10, "a"), (10, "b"), (30, "d"), (10, "a")]
    seen = set()
    for seed in range(50):
        order = order_mx(list(records), random.Random(seed))
        assert sorted(order[:2]) == ["a", "b"] and order[2:] == ["c", "d"]
        seen.add(tuple(order[:2]))
    assert seen == {("a", "b"), ("b", "a")}  # both orders occur: load is spread


class _CountedName(str):
    """An MX host name that counts how often it is compared for equality."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedName.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_order_mx_is_linear_in_a_hostile_rrset() -> None:
    """A hostile answer's MX RRset holds thousands of records (3,000 fit in a 64 KiB TCP
    answer): each host was searched for in lists of those before it, some 9 million
    comparisons (0.24 s measured) on the master's event loop at every delivery attempt
    to the domain, stalling every other delivery. Each name is now compared a few times."""
    records = [(10 + i % 3, _CountedName(f"h{i}.evil.test")) for i in range(3000)]
    records += records[:100]  # repeated records, as a hostile answer may have
    _CountedName.compared = 0
    order = order_mx(records, random.Random(1))
    assert sorted(order) == sorted({h for _, h in records})
    assert [int(h[1:].split(".")[0]) % 3 for h in order] == \
        [0] * 1000 + [1] * 1000 + [2] * 1000  # by preference
    assert _CountedName.compared < 5 * len(records), _CountedName.compared


@pytest.mark.parametrize("literal,ip", [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ("[ipv6:::1]", "::1"),
    ("example.org", None),
])
def test_parse_literal(literal: str, ip: str | None) -> None:
    assert parse_literal(literal) == ip


@pytest.mark.parametrize("bad", ["[300.1.1.1]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[x]"])
def test_parse_literal_invalid_is_permanent(bad: str) -> None:
    with pytest.raises(RouteError) as e:
        parse_literal(bad)
    assert e.value.result.permanent and e.value.result.enhanced == "5.1.2"


def test_normalize_crlf_examples() -> None:
    assert normalize_crlf(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert normalize_crlf(b"a\nb\rc\r\r\nd") == b"a\r\nb\r\nc\r\n\r\nd\r\n"
    assert normalize_crlf(b"") == b""


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x y", b"\xc3\xa9"]),
                max_size=60))
def test_normalize_crlf_never_leaves_bare_cr_or_lf(parts: list[bytes]) -> None:
    data = b"".join(parts)
    out = normalize_crlf(data)
    assert not _BARE.search(out)
    assert out == b"" or out.endswith(b"\r\n")
    # Only line ends change: the text between them is kept.
    assert out.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(
        b"\r", b"").replace(b"\n", b"")
    assert normalize_crlf(out) == out


@pytest.mark.parametrize("code,msg,enhanced,text,permanent,ok", [
    (250, "2.0.0 Ok: queued as X", "2.0.0", "Ok: queued as X", False, True),
    (250, "Ok", "2.0.0", "Ok", False, True),
    (550, "5.1.1 no such\nuser", "5.1.1", "no such user", True, False),
    (451, "4.3.0 try later", "4.3.0", "try later", False, False),
    (450, "5.1.1 mismatched class", "4.0.0", "5.1.1 mismatched class", False, False),
    # an Arabic-Indic digit is no RFC 3463 digit (str's \d took it: dsn=5.\u0661.1)
    (550, "5.\u0661.1 no such user", "5.0.0", "5.\u0661.1 no such user", True, False),
])
def test_reply_result(code: int, msg: str, enhanced: str, text: str, permanent: bool,
                      ok: bool) -> None:
    r = reply_result(code, msg, "mx [192.0.2.1]:25")
    assert (r.code, r.enhanced, r.text, r.permanent, r.ok) == \
        (code, enhanced, text, permanent, ok)
    assert r.remote == "mx [192.0.2.1]:25"


def test_dot_stuff() -> None:
    from authrelay.delivery.client import dot_stuff

    assert dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"x.y\r\n") == b"x.y\r\n.\r\n"


def test_own_listener_is_a_mail_loop() -> None:
    """delivery/mx.is_own_listener: an MX address that is one of our [[listen]] sockets
    (exactly, any local address of its family for a wildcard one, what `localhost` binds
    to), never a host elsewhere or on another port."""
    own = listener_addresses([("127.0.0.1", 2525), ("0.0.0.0", 25), ("localhost", 587),
                              ("::", 465)])
    assert is_own_listener(own, "127.0.0.1", 2525)
    assert not is_own_listener(own, "127.0.0.2", 2525)  # another host's address
    assert is_own_listener(own, "127.0.0.7", 25)  # wildcard: every local address
    assert is_own_listener(own, "::ffff:127.0.0.7", 25)
    assert not is_own_listener(own, "192.0.2.1", 25)  # TEST-NET: not this machine
    assert is_own_listener(own, "127.0.0.1", 587)  # localhost binds 127.0.0.1
    assert is_own_listener(own, "::1", 465)
    assert not is_own_listener(own, "127.0.0.1", 26)
    assert not is_own_listener(own, "not-an-ip", 25)


def test_a_loopback_neighbour_is_not_a_mail_loop() -> None:
    """Only the addresses our sockets take are us: a `localhost` listener is bound to
    127.0.0.1 (smtpd/server.bind, IPv4), so another MTA on 127.0.0.3 or ::1 at that port
    is another server, and "0.0.0.0" takes no IPv6 nor "::" (IPV6_V6ONLY) IPv4: an MX
    there was refused as a loop, 554 5.4.6, and its mail bounced though nothing loops."""
    own = listener_addresses([("localhost", 587), ("0.0.0.0", 25), ("::", 465)])
    assert not is_own_listener(own, "127.0.0.3", 587)
    assert not is_own_listener(own, "::1", 587)
    assert not is_own_listener(own, "::1", 25)
    assert not is_own_listener(own, "127.0.0.1", 465)
    assert not is_own_listener(own, "::ffff:127.0.0.1", 465)


def test_the_unspecified_address_is_the_loopback_it_reaches() -> None:
    """An MX at 0.0.0.0 or :: (a sinkhole's or a blocking resolver's answer) is no host
    elsewhere: a connect() to it reaches this machine's loopback, so with our listener on
    127.0.0.1 (or ::1, or `localhost`) the courier connected to itself and the sender's
    bounce said "550 5.7.1 Relaying denied". It is that loopback address for the check."""
    own = listener_addresses([("127.0.0.1", 2525), ("localhost", 587), ("::1", 465),
                              ("0.0.0.0", 25)])
    assert is_own_listener(own, "0.0.0.0", 2525)
    assert is_own_listener(own, "0.0.0.0", 587)
    assert is_own_listener(own, "::", 465)
    assert is_own_listener(own, "0.0.0.0", 25)  # as before: the wildcard takes it
    assert is_own_listener(own, "::ffff:0.0.0.0", 2525)
    assert not is_own_listener(own, "::", 2525)  # reaches ::1, where nothing of ours is
    assert not is_own_listener(own, "0.0.0.0", 465)


def test_a_listener_named_by_dns_is_never_resolved_for_the_loop_check() -> None:
    """Only `localhost` names are resolved (locally, RFC 6761): the courier is built on the
    master's event loop at each reload, and a listener named by a DNS name would have it
    wait on the DNS there. Such a listener is not taken for us (as before the check)."""
    assert listener_addresses([(socket.gethostname(), 25)]) == []
    assert listener_addresses([("localhost", 25)]) == [("127.0.0.1", 25)]
