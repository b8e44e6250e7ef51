"""The courier against a broken or hostile next hop, byte for byte (tests/fakes/rawmx.py).

Every case ends in a precise result and `status=host failed` line (the scheduler turns
the result into the `stat=Deferred (...)` / `stat=Bounced (...)` delivery line), no
traceback, the message neither lost (counted sent where the next hop did not take it)
nor sent twice within the attempt: replies split byte by byte, a multiline reply whose
code changes, replies that never end, absurd SIZE values, a STARTTLS answered 220 and
then plain text, a 354 to MAIL, a TLS close_notify in the middle of the message, a next
hop that reads nothing more (the courier's other deliveries go on meanwhile).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from fakes.dnsserver import FakeDNSServer
from fakes.rawmx import RawMX, verbs
from support.certs import server_tls_context
from support.maillog import ListLog
from support.ports import common_free_port
from test_delivery import MSG, ZONES, envelope, make_cfg

from authrelay.delivery import client, wire
from authrelay.delivery.client import Courier
from authrelay.types import DeliveryResult

pytestmark = pytest.mark.slow

_PIPELINING = b"250-raw.test\r\n250 PIPELINING\r\n"


@pytest.fixture
def dns(dns_server: FakeDNSServer) -> FakeDNSServer:
    dns_server.set_zones(ZONES)
    dns_server.update({"example.test": {"MX": [(10, "mx1.example.test")]},
                       "other.test": {"MX": [(10, "mx2.example.test")]}})
    return dns_server


@pytest.fixture
def port() -> Iterator[int]:
    yield common_free_port(("127.0.0.2", "127.0.0.3"))


async def _one(tmp_path: Path, dns: FakeDNSServer, port: int, script: Any,
               message: bytes | Path = MSG, **delivery: Any
               ) -> tuple[DeliveryResult, RawMX, ListLog, str]:
    """One message to bob@example.test through a RawMX running `script`: bob's result,
    the server, the maillog and the queue id."""
    ml = ListLog()
    with RawMX("127.0.0.2", port, script) as mx:
        courier = Courier(make_cfg(tmp_path, dns, port, **delivery), maillog=ml)
        try:
            env = envelope("bob@example.test")
            res = await courier.deliver(env, env.recipients, message)
        finally:
            await courier.close()
    return res["bob@example.test"], mx, ml, env.queue_id


def _big(tmp_path: Path, mib: int = 3) -> Path:
    """A message streamed from its file (past client._NORMALIZE_OFFLOAD) of `mib` MiB."""
    path = tmp_path / "big.eml"
    path.write_bytes(MSG + (b"y" * 76 + b"\r\n") * ((mib << 20) // 78))
    assert path.stat().st_size > client._NORMALIZE_OFFLOAD
    return path


def _dot(mx: RawMX) -> None:
    """verbs()'s at_dot: the end-of-data dot was read (the next hop has the message)."""
    mx.received.append(b"dot")


def _deferred(r: DeliveryResult, enhanced: str, *words: str) -> None:
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, False, 451, enhanced), r
    for w in words:
        assert w in r.text, (w, r.text)


# --------------------------------------------------------------------------- replies

@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_replies_split_byte_by_byte_deliver(
        tmp_path: Path, dns: FakeDNSServer, port: int, pipelining: bool) -> None:
    """Every reply written one octet per segment (TCP_NODELAY), multiline EHLO included:
    the parser joins them; the message is delivered once."""
    ehlo = b"250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n" if pipelining \
        else b"250-raw.test\r\n250 8BITMIME\r\n"

    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def say(data: bytes) -> None:
            for i in range(len(data)):
                w.write(data[i:i + 1])
                await w.drain()
        await say(b"220 raw.test ESMTP\r\n")
        while line := await r.readline():
            verb = line[:4].upper()
            if verb == b"QUIT":
                await say(b"221 bye\r\n")
                return
            if verb == b"DATA":
                await say(b"354 go ahead\r\n")
                while await r.readline() not in (b".\r\n", b""):
                    pass
                mx.received.append(b"message")
                await say(b"250-2.0.0 taken\r\n250 2.0.0 as one\r\n")
            else:
                await say(ehlo if verb == b"EHLO" else b"250 ok\r\n")

    r, mx, _, _ = await _one(tmp_path, dns, port, script)
    assert r.ok and r.text == "taken 2.0.0 as one", r
    assert mx.received.count(b"message") == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_a_multiline_reply_whose_code_changes_defers(
        tmp_path: Path, dns: FakeDNSServer, port: int, pipelining: bool) -> None:
    """RCPT answered `250-` then `550 ` (one reply, two codes: RFC 5321 4.2.1 has every
    line of a reply carry the same code): not a reply, so neither accepted nor refused:
    the host failed 451 4.5.0 naming it, nothing sent, the recipient deferred."""
    r, mx, ml, qid = await _one(tmp_path, dns, port, verbs({
        b"EHLO": _PIPELINING if pipelining else b"250 raw.test\r\n",
        b"RCPT": b"250-2.1.5 ok\r\n550 5.1.1 no such user\r\n",
        b"DATA": b"354 go ahead\r\n"}, at_dot=_dot))
    _deferred(r, "4.5.0", "protocol error", "reply code changed within a reply: 250 -> 550")
    assert b"dot" not in mx.received
    assert ml.grep(qid, "status=host failed", "reply code changed"), ml.lines


@pytest.mark.parametrize("endless", ["line", "lines"])
async def test_a_reply_that_never_ends_defers_within_bounded_memory(
        tmp_path: Path, dns: FakeDNSServer, port: int, endless: str) -> None:
    """A reply to MAIL that never ends: one line without end (64 KiB writes for as long
    as the connection is open), or continuation lines for ever. The parser keeps at most
    wire.MAX_LINE octets of a line and wire.MAX_LINES lines of a reply: the connection is
    cut there (the server's writes fail) and the host failed 451 4.5.0, saying which."""
    chunk = b"x" * 65536 if endless == "line" else b"250-" + b"y" * 60 + b"\r\n"

    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 raw.test ESMTP\r\n")
        while line := await r.readline():
            if line[:4].upper() == b"MAIL":
                w.write(b"250-")
                mx.sent = 0
                try:
                    while True:  # until the client cuts the connection
                        w.write(chunk)
                        await w.drain()
                        mx.sent += len(chunk)
                except (ConnectionError, OSError):
                    return
            w.write(_PIPELINING if line[:4].upper() == b"EHLO" else b"250 ok\r\n")
            await w.drain()

    r, mx, ml, qid = await _one(tmp_path, dns, port, script)
    said = f"reply line longer than {wire.MAX_LINE} bytes" if endless == "line" \
        else f"reply of more than {wire.MAX_LINES} lines"
    _deferred(r, "4.5.0", "protocol error", said)
    assert ml.grep(qid, "status=host failed", said), ml.lines
    # cut within the kernel's socket buffers' worth past the limit, not after gigabytes
    assert mx.sent < 32 << 20, mx.sent


@pytest.mark.parametrize(("size", "bounced"), [
    ("1", True),
    ("99999999999999999999", False),  # 20 digits: RFC 1870's most, larger than any message
    ("1" + "0" * 40, False),  # past 20 digits: no limit stated (as Postfix ignores it)
    ("0", False),  # RFC 1870 4: no fixed limit
])
async def test_an_absurd_size_limit(tmp_path: Path, dns: FakeDNSServer, port: int,
                                    size: str, bounced: bool) -> None:
    """EHLO's SIZE with absurd values: a limit below the message bounces it 552 5.3.4
    before MAIL (RFC 1870 6: never send what the peer announced it refuses); a huge
    value, one of more than 20 digits or 0 is no limit, and the message goes."""
    r, mx, _, _ = await _one(tmp_path, dns, port, verbs({
        b"EHLO": f"250-raw.test\r\n250-PIPELINING\r\n250 SIZE {size}\r\n".encode(),
        b"DATA": b"354 go ahead\r\n"}))
    if bounced:
        assert (r.ok, r.permanent, r.code, r.enhanced) == (False, True, 552, "5.3.4"), r
        assert f"exceeds the size limit {size} of" in r.text, r
        assert not any(ln.upper().startswith(b"MAIL") for ln in mx.received)
    else:
        assert r.ok and mx.received.count(b"message") == 1, r


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_a_354_to_mail_sends_no_message(
        tmp_path: Path, dns: FakeDNSServer, port: int, pipelining: bool) -> None:
    """MAIL answered 354 (a next hop that took MAIL for DATA): not the reply MAIL wants,
    so 451 4.5.0 "unexpected reply 354", the connection dropped; no end-of-data dot
    goes out (what followed would be taken for a message)."""
    r, mx, ml, qid = await _one(tmp_path, dns, port, verbs({
        b"EHLO": _PIPELINING if pipelining else b"250 raw.test\r\n",
        b"MAIL": b"354 go ahead\r\n"}))
    _deferred(r, "4.5.0", "unexpected reply 354 go ahead")
    assert b".\r\n" not in mx.received
    assert ml.grep(qid, "status=host failed", "unexpected reply 354"), ml.lines


# --------------------------------------------------------------------------- TLS

def _starttls_hop(ctx: ssl.SSLContext | None) -> Any:
    """A RawMX script offering STARTTLS (and PIPELINING), answering it 220. Without `ctx`
    plain SMTP text follows where the TLS handshake was due; with it TLS starts, and
    after its 354 the next hop reads 100,000 octets of the message and ends TLS
    (close_notify, then FIN). `mx.received` gets b"tls" and b"cut" as they happen."""
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 raw.test ESMTP\r\n")
        while line := await r.readline():
            verb = line[:4].upper()
            mx.received.append(line)
            if verb == b"STAR":
                w.write(b"220 2.0.0 go ahead\r\n")
                await w.drain()
                if ctx is None:
                    await r.read(1)  # the ClientHello's first octet
                    w.write(b"250 2.0.0 plain text after all\r\n")
                    await w.drain()
                    await r.read()
                    return
                await w.start_tls(ctx)
                mx.received.append(b"tls")
                continue
            if verb == b"DATA":
                w.write(b"354 go ahead\r\n")
                await w.drain()
                await r.readexactly(100_000)  # some of the message, then close_notify
                mx.received.append(b"cut")
                return  # RawMX closes the writer: close_notify, FIN
            w.write(b"250-raw.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
                    if verb == b"EHLO" else b"250 ok\r\n")
            await w.drain()
    return script


async def test_starttls_answered_220_then_plain_text(
        tmp_path: Path, dns: FakeDNSServer, port: int) -> None:
    """STARTTLS answered 220, then plain SMTP text where the TLS handshake was due: the
    handshake fails (4.7.5, `TLS handshake failed` logged, policy may: plain text for
    the next attempts to this host), nothing is sent in this attempt."""
    r, mx, ml, qid = await _one(tmp_path, dns, port, _starttls_hop(None))
    _deferred(r, "4.7.5", "TLS handshake with", "failed")
    assert ml.grep(qid, "status=TLS handshake failed"), ml.lines
    assert ml.grep(qid, "status=host failed", "4.7.5"), ml.lines
    assert not any(ln.upper().startswith(b"MAIL") for ln in mx.received)


async def test_a_tls_close_notify_in_the_middle_of_the_message(
        tmp_path: Path, dns: FakeDNSServer, port: int, trustme_ca: trustme.CA) -> None:
    """The next hop ends TLS (close_notify, then FIN) while the message comes: 4.4.2 lost
    connection during DATA, and not "may have been delivered" (the dot never went out):
    deferred, the next attempt sends it once."""
    ctx = server_tls_context(trustme_ca, "mx1.example.test")
    r, mx, _, _ = await _one(tmp_path, dns, port, _starttls_hop(ctx), _big(tmp_path))
    assert b"tls" in mx.received and b"cut" in mx.received
    _deferred(r, "4.4.2", "lost connection", "during DATA")
    assert "may have been delivered" not in r.text, r


# --------------------------------------------------------------------------- stalls

async def test_a_next_hop_that_reads_nothing_times_out_and_holds_no_other_delivery(
        tmp_path: Path, dns: FakeDNSServer, port: int) -> None:
    """After its 354 the next hop reads nothing more (a full receive window): the
    message's writes wait for the socket buffer, each wait bounded by data_timeout: the
    attempt ends 451 4.4.2 "timeout after DATA" (no dot sent: not "may have been
    delivered": 64 MiB, more than the kernel's socket buffers take), the connection
    not kept; meanwhile another delivery through the same courier, to another next hop,
    goes through (the event loop is not held)."""
    stalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    ml = ListLog()
    silent = verbs({b"EHLO": _PIPELINING, b"DATA": b"354 go ahead\r\n"},
                   stall=lambda mx: loop.call_soon_threadsafe(stalled.set))
    with RawMX("127.0.0.2", port, silent), \
            RawMX("127.0.0.3", port, verbs({b"DATA": b"354 go ahead\r\n"})) as other:
        courier = Courier(make_cfg(tmp_path, dns, port, data_timeout="2s"), maillog=ml)
        try:
            env = envelope("bob@example.test")
            stuck = asyncio.create_task(courier.deliver(env, env.recipients,
                                                        _big(tmp_path, 64)))
            await stalled.wait()
            env2 = envelope("carol@other.test")
            ok = (await courier.deliver(env2, env2.recipients, MSG))["carol@other.test"]
            assert ok.ok and other.received.count(b"message") == 1, ok
            r = (await stuck)["bob@example.test"]
            assert not any(key[0] == "mx1.example.test" for key in courier._idle)
        finally:
            await courier.close()
    _deferred(r, "4.4.2", "timeout after DATA")
    assert "may have been delivered" not in r.text, r
