"""A hostile zone's oversized DNS answer is refused before it is parsed.

dnspython parses an answer on the event loop: a 64 KiB MX answer took it ~0.5 s, once per
lookup wave, stalling every other delivery of the master. Answers to MX, A, AAAA and TLSA
over dns.MAX_ANSWER are refused unread (a temporary failure saying so); a real DNS server
on loopback (tests/fakes/dnsserver.py) serves them, truncating UDP past 1232 bytes as a
server does, so the big answer comes over TCP.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes.dnsserver import FakeDNSServer

from authrelay.dns import DnsTemporary, Resolver

HOSTILE_MX = [(10, f"mx{i:04d}.hostile.test") for i in range(2000)]  # ~60 KiB
HOSTILE_A = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(3000)]  # ~48 KiB


@pytest.fixture
def zones() -> Iterator[FakeDNSServer]:
    srv = FakeDNSServer({
        "hostile.test": {"MX": HOSTILE_MX},
        "many.hostile.test": {"A": HOSTILE_A},
        "_25._tcp.mx.hostile.test": {"TLSA": [b"\x03\x00\x00" + bytes(1500)] * 40},
        "fine.test": {"MX": [(10, "mx.fine.test")]},
        "mx.fine.test": {"A": ["127.0.0.2"]},
    }, udp_limit=1232).start()
    try:
        yield srv
    finally:
        srv.stop()


async def test_an_oversized_mx_or_address_answer_is_refused_unparsed(
        zones: FakeDNSServer) -> None:
    r = Resolver([zones.nameserver], 5.0)
    with pytest.raises(DnsTemporary, match="DNS answer refused: larger than"):
        await r.mx("hostile.test")
    with pytest.raises(DnsTemporary, match="DNS answer refused: larger than"):
        await r.addresses("many.hostile.test")
    # An ordinary answer, over the same server, as before.
    assert await r.mx("fine.test") == [(10, "mx.fine.test")]
    assert await r.addresses("mx.fine.test") == ["127.0.0.2"]


async def test_an_oversized_tlsa_answer_is_refused_unparsed(zones: FakeDNSServer) -> None:
    r = Resolver([zones.nameserver], 5.0)
    with pytest.raises(DnsTemporary, match="DNS error: a DNS answer of"):
        await r.tlsa_answer("_25._tcp.mx.hostile.test")
