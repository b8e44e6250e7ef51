"""A DNS reply to another question is no answer to ours.

The courier's MX, A and AAAA queries are sent by its own exchange (dns._exchange, for the
answer's size bound), which took any datagram carrying the query's id for the reply: a
server (or a spoofer that guessed the id) answering another name's question had that
name's records used for ours, the message delivered to the other domain's MX; one
answering another type's question raised AttributeError out of the lookup (a traceback).
dnspython's own exchange ignores a datagram that does not answer the question asked
(`Message.is_response`); so does ours now, and over TCP such a reply makes that server's
answer unusable. A real DNS server on loopback (tests/fakes/dnsserver.py) answers as told.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import dns.message
import dns.rrset
import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import RelayProcess
from test_e2e_delivery import gone, log_lines, mx_overrides, submit

from authrelay.delivery.mx import resolve_route
from authrelay.dns import DnsTemporary, Resolver

ZONES = {
    "victim.test": {"MX": [(10, "mx.victim.test")], "A": ["127.0.0.4"]},
    "mx.victim.test": {"A": ["127.0.0.2"]},
    "other.test": {"MX": [(10, "mx.other.test")]},
    "mx.other.test": {"A": ["127.0.0.3"]},
}


@pytest.fixture
def zones() -> Iterator[FakeDNSServer]:
    srv = FakeDNSServer(ZONES).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("other", [("other.test", "MX"), ("victim.test", "A"),
                                   ("mx.other.test", "A")],
                         ids=["another-name", "another-type", "another-host"])
async def test_a_reply_to_another_question_is_not_the_answer(
        zones: FakeDNSServer, other: tuple[str, str], tcp: bool) -> None:
    if tcp:
        zones.udp_limit = 1  # every UDP answer truncated: asked again over TCP
        zones.stop()
        zones.start()
    asked = "mx.victim.test" if other[0] == "mx.other.test" else "victim.test"
    zones.misanswer[asked] = other
    r = Resolver([zones.nameserver], 1.0)
    with pytest.raises(DnsTemporary,
                       match="another question" if tcp else "DNS lookup timed out"):
        if asked == "victim.test":
            await r.mx(asked)
        else:
            await r.addresses(asked)
    with pytest.raises(Exception) as e:
        await resolve_route(r, "victim.test")
    assert "4.4.3" in str(e.value) and "127.0.0.3" not in str(e.value), e.value
    # The other names are answered as before.
    assert await r.mx("other.test") == [(10, "mx.other.test")]
    assert await r.addresses("mx.other.test") == ["127.0.0.3"]


async def test_a_spoofed_datagram_before_the_answer_is_ignored() -> None:
    """A reply with the query's id answering another name, sent first, then the real
    answer: the real one is read (as dnspython's exchange does), not a failure."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        data, peer = await loop.sock_recvfrom(sock, 65535)
        q = dns.message.from_wire(data)
        spoof = dns.message.make_query("other.test.", "MX")
        spoof.id = q.id
        wrong = dns.message.make_response(spoof)
        wrong.answer.append(dns.rrset.from_text("other.test.", 60, "IN", "MX",
                                                "10 mx.other.test."))
        right = dns.message.make_response(q)
        right.answer.append(dns.rrset.from_text("victim.test.", 60, "IN", "MX",
                                                "10 mx.victim.test."))
        await loop.sock_sendto(sock, wrong.to_wire(), peer)
        await loop.sock_sendto(sock, right.to_wire(), peer)

    server = asyncio.create_task(serve())
    try:
        r = Resolver([f"127.0.0.1:{sock.getsockname()[1]}"], 5.0)
        assert await r.mx("victim.test") == [(10, "mx.victim.test")]
        await server
    finally:
        sock.close()


@pytest.mark.slow
def test_a_message_is_not_delivered_to_the_mx_of_a_name_never_asked(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """Through `serve`: victim.test's MX query answered with example.test's MX (its
    hosts on 127.0.0.2 and 3): the message was delivered there. Now the lookup finds no
    answer and the message waits, deferred 4.4.3."""
    mx1 = fake_mx("127.0.0.2")
    dns.misanswer["victim.test"] = ("example.test", "MX")
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"]))
    qid = submit(relay, ["bob@victim.test"])
    line = relay.wait_for(lambda: next(
        (ln for ln in log_lines(relay, qid) if "stat=" in ln), None),
        what="the delivery line")
    assert "stat=Deferred (451 4.4.3 DNS lookup failed for victim.test" in line, line
    assert not mx1.messages and mx1.connections == 0
    assert not gone(relay, qid)
    assert "Traceback" not in relay.maillog()
