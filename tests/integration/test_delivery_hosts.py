"""The outbound client's own SMTP engine against real sockets: PIPELINING seen at the MX,
the plain-text fallback after a failed STARTTLS handshake (tls = may only), failed hosts
in the maillog, 4xx at RCPT moving recipients to the backup MX, STARTTLS injection.

Fake DNS (dnslib) and fake MX hosts (aiosmtpd, plus one raw asyncio server for what
aiosmtpd cannot do) on 127.0.0.x; the maillog is captured in memory."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from fakes.dnsserver import FakeDNSServer
from fakes.rawmx import RawMX, new_connection, verbs
from fakes.smtpserver import MXFactory
from support.certs import server_tls_context
from support.maillog import ListLog
from support.ports import common_free_port, free_port
from support.wait import DEADLINE, until
from test_delivery import MSG, ZONES, envelope, make_cfg, smart_cfg

from authrelay.config import Config
from authrelay.delivery import client, connection, mx, wire
from authrelay.delivery.client import Courier
from authrelay.dns import Resolver
from authrelay.scheduler import inflight
from authrelay.scheduler.inflight import InflightJournal
from authrelay.spool.envelope import Envelope
from authrelay.types import DeliveryResult

pytestmark = pytest.mark.slow


@pytest.fixture
def dns(dns_server: FakeDNSServer) -> FakeDNSServer:
    dns_server.set_zones(ZONES)
    return dns_server


async def deliver(courier: Courier, env: Envelope, message: bytes = MSG) -> dict:
    return await courier.deliver(env, env.recipients, message)


def one_mx(dns: FakeDNSServer) -> None:
    dns.update({"example.test": {"MX": [(10, "mx1.example.test")]}})


# --------------------------------------------------------------------------- PIPELINING

async def test_pipelining_mail_rcpts_data_in_one_segment(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    env = envelope("a@example.test", "b@example.test", "c@example.test")
    try:
        res = await deliver(courier, env)
    finally:
        await courier.close()
    assert all(r.ok for r in res.values()), res
    assert mx.messages[0].rcpt_tos == ["a@example.test", "b@example.test", "c@example.test"]
    # RFC 2920 3.1: MAIL, every RCPT and DATA leave in one write; on loopback the MX's
    # single read returns them together.
    group = [c for c in mx.reads[0] if c.startswith(b"MAIL FROM:")]
    assert len(group) == 1, mx.reads[0]
    assert group[0].count(b"RCPT TO:") == 3 and group[0].endswith(b"DATA\r\n")
    assert mx.wire[0].count(b"MAIL FROM:") == 1


async def test_no_pipelining_one_command_per_round_trip(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", pipelining=False, rcpt_replies={
        "nobody@example.test": "550 5.1.1 no such user"})
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    env = envelope("a@example.test", "nobody@example.test")
    try:
        res = await deliver(courier, env)
    finally:
        await courier.close()
    assert res["a@example.test"].ok and res["nobody@example.test"].enhanced == "5.1.1"
    for chunk in mx.reads[0]:  # every command waited for the previous reply
        assert chunk.count(b"\r\n") == 1 or not chunk.startswith((b"MAIL", b"RCPT")), chunk


@pytest.mark.parametrize("refusal", ["550 5.1.1 unknown", "450 4.2.1 try later"])
async def test_pipelined_group_all_refused_reused_only_after_a_transient_refusal(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, refusal: str) -> None:
    """Every RCPT refused: DATA is refused too (503). Refused for now, the transaction is
    reset and the connection serves the next message; refused for good, the refusal
    stands only once QUIT is answered 221 in step (Courier._settle: no 354 showed the
    replies in step), and the next message takes a new connection."""
    mx = fake_mx("127.0.0.2", rcpt_replies={"x@example.test": refusal})
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        bad = await deliver(courier, envelope("x@example.test"))
        assert bad["x@example.test"].code == int(refusal[:3]), bad
        good = await deliver(courier, envelope("y@example.test"))
        assert good["y@example.test"].ok
    finally:
        await courier.close()
    assert len(mx.messages) == 1
    if refusal.startswith("5"):
        assert mx.connections == 2
        assert b"RSET\r\n" not in mx.wire[0] and mx.wire[0].endswith(b"QUIT\r\n")
    else:
        assert mx.connections == 1 and b"RSET\r\n" in mx.wire[0]


async def test_pipelined_mail_refused_permanently(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", mail_reply="553 5.7.1 sender rejected")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        res = await deliver(courier, envelope("a@example.test", "b@example.test"))
    finally:
        await courier.close()
    assert {(r.code, r.enhanced) for r in res.values()} == {(553, "5.7.1")}
    assert mx.messages == []


# --------------------------------------------------------------------------- TLS fallback

async def test_starttls_handshake_failure_plain_on_next_attempt(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    one_mx(dns)
    mx = fake_mx("127.0.0.2", broken_starttls=True)
    ml = ListLog()
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ml)
    env = envelope("bob@example.test")
    try:
        first = (await deliver(courier, env))["bob@example.test"]
        assert (first.permanent, first.enhanced) == (False, "4.7.5"), first
        assert mx.messages == [] and mx.starttls_attempts == 1
        assert ml.grep(env.queue_id, "status=TLS handshake failed", "plain text")
        second = (await deliver(courier, env))["bob@example.test"]
        assert second.ok, second
    finally:
        await courier.close()
    assert mx.starttls_attempts == 1  # the second connection did not ask for TLS
    assert mx.connections == 2 and b"STARTTLS" not in mx.wire[1]
    assert mx.messages[0].tls is False and mx.messages[0].connection == 2
    assert ml.grep(env.queue_id, "tls=not used")


@pytest.mark.parametrize("setting", [{"tls": "encrypt"}, {"tls_verify": True},
                                     {"tls_fallback_time": "0s"}])
async def test_no_plain_fallback_with_required_or_verified_tls(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        setting: dict[str, Any]) -> None:
    one_mx(dns)
    mx = fake_mx("127.0.0.2", broken_starttls=True)
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port, **setting), maillog=ListLog())
    env = envelope("bob@example.test")
    try:
        for attempt in (1, 2):
            r = (await deliver(courier, env))["bob@example.test"]
            assert (r.permanent, r.enhanced) == (False, "4.7.5"), r
            assert mx.starttls_attempts == attempt
    finally:
        await courier.close()
    assert mx.messages == [] and b"MAIL FROM" not in b"".join(mx.wire)


async def test_no_plain_fallback_for_smart_host(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    sh = fake_mx("127.0.0.2", broken_starttls=True, users={"relayuser": "s3cret pass"})
    courier = Courier(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file), maillog=ListLog())
    env = envelope("x@far.test")
    try:
        for attempt in (1, 2):
            r = (await deliver(courier, env))["x@far.test"]
            assert (r.permanent, r.enhanced) == (False, "4.7.5"), r
            assert sh.starttls_attempts == attempt
    finally:
        await courier.close()
    assert sh.messages == [] and b"AUTH" not in b"".join(sh.wire)


async def test_fallback_is_per_host(tmp_path: Path, dns: FakeDNSServer,
                                    fake_mx: MXFactory, trustme_ca: Any) -> None:
    """mx1's broken TLS sends mx1 to plain text, not mx2, which still gets TLS."""
    mx1 = fake_mx("127.0.0.2", broken_starttls=True)
    mx2 = fake_mx("127.0.0.3", starttls_context=server_tls_context(trustme_ca, "x.test"))
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        assert r.ok and r.remote.startswith("mx2.example.test")  # same attempt: next MX
        assert mx2.messages[0].tls is True
    finally:
        await courier.close()
    assert mx1.starttls_attempts == 1


# --------------------------------------------------------------------------- failed hosts

async def test_dead_first_mx_logged_when_second_succeeds(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx2 = fake_mx("127.0.0.3")
    dns.update({"mx1.example.test": {"A": ["127.0.0.9"]}})  # nothing listens there
    ml = ListLog()
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ml)
    env = envelope("bob@example.test")
    try:
        assert (await deliver(courier, env))["bob@example.test"].ok
    finally:
        await courier.close()
    assert len(mx2.messages) == 1
    where = f"mx1.example.test [127.0.0.9]:{fake_mx.port}"
    lines = ml.grep(env.queue_id, f"relay={where}", "status=host failed")
    assert len(lines) == 1, ml.lines
    assert f"connect to {where}: connection refused" in lines[0]
    assert "4.4.1" in lines[0]


async def test_every_failed_host_logged(tmp_path: Path, dns: FakeDNSServer,
                                        fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", greeting="421 4.3.2 too busy")
    fake_mx("127.0.0.3", mail_reply="451 4.3.0 local problem")
    ml = ListLog()
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ml)
    env = envelope("bob@example.test")
    try:
        r = (await deliver(courier, env))["bob@example.test"]
    finally:
        await courier.close()
    assert (r.code, r.enhanced, r.permanent) == (451, "4.3.0", False)
    assert ml.grep(env.queue_id, "mx1.example.test [127.0.0.2]", "421 4.3.2 too busy")
    assert ml.grep(env.queue_id, "mx2.example.test [127.0.0.3]", "451 4.3.0 local problem")


# --------------------------------------------------------------------------- 4xx at RCPT

async def test_rcpt_450_on_primary_goes_to_backup(tmp_path: Path, dns: FakeDNSServer,
                                                  fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2", rcpt_replies={"b@example.test": "450 4.2.1 try later",
                                             "c@example.test": "550 5.1.1 unknown"})
    mx2 = fake_mx("127.0.0.3")
    ml = ListLog()
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ml)
    env = envelope("a@example.test", "b@example.test", "c@example.test")
    try:
        res = await deliver(courier, env)
    finally:
        await courier.close()
    assert res["a@example.test"].remote.startswith("mx1.example.test")
    assert res["b@example.test"].ok and res["b@example.test"].remote.startswith("mx2")
    assert res["c@example.test"].permanent  # a 5xx is final at the first host
    assert [m.rcpt_tos for m in mx1.messages] == [["a@example.test"]]
    assert [m.rcpt_tos for m in mx2.messages] == [["b@example.test"]]
    assert ml.grep(env.queue_id, "passed to the next host", "<b@example.test>",
                   "450 4.2.1")


async def test_rcpt_450_kept_when_backup_is_down(tmp_path: Path, dns: FakeDNSServer,
                                                 fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", rcpt_replies={"b@example.test": "450 4.2.1 try later"})
    # mx2: nothing listens
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    env = envelope("a@example.test", "b@example.test")
    try:
        res = await deliver(courier, env)
    finally:
        await courier.close()
    assert res["a@example.test"].ok
    b = res["b@example.test"]
    assert (b.code, b.enhanced, b.permanent) == (450, "4.2.1", False)


async def test_data_4xx_on_primary_goes_to_backup(tmp_path: Path, dns: FakeDNSServer,
                                                  fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", data_reply="451 4.3.0 queue full")
    mx2 = fake_mx("127.0.0.3")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
    finally:
        await courier.close()
    assert r.ok and r.remote.startswith("mx2") and len(mx2.messages) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_recipient_limit_452_next_transaction_same_connection(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, pipelining: bool) -> None:
    mx = fake_mx("127.0.0.2", max_rcpts=2, pipelining=pipelining)
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    rcpts = [f"r{i}@example.test" for i in range(5)]
    try:
        res = await deliver(courier, envelope(*rcpts))
    finally:
        await courier.close()
    assert all(res[r].ok for r in rcpts), res
    assert [m.rcpt_tos for m in mx.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    assert mx.connections == 1  # RFC 5321 4.5.3.1.10: the rest in new transactions


async def test_a_next_hop_taking_one_recipient_at_a_time_gets_a_bounded_number_of_uploads(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    """A next hop (hostile, or with a tiny limit) that takes one recipient per transaction
    and says 452 4.5.3 to the rest had the message sent again for each recipient, up to
    1,000 times in one attempt. Now at most MAX_TRANSACTIONS per attempt, all hosts
    together: the rest are deferred 4.5.3 for the next attempt, not handed to the backup
    MX (which would take as many again); every recipient has one result."""
    mx1 = fake_mx("127.0.0.2", max_rcpts=1)
    mx2 = fake_mx("127.0.0.3", max_rcpts=1)
    ml = ListLog()
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ml)
    limit = 20  # client.MAX_TRANSACTIONS, checked last
    n = limit + 10
    rcpts = [f"r{i}@example.test" for i in range(n)]
    env = envelope(*rcpts)
    try:
        res = await deliver(courier, env)
    finally:
        await courier.close()
    assert sorted(res) == sorted(rcpts)
    sent = [m.rcpt_tos for m in mx1.messages]
    assert sent == [[r] for r in rcpts[:limit]]
    assert mx2.messages == [] and mx1.connections == 1
    assert all(res[r].ok for r in rcpts[:limit])
    for r in rcpts[limit:]:
        d = res[r]
        assert (d.ok, d.permanent, d.code, d.enhanced) == (False, False, 452, "4.5.3"), d
        assert "not sent in this attempt" in d.text and "next attempt" in d.text, d
    # The next attempt (the scheduler passes the deferred ones) goes on from there.
    rest = [x for x in env.recipients if not res[x.address].ok]
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ml)
    try:
        again = await courier.deliver(env, rest, MSG)
    finally:
        await courier.close()
    assert all(r.ok for r in again.values()) and len(again) == 10
    assert len(mx1.messages) == n
    assert limit == client.MAX_TRANSACTIONS


# --------------------------------------------------------------------------- raw server

_STARTTLS_EHLO = b"250-raw.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
# RFC 3207 5 attack: a reply smuggled in before the TLS handshake
_injecting = verbs({b"EHLO": _STARTTLS_EHLO,
                     b"STAR": b"220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n"})


@pytest.fixture
def raw_port() -> Iterator[int]:
    yield free_port("127.0.0.2")


async def test_starttls_response_injection_refused(tmp_path: Path, dns: FakeDNSServer,
                                                   raw_port: int) -> None:
    one_mx(dns)
    cfg: Config = make_cfg(tmp_path, dns, raw_port)
    with RawMX("127.0.0.2", raw_port, _injecting) as mx:
        courier = Courier(cfg, maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    assert (r.permanent, r.enhanced) == (False, "4.5.0"), r
    assert not any(line.startswith(b"MAIL") for line in mx.received)


async def _slow_reader(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answers like a PIPELINING MX, but takes the message in small, slow reads."""
    w.write(b"220 raw.test ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        elif verb == b"DATA":
            w.write(b"354 go ahead\r\n")
            await w.drain()
            tail = b""
            while not tail.endswith(b"\r\n.\r\n"):
                chunk = await r.read(16384)
                if not chunk:
                    return
                mx.received.append(chunk)
                tail = (tail + chunk)[-5:]
                await asyncio.sleep(0.001)
            w.write(b"250 2.0.0 taken\r\n")
        elif verb == b"QUIT":
            w.write(b"221 bye\r\n")
            break
        else:
            w.write(b"250 ok\r\n")
        await w.drain()


async def test_large_message_streamed_with_flow_control(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12 MB spool file to an MX that reads slowly: the client waits for the socket
    buffer to drain (pause_writing/resume_writing) instead of queueing the message in
    memory; its write buffer never holds more than a chunk or so."""
    from authrelay.delivery import connection as conn_mod

    peak = [0]
    orig_write = conn_mod.Connection.write

    def write(self: conn_mod.Connection, data: bytes) -> None:
        orig_write(self, data)
        if self.transport is not None:
            peak[0] = max(peak[0], self.transport.get_write_buffer_size())

    monkeypatch.setattr(conn_mod.Connection, "write", write)
    one_mx(dns)
    body = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % i + b"y" * 70 + b"\r\n"
                                                 for i in range(150_000))
    path = tmp_path / "queue-file"
    path.write_bytes(body)
    with RawMX("127.0.0.2", raw_port, _slow_reader) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            env = envelope("bob@example.test")
            r = (await courier.deliver(env, env.recipients, path))["bob@example.test"]
        finally:
            await courier.close()
    assert r.ok, r
    assert b"".join(mx.received).endswith(b"\r\n.\r\n")
    assert len(b"".join(mx.received)) >= len(body)
    assert peak[0] < 2 * 1024 * 1024, peak[0]  # not the whole 12 MB


async def _says_421_when_done(mx: RawMX, r: asyncio.StreamReader,
                              w: asyncio.StreamWriter) -> None:
    """After each message: 250, then at once an unsolicited 421 (an idle-timeout close
    that did not close), so the cached connection must not be used again."""
    mx.connections = getattr(mx, "connections", 0) + 1
    w.write(b"220 raw.test ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        elif verb == b"DATA":
            w.write(b"354 go ahead\r\n")
            await w.drain()
            while await r.readline() not in (b".\r\n", b""):
                pass
            w.write(b"250 2.0.0 taken\r\n421 4.4.2 raw.test closing, idle\r\n")
            mx.received.append(b"message")
        elif verb == b"QUIT":
            w.write(b"221 bye\r\n")
            break
        else:
            w.write(b"250 ok\r\n")
        await w.drain()


async def test_cached_connection_with_unsolicited_421_not_reused(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, _says_421_when_done) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            for i in range(2):
                env = envelope(f"r{i}@example.test")
                r = (await courier.deliver(env, env.recipients, MSG))[f"r{i}@example.test"]
                assert r.ok and r.code == 250, r
        finally:
            await courier.close()
    assert mx.received == [b"message", b"message"]
    assert mx.connections == 2


# Offers STARTTLS but answers it with 454 (RFC 3207 4: TLS not available now).
_refuses_starttls = verbs({
    b"EHLO": _STARTTLS_EHLO,
    b"STAR": b"454 4.7.0 TLS not available due to temporary reason\r\n",
    b"DATA": b"354 go ahead\r\n"})


@pytest.mark.parametrize("tls", ["may", "encrypt"])
async def test_starttls_refused(tmp_path: Path, dns: FakeDNSServer, raw_port: int,
                                tls: str) -> None:
    """tls = may: a refused STARTTLS is as if it had not been offered (plain text, same
    connection); tls = encrypt: deferred 4.7.5, nothing sent."""
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, _refuses_starttls) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port, tls=tls), maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    mails = [ln for ln in mx.received if ln.startswith(b"MAIL")]
    if tls == "may":
        assert r.ok, r
        assert len(mails) == 1
    else:
        assert (r.permanent, r.enhanced) == (False, "4.7.5"), r
        assert mails == []


# Takes the whole message, then closes without answering the end of data.
_drops_after_the_dot = verbs({b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n",
                               b"DATA": b"354 go ahead\r\n", b".": None})


async def test_connection_lost_after_the_dot_may_be_a_duplicate(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """RFC 5321 6.1: the message is the next hop's once it answered the end of data; with
    no answer it may have it. Transient, no other MX tried (the backup 127.0.0.3 is not
    listening: trying it would say connection refused), and the reason, which the maillog
    and any later bounce carry, says that the retry may deliver it twice."""
    with RawMX("127.0.0.2", raw_port, _drops_after_the_dot) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    assert mx.received.count(b"message") == 1
    assert (r.permanent, r.enhanced) == (False, "4.4.2"), r
    assert "lost connection" in r.text and "may have been delivered" in r.text, r
    assert "deliver it twice" in r.text, r


def _odd_replies(greeting: bytes, rcpt: bytes, data: bytes) -> Any:
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(greeting)
        while line := await r.readline():
            mx.received.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                w.write(b"250-raw.test\r\n250 PIPELINING\r\n")
            elif verb == b"RCPT":
                w.write(rcpt)
            elif verb == b"DATA":
                w.write(data)
                if data.startswith(b"354"):
                    await w.drain()
                    lines = 0
                    while await r.readline() not in (b".\r\n", b""):
                        lines += 1
                    if lines:  # not the empty message sent when no RCPT was taken
                        mx.received.append(b"message")
                    w.write(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
    return script


@pytest.mark.parametrize(("greeting", "rcpt", "data", "delivered"), [
    # A greeting of 250 instead of 220, a 250 to DATA instead of 354: nothing was sent,
    # and the result was "sent" (the message then left the queue undelivered).
    (b"250 raw.test hello\r\n", b"250 ok\r\n", b"354 go\r\n", False),
    (b"220 raw.test ESMTP\r\n", b"250 ok\r\n", b"250 2.0.0 fine, no data needed\r\n", False),
    # 252 to RCPT: a positive completion (RFC 5321 4.2.1); it was "sent" without DATA.
    (b"220 raw.test ESMTP\r\n", b"252 2.1.5 will try\r\n", b"354 go\r\n", True),
])
async def test_a_positive_reply_out_of_place_never_counts_as_sent(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, greeting: bytes, rcpt: bytes,
        data: bytes, delivered: bool) -> None:
    """Only the reply to the end of data delivers a message: a recipient is "sent" only
    if the next hop got the message."""
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, _odd_replies(greeting, rcpt, data)) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    assert (b"message" in mx.received) == delivered
    assert r.ok == delivered, r
    if not delivered:
        assert (r.permanent, r.code, r.enhanced) == (False, 451, "4.5.0"), r
        assert "unexpected reply 250" in r.text, r


async def _answers_each_group_at_once(mx: RawMX, r: asyncio.StreamReader,
                                      w: asyncio.StreamWriter) -> None:
    """Reads a whole pipelined group, then writes its replies in one go (as a server that
    buffers its replies, as Postfix's smtpd does); counts transactions and recipients."""
    w.write(b"220 raw.test ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        elif verb == b"MAIL":
            n = 0
            while (nxt := await r.readline()).startswith(b"RCPT"):
                n += 1
            assert nxt.upper().startswith(b"DATA")
            w.write(b"250 ok\r\n" + b"250 ok\r\n" * n + b"354 go ahead\r\n")
            await w.drain()
            while await r.readline() not in (b".\r\n", b""):
                pass
            mx.received.append(b"%d" % n)
            w.write(b"250 2.0.0 taken\r\n")
        elif verb == b"QUIT":
            w.write(b"221 bye\r\n")
            break
        else:
            w.write(b"250 ok\r\n")
        await w.drain()


async def test_more_than_a_thousand_recipients_go_in_several_transactions(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """1100 recipients at one destination (max_recipients raised, or a smart host): one
    pipelined group of 1102 replies, sent at once, overflowed the connection's bound on
    unread replies (1024): the connection was cut and every recipient deferred, on every
    attempt until the message expired. Now 1000 go in one transaction, the rest in the
    next on the same connection."""
    one_mx(dns)
    rcpts = [f"r{i}@example.test" for i in range(1100)]
    with RawMX("127.0.0.2", raw_port, _answers_each_group_at_once) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            res = await deliver(courier, envelope(*rcpts))
        finally:
            await courier.close()
    assert sorted(res) == sorted(rcpts)
    assert all(r.ok for r in res.values()), [r for r in res.values() if not r.ok][:1]
    assert mx.received == [b"1000", b"100"]
    assert courier.connections_opened == 1


async def test_hostile_mx_rrset_tries_at_most_mx_address_limit_addresses(
        tmp_path: Path, dns: FakeDNSServer) -> None:
    """A hostile DNS answer: a domain whose MX records name ten hosts, the first with
    eight addresses, none of which answers (each a connect timeout in the wild). Every
    address of every host was looked up and tried, so one attempt held its delivery
    slot for as long as the attacker liked (thousands of addresses, 30 s each). Now, as
    Postfix's smtp_mx_address_limit: five addresses, from at most five hosts looked up."""
    hosts = [f"h{i}.many.test" for i in range(10)]
    dns.update({"many.test": {"MX": [(10 + i, h) for i, h in enumerate(hosts)]},
                hosts[0]: {"A": [f"127.0.0.{20 + i}" for i in range(8)]},
                **{h: {"A": [f"127.0.0.{40 + i}"]} for i, h in enumerate(hosts[1:])}})
    ml = ListLog()
    courier = Courier(make_cfg(tmp_path, dns, free_port()), maillog=ml)
    env = envelope("bob@many.test")
    try:
        res = (await deliver(courier, env))["bob@many.test"]
    finally:
        await courier.close()
    assert not res.ok and not res.permanent and res.enhanced == "4.4.1", res
    tried = ml.grep(env.queue_id, "status=host failed", "connection refused")
    assert len(tried) == 5, ml.lines
    assert all(f"{hosts[0]} [127.0.0.{20 + i}]" in ln for i, ln in enumerate(tried))
    looked_up = {q for q, t in dns.queries if t in ("A", "AAAA") and q.endswith("many.test")}
    assert looked_up == {hosts[0]}  # five addresses from the first: no more lookups

    dns.update({hosts[0]: {"A": ["127.0.0.20"]}})  # one address each: five hosts
    dns.queries.clear()
    env = envelope("bob@many.test")
    courier = Courier(make_cfg(tmp_path, dns, free_port()), maillog=ml)
    try:
        await deliver(courier, env)
    finally:
        await courier.close()
    assert len(ml.grep(env.queue_id, "status=host failed")) == 5
    looked_up = {q for q, t in dns.queries if t in ("A", "AAAA") and q.endswith("many.test")}
    assert looked_up == set(hosts[:5])


# A reply as big as the parser takes: 256 lines of 4000 octets (about 1 MiB).
_BIG_REPLY = (b"250-" + b"x" * 3996 + b"\r\n") * (wire.MAX_LINES - 1) + \
    b"250 " + b"x" * 3996 + b"\r\n"
_FLOOD = 64  # such replies sent unasked: 64 MiB (more than the kernel buffers hold)


async def _floods_replies(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(b"220 flood.test ESMTP\r\n")
    for _ in range(_FLOOD):
        w.write(_BIG_REPLY)
        await w.drain()
    w.write(b"250 2.0.0 end of the flood\r\n")
    await w.drain()
    mx.received.append(b"flood sent")
    await r.read()


async def test_a_flood_of_unasked_replies_costs_bounded_memory(raw_port: int) -> None:
    """A next hop that sends replies nobody asked for, each the largest the parser takes
    (256 lines of 4 KB): up to 1024 were kept unread (connection.MAX_QUEUED), a GiB per
    connection (measured: 600 such replies, 622 MB RSS), for every connection to that
    destination (20 at once) and every idle one in the cache. Now reading pauses while
    the unread replies cost more than MAX_UNREAD_BYTES (TCP holds the rest back at the
    server) and resumes as they are read: nothing is lost or reordered."""
    with RawMX("127.0.0.2", raw_port, _floods_replies) as mx:
        conn = await connection.open_connection("127.0.0.2", raw_port, timeout=10)
        try:
            assert (await conn.reply(10)).code == 220
            assert conn.transport is not None
            transport = conn.transport
            await until(lambda: not transport.is_reading(),
                        lambda: f"reading paused ({conn.unread_bytes} octets unread)")
            assert conn.unread_bytes <= connection.MAX_UNREAD_BYTES + 2 * len(_BIG_REPLY)
            assert not mx.received  # the server is held back, not drained into our memory
            replies = [await conn.reply(10) for _ in range(_FLOOD + 1)]
        finally:
            conn.abort()
    assert [len(rep.lines) for rep in replies[:-1]] == [wire.MAX_LINES] * _FLOOD
    assert str(replies[-1]) == "250 2.0.0 end of the flood"
    assert mx.received == [b"flood sent"]


# Replies of different costs, sent in pieces that split lines and replies, several
# replies per segment (a pipelined group's), a multi-line one across three segments.
_PIECES = [b"250 2.1.0 Ok\r\n250 2.1.5 Recipient ok, a longer text\r\n354 End",
           b" data with <CR><LF>.<CR><LF>\r\n250-first\r\n250-sec", b"ond line\r\n",
           b"250 third\r\n451 4.3.0 later\r\n", b"250 2.0.0 Ok: queued as 1\r\n"]


async def _sends_in_pieces(mx: RawMX, r: asyncio.StreamReader,
                           w: asyncio.StreamWriter) -> None:
    w.write(b"220 pieces.test ESMTP\r\n")
    await r.readline()  # the client's go
    for piece in _PIECES:
        w.write(piece)
        await w.drain()
        await asyncio.sleep(0.02)  # separate segments
    mx.received.append(b"all sent")
    await r.read()


async def test_unread_bytes_follow_each_reply_read(raw_port: int) -> None:
    """What the unread replies cost (`unread_bytes`, what reading pauses on) is each
    reply's cost, kept once per reply as it arrives (issue 22: it was computed twice, at
    arrival and at read) and taken off as that very reply is read: pinned over replies of
    different costs arriving split across segments and several per segment."""
    expected = wire.ReplyParser().feed(b"".join(_PIECES))
    costs = [connection._cost(rep) for rep in expected]
    assert len(set(costs)) == len(costs)  # a misaligned cost would show
    with RawMX("127.0.0.2", raw_port, _sends_in_pieces) as mx:
        conn = await connection.open_connection("127.0.0.2", raw_port, timeout=10)
        try:
            assert (await conn.reply(10)).code == 220
            assert conn.unread_bytes == 0
            conn.write(b"NOOP\r\n")
            first = await conn.reply(10)  # read as soon as it came: the rest arrives later
            await until(lambda: mx.received == [b"all sent"]
                        and conn.unread_bytes == sum(costs[1:]),
                        lambda: f"{conn.unread_bytes} octets unread")
            got = [first]
            for i in range(1, len(expected)):
                got.append(await conn.reply(10))
                assert conn.unread_bytes == sum(costs[i + 1:])
        finally:
            conn.abort()
    assert got == expected


async def _answers_as_told(mx: RawMX, r: asyncio.StreamReader,
                           w: asyncio.StreamWriter) -> None:
    w.write(b"220 told.test ESMTP\r\n")
    while line := await r.readline():
        if line.startswith(b"NOOP slow"):
            await asyncio.sleep(0.4)
        elif line.startswith(b"NOOP never"):
            continue
        w.write(b"250 2.0.0 " + line.split()[1] + b"\r\n")
        await w.drain()


async def test_each_reply_wait_keeps_its_own_time_limit(
        raw_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection's one timer, left armed between waits (issue 22: a timer per
    reply was armed and cancelled twice a message), ends each wait at that wait's own
    time: a wait shorter than the one before fails at its time, not at the earlier
    wait's; a longer one is not cut when the earlier wait's time comes. Under uvloop, the
    master's loop, a wait that runs out ends at the timer's first turn there or the next
    (its timers keep whole ms: one re-armed for the rest of a ms went off again and
    again, up to 200 turns a timeout)."""
    turns: list[float] = []
    alarm = connection.Connection._alarm

    def counted(self: connection.Connection) -> None:
        turns.append(self._due)
        alarm(self)

    monkeypatch.setattr(connection.Connection, "_alarm", counted)

    async def waits() -> None:
        conn = await connection.open_connection("127.0.0.2", raw_port, timeout=10)
        try:
            assert (await conn.reply(60)).code == 220
            conn.write(b"NOOP fast\r\n")
            assert str(await conn.reply(0.1)) == "250 2.0.0 fast"
            # The timer is armed for 0.1 s after the last wait began: this wait of 5 s
            # sees it go off on the way and goes on.
            conn.write(b"NOOP slow\r\n")
            assert str(await conn.reply(5)) == "250 2.0.0 slow"
            conn.write(b"NOOP fast\r\n")
            assert str(await conn.reply(60)) == "250 2.0.0 fast"
            # Armed for 60 s now: shorter waits still end at their own time.
            conn.write(b"NOOP never\r\n")
            for short in (0.3005, 0.0371, 0.0437, 0.0371):  # (times off whole ms)
                turns.clear()
                waiting = asyncio.ensure_future(conn.reply(short))
                done, _ = await asyncio.wait({waiting}, timeout=DEADLINE)
                assert waiting in done, "the short wait was not ended at its own time"
                assert type(waiting.exception()) is TimeoutError
                assert len(turns) <= 2, f"{len(turns)} turns of the timer for one timeout"
        finally:
            conn.abort()

    with RawMX("127.0.0.2", raw_port, _answers_as_told):
        await asyncio.to_thread(uvloop.run, waits())


async def test_no_address_reason_names_only_the_hosts_looked_up(
        dns: FakeDNSServer) -> None:
    """A domain whose 40 MX hosts have no address: at most mx_address_limit (5) are
    looked up, but the 5.4.4 reason named all 40 (a hostile RRset of thousands: a reason
    of tens of KB in the recipient's state, the maillog line and the bounce), hosts the
    attempt never asked about. It names the ones looked up."""
    hosts = [f"h{i:02}.nohost.test" for i in range(40)]
    dns.update({"nohost.test": {"MX": [(10 + i, h) for i, h in enumerate(hosts)]}})
    resolver = Resolver([dns.nameserver], 5)
    with pytest.raises(mx.RouteError) as e:
        await mx.resolve_route(resolver, "nohost.test", limit=5)
    res = e.value.result
    assert (res.permanent, res.enhanced) == (True, "5.4.4"), res
    assert res.text == f"no address found for the MX hosts of nohost.test " \
        f"({', '.join(hosts[:5])})"


_ESTABLISHED = 1  # tcp_info.tcpi_state (include/net/tcp_states.h)


def _tcp_state(sock: Any) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0])


async def _stops_reading_at_data(mx: RawMX, r: asyncio.StreamReader,
                                 w: asyncio.StreamWriter) -> None:
    """Takes the envelope, says 354, then never reads again (a zero TCP window)."""
    w.write(b"220 raw.test ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        elif verb == b"DATA":
            w.write(b"354 go ahead\r\n")
            await w.drain()
            mx.sockets.append(w.get_extra_info("socket"))
            await asyncio.Event().wait()  # until the test ends
        else:
            w.write(b"250 ok\r\n")
        await w.drain()


async def test_a_peer_that_stops_reading_does_not_keep_the_connection(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """A tarpit that takes the envelope and then stops reading the message: after
    data_timeout the delivery is deferred and the connection given up with QUIT, but
    asyncio's close() waits until the buffered rest of the message is sent, which a peer
    that never reads never lets happen: the socket and megabytes of buffered message
    stayed for ever, on every attempt to that destination (file descriptors and memory
    without bound). What cannot be sent is now dropped (the connection reset)."""
    one_mx(dns)
    message = MSG + (b"y" * 78 + b"\r\n") * 200_000  # 16 MB: more than the kernel buffers
    with RawMX("127.0.0.2", raw_port, _stops_reading_at_data) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port, data_timeout="1s"),
                          maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test"), message))[
                "bob@example.test"]
        finally:
            await courier.close()
        assert (r.permanent, r.enhanced) == (False, "4.4.2"), r
        assert "timeout after DATA" in r.text, r
        [sock] = mx.sockets
        await until(lambda: _tcp_state(sock) != _ESTABLISHED,
                    "the relay's side of the connection closed")


async def test_deliveries_to_one_domain_started_together_share_its_lookups(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    """Twenty deliveries to one domain started together (concurrency_per_domain, the
    scheduler's usual burst) each asked the MX and address queries and had dnspython read
    each answer on the event loop: for a hostile domain whose MX answer is 64 KiB (0.5 s
    of the loop to read, measured) that is ten seconds of every other delivery stalled
    per retry. Lookups under way are now shared: one query of each, every message sent."""
    mx1 = fake_mx("127.0.0.2")
    one_mx(dns)
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    dns.queries.clear()
    try:
        envs = [envelope(f"r{i}@example.test") for i in range(20)]
        res = await asyncio.gather(*(deliver(courier, e) for e in envs))
    finally:
        await courier.close()
    assert all(r.ok for d in res for r in d.values()), res
    assert len(mx1.messages) == 20
    asked = [q for q in dns.queries if q[0] in ("example.test", "mx1.example.test")]
    assert sorted(asked) == [("example.test", "MX"), ("mx1.example.test", "A"),
                             ("mx1.example.test", "AAAA")], asked


def _two_per_transaction(rcpt_delay: float, stall_second: bool) -> Any:
    """No PIPELINING; two recipients per transaction, 452 4.5.3 at once for the rest;
    each accepted RCPT answered after `rcpt_delay`. A message taken is recorded (its
    recipients) when its 250 goes out; with `stall_second` the reply to the second
    message's end-of-data dot is never sent."""
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 raw.test ESMTP\r\n")
        rcpts: list[bytes] = []
        while line := await r.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                w.write(b"250 raw.test\r\n")
            elif verb == b"RCPT":
                if len(rcpts) >= 2:
                    w.write(b"452 4.5.3 Too many recipients\r\n")
                else:
                    if rcpt_delay:
                        await asyncio.sleep(rcpt_delay)
                    rcpts.append(line[9:].strip().strip(b"<>"))
                    w.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                w.write(b"354 go ahead\r\n")
                await w.drain()
                while await r.readline() not in (b".\r\n", b""):
                    pass
                if stall_second and mx.received:
                    await r.read()  # the second message: no reply, ever
                    return
                mx.received.extend(rcpts)
                w.write(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            else:
                rcpts = [] if verb in (b"MAIL", b"RSET") else rcpts
                w.write(b"250 ok\r\n")
            await w.drain()
    return script


_slow_rcpts = _two_per_transaction(0.4, stall_second=False)
_stalls_the_second_data = _two_per_transaction(0.0, stall_second=True)


async def test_a_slow_next_hop_holds_a_delivery_slot_no_longer_than_attempt_timeout(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """Every wait was bounded, not the attempt: a next hop answering each of 1,000 RCPTs
    just within command_timeout (5 min) held the delivery slot ~66 hours (here: 0.4 s a
    RCPT, 2 per transaction, 10 recipients: 2 s and more). Now [delivery]
    attempt_timeout ends the attempt: the recipients a transaction completed keep their
    250, the rest are deferred 4.4.2 saying why; none lost, none counted twice."""
    one_mx(dns)
    rcpts = [f"r{i}@example.test" for i in range(10)]
    cfg = make_cfg(tmp_path, dns, raw_port, attempt_timeout="1500ms")
    assert cfg.delivery.command_timeout > 1  # no single wait runs out
    with RawMX("127.0.0.2", raw_port, _slow_rcpts) as mx:
        courier = Courier(cfg, maillog=ListLog())
        try:
            res = await deliver(courier, envelope(*rcpts))
        finally:
            await courier.close()
        taken = {a.decode() for a in mx.received}
    assert sorted(res) == sorted(rcpts)
    ok = {a for a, d in res.items() if d.ok}
    late = {a: d for a, d in res.items() if not d.ok}
    assert ok <= taken and len(mx.received) == len(taken)  # each upload once
    assert late, "every recipient went: the attempt was not cut"
    for a, d in late.items():
        assert (d.permanent, d.code, d.enhanced) == (False, 451, "4.4.2"), d
        assert "time limit ([delivery] attempt_timeout" in d.text, d
        assert a not in taken or "may have been delivered" in d.text, d


async def test_recipients_a_follow_up_cut_by_attempt_timeout_left_say_why(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """attempt_timeout reached while a follow-up transaction waits for the reply to its
    end-of-data dot: the recipients that transaction's next hop refused with 452 (too
    many recipients) were not sent because the attempt's time was up, and their reason
    says so; it was the next hop's '452 4.5.3 Too many recipients'."""
    one_mx(dns)
    rcpts = [f"r{i}@example.test" for i in range(8)]
    cfg = make_cfg(tmp_path, dns, raw_port, attempt_timeout="1s")
    assert cfg.delivery.data_timeout > 1  # the attempt's limit cuts the wait
    with RawMX("127.0.0.2", raw_port, _stalls_the_second_data) as mx:
        courier = Courier(cfg, maillog=ListLog())
        try:
            res = await deliver(courier, envelope(*rcpts))
        finally:
            await courier.close()
        first = {a.decode() for a in mx.received}
    assert len(first) == 2 and all(res[a].ok for a in first), res
    cut = {a: d for a, d in res.items() if "may have been delivered" in d.text}
    assert len(cut) == 2, res  # the second transaction's, cut after the dot
    rest = {a: d for a, d in res.items() if a not in first and a not in cut}
    assert len(rest) == 4, res
    for d in rest.values():
        assert (d.permanent, d.code, d.enhanced) == (False, 451, "4.4.2"), d
        assert "time limit ([delivery] attempt_timeout" in d.text, d


async def test_the_lookups_of_a_hostile_mx_set_end_at_attempt_timeout(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """attempt_timeout bounds the attempt's lookups too: with mx_address_limit = 0 the
    address lookups of an MX set of many hosts, each answered late or never (up to
    dns_timeout each), ran one after the other for as long as there were hosts (here 5 x
    2 s). Now they are cut at the attempt's end: deferred 4.4.3 naming the limit, no
    host looked up past it."""
    hosts = [f"mx{i}.hostile.test" for i in range(5)]
    dns.update({"hostile.test": {"MX": [(10, h) for h in hosts]},
                **{h: "TIMEOUT" for h in hosts}})
    cfg = make_cfg(tmp_path, dns, raw_port, dns_timeout="2s", attempt_timeout="1s",
                   mx_address_limit=0)
    courier = Courier(cfg, maillog=ListLog())
    try:
        r = (await deliver(courier, envelope("bob@hostile.test")))["bob@hostile.test"]
    finally:
        await courier.close()
    assert (r.permanent, r.code, r.enhanced) == (False, 451, "4.4.3"), r
    assert "time limit ([delivery] attempt_timeout = 1s) was reached" in r.text, r
    asked = {name for name, _ in dns.queries if name in hosts}
    assert len(asked) == 1, asked  # the first lookup (2 s) outlives the attempt (1 s)


async def test_a_lookup_shared_with_an_attempt_cut_goes_on_for_the_other(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    """Two deliveries wait for one address lookup (dns.Resolver shares it); the first
    one's attempt_timeout passes while it is under way: that delivery is deferred saying
    so, and the lookup goes on for the other, which delivers once it is answered."""
    mx1 = fake_mx("127.0.0.2")
    one_mx(dns)
    gate = threading.Event()
    dns.hold["mx1.example.test"] = gate
    resolver = Resolver([dns.nameserver], 10.0)
    short = Courier(make_cfg(tmp_path, dns, fake_mx.port, attempt_timeout="1s"), resolver,
                    maillog=ListLog())
    long = Courier(make_cfg(tmp_path, dns, fake_mx.port, attempt_timeout="0"), resolver,
                   maillog=ListLog())
    try:
        other = asyncio.ensure_future(deliver(long, envelope("carol@example.test")))
        cut = (await deliver(short, envelope("bob@example.test")))["bob@example.test"]
        gate.set()
        sent = (await other)["carol@example.test"]
    finally:
        gate.set()
        await short.close()
        await long.close()
    assert (cut.code, cut.enhanced) == (451, "4.4.3"), cut
    assert "attempt_timeout" in cut.text, cut
    assert sent.ok, sent
    assert [m.rcpt_tos for m in mx1.messages] == [["carol@example.test"]]


async def _stalls_the_handshake(mx: RawMX, r: asyncio.StreamReader,
                                w: asyncio.StreamWriter) -> None:
    """Says 220 to STARTTLS, then never answers the ClientHello."""
    w.write(b"220 raw.test ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(b"250-raw.test\r\n250 STARTTLS\r\n")
        elif verb == b"STAR":
            w.write(b"220 2.0.0 go ahead\r\n")
            await w.drain()
            await r.read()
            return
        await w.drain()


async def test_a_stalled_tls_handshake_is_a_timeout(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """A next hop that never answers our ClientHello: the handshake ends at
    connect_timeout (RFC 5321 4.5.3.2), and the maillog and the deferral say it timed out.
    They said "connection lost" (asyncio aborts a slow handshake as a lost connection),
    sending the admin after a peer that never closed anything."""
    one_mx(dns)
    ml = ListLog()
    with RawMX("127.0.0.2", raw_port, _stalls_the_handshake):
        courier = Courier(make_cfg(tmp_path, dns, raw_port, connect_timeout="1s",
                                   tls_fallback_time="0s"), maillog=ml)
        env = envelope("bob@example.test")
        try:
            r = (await deliver(courier, env))["bob@example.test"]
        finally:
            await courier.close()
    assert (r.permanent, r.enhanced) == (False, "4.7.5"), r
    assert r.text.endswith("failed: timed out"), r
    assert ml.grep(env.queue_id, "status=host failed", "failed: timed out"), ml.lines


async def test_the_wait_for_a_conversion_slot_ends_at_attempt_timeout(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    """An 8-bit message to a host without 8BITMIME waits for one of the courier's
    conversion slots (downgrade.MAX_CONCURRENT, a memory bound), connected to the host.
    With every slot taken by conversions of other messages (held here by the test), that
    wait was not cut by [delivery] attempt_timeout: the delivery held its slot and the
    connection for as long as the others converted. Now it ends at the limit, deferred
    4.4.2 saying so; with a slot free again the next attempt converts and delivers."""
    one_mx(dns)
    mx = fake_mx("127.0.0.2", eightbitmime=False, smtputf8=False)
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port, attempt_timeout="1s"),
                      maillog=ListLog())
    body = MSG.replace(b"Hello.", "H\u00e9llo.".encode())
    for _ in range(client.downgrade.MAX_CONCURRENT):
        await courier.conversions.acquire()  # other messages' conversions under way
    try:
        env = envelope("a@example.test", body_8bit=True)
        # a bound against the hang (the old code waited for the slots for ever)
        res = (await asyncio.wait_for(deliver(courier, env, body), DEADLINE))[
            "a@example.test"]
        assert (res.permanent, res.code, res.enhanced) == (False, 451, "4.4.2"), res
        assert "waiting to convert the message to 7-bit" in res.text, res
        assert "time limit ([delivery] attempt_timeout" in res.text, res
        assert mx.messages == []
        for _ in range(client.downgrade.MAX_CONCURRENT):
            courier.conversions.release()
        env = envelope("a@example.test", body_8bit=True)
        res = (await deliver(courier, env, body))["a@example.test"]
    finally:
        await courier.close()
    assert res.ok, res
    assert len(mx.messages) == 1 and b"=C3=A9" in mx.messages[0].content


# PIPELINING; every RCPT 451; the RSET after the empty transaction never answered.
_busy_then_silent = verbs({b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n",
                            b"RCPT": b"451 4.2.0 mailbox busy\r\n",
                            b"DATA": b"554 5.5.1 no valid recipients\r\n", b"RSET": None})


async def test_recipients_the_deadline_keeps_from_the_next_host_are_not_said_passed(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """The primary MX answers 451 to the RCPT, so the recipient would go to the backup;
    the attempt's time runs out meanwhile (here: waiting for the reply to the RSET that
    follows). The maillog said 'status=recipients passed to the next host', though no
    next host was tried: the attempt ended there. Now it says nothing of the kind, the
    recipient keeps the primary's 451, and the backup is not connected to."""
    ml = ListLog()
    with RawMX("127.0.0.2", raw_port, _busy_then_silent):
        courier = Courier(make_cfg(tmp_path, dns, raw_port, attempt_timeout="1s"),
                          maillog=ml)
        env = envelope("a@example.test")
        try:
            res = (await deliver(courier, env))["a@example.test"]
        finally:
            await courier.close()
    assert (res.code, res.enhanced) == (451, "4.2.0") and "mailbox busy" in res.text, res
    assert not ml.grep(env.queue_id, "passed to the next host"), ml.lines
    assert not ml.grep(env.queue_id, "127.0.0.3"), ml.lines  # the backup: not tried


def _second_transaction_says(verb: bytes, reply: bytes) -> Any:
    """A next hop whose first connection answers its second transaction's `verb` with
    `reply` (a 503 to MAIL: it lost the connection's state; a 421: closing, and it
    closes), the other commands of that group in kind; every other connection, and
    every other transaction, is served normally. `mx.conns` lists, per connection, the
    messages it took."""
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        index, taken = new_connection(mx)
        w.write(b"220 raw.test ESMTP\r\n")
        txn = 0
        broken = False  # this transaction's state lost (after a 503 to MAIL)
        while line := await r.readline():
            mx.received.append(line)
            v = line[:4].upper()
            if v == b"MAIL":
                txn += 1
                broken = False
            odd = index == 0 and txn == 2
            if v == b"EHLO":
                w.write(b"250-raw.test\r\n250 PIPELINING\r\n")
            elif v == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            elif odd and v == verb:
                w.write(reply)
                if reply.startswith(b"421"):
                    await w.drain()
                    return  # (closed by RawMX)
                broken = True
            elif broken and v in (b"RCPT", b"DATA"):
                w.write(b"503 5.5.1 Error: need MAIL command\r\n")
            elif v == b"DATA":
                w.write(b"354 go ahead\r\n")
                await w.drain()
                body = b""
                while (ln := await r.readline()) not in (b".\r\n", b""):
                    body += ln
                taken.append(body)
                w.write(b"250 2.0.0 taken\r\n")
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
    return script


@pytest.mark.parametrize(("verb", "reply"), [
    (b"MAIL", b"503 5.5.1 Error: nested MAIL command\r\n"),
    (b"MAIL", b"421 4.3.2 raw.test shutting down\r\n"),
    (b"RCPT", b"421 4.3.2 raw.test shutting down\r\n"),
    (b"DATA", b"421 4.3.2 raw.test shutting down\r\n"),
], ids=["503-to-MAIL", "421-to-MAIL", "421-to-RCPT", "421-to-DATA"])
async def test_a_reply_blaming_a_cached_connection_retries_on_a_new_one(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, verb: bytes,
        reply: bytes) -> None:
    """A reply on a cached connection that means the connection, not the message (503 to
    MAIL: the next hop lost its state, or we left it wrong; 421 before the message): the
    connection is dropped and the message sent at once on a new one. A 503 to MAIL
    bounced the message, a 421 to RCPT or DATA deferred it to the next attempt."""
    await _two_messages(tmp_path, dns, raw_port, _second_transaction_says(verb, reply))


async def _two_messages(tmp_path: Path, dns: FakeDNSServer, raw_port: int, script: Any,
                        *others: str) -> list[dict[str, DeliveryResult]]:
    """Two messages (to r0@example.test, then r1@, each also to `others`) through one
    courier to a RawMX running `script` (which keeps `mx.conns`, _connection): each r{i}
    delivered (250), the first message on the first connection, the second on a new
    one, once each. Their results."""
    one_mx(dns)
    out = []
    with RawMX("127.0.0.2", raw_port, script) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            for i in range(2):
                env = envelope(f"r{i}@example.test", *others)
                res = await courier.deliver(env, env.recipients, MSG + b"n=%d\r\n" % i)
                r = res[f"r{i}@example.test"]
                assert r.ok and r.code == 250, r
                out.append(res)
        finally:
            await courier.close()
    assert [[m.rsplit(b"n=", 1)[1] for m in c] for c in mx.conns] == [[b"0\r\n"], [b"1\r\n"]]
    return out


async def test_a_503_to_mail_on_a_fresh_connection_still_counts(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """Only a cached connection's first transaction is retried: the same 503 on a new
    connection is the next hop's answer to the message (permanent), and one connection
    was made."""
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, verbs(
            {b"MAIL": b"503 5.5.1 Error: nested MAIL command\r\n"})) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            env = envelope("r@example.test")
            r = (await courier.deliver(env, env.recipients, MSG))["r@example.test"]
        finally:
            await courier.close()
    assert (r.ok, r.permanent, r.code) == (False, True, 503), r
    assert sum(1 for ln in mx.received if ln.upper().startswith(b"EHLO")) == 1


async def test_a_refused_rset_probe_of_a_cached_connection_takes_a_new_one(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached connection idle past _FRESH is probed with RSET; a 5xx to it (the next
    hop's state lost) drops the connection, and the message goes on a new one."""
    monkeypatch.setattr(client, "_FRESH", 0.0)  # every cached connection is probed
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, verbs({
            b"RSET": b"502 5.5.2 Error: command not recognized\r\n",
            b"DATA": b"354 go ahead\r\n"})) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            for i in range(2):
                env = envelope(f"r{i}@example.test")
                r = (await courier.deliver(env, env.recipients, MSG))[f"r{i}@example.test"]
                assert r.ok, r
        finally:
            await courier.close()
    said = [ln[:4].upper() for ln in mx.received if ln != b"message"]
    assert said.count(b"EHLO") == 2 and said.count(b"RSET") == 1
    assert mx.received.count(b"message") == 2


async def _leaves_in_the_handshake(mx: RawMX, r: asyncio.StreamReader,
                                   w: asyncio.StreamWriter) -> None:
    """A next hop that takes the client's TLS hello and closes the connection: after
    its 220 to STARTTLS (a greeting first), or at once on an implicit-TLS port (when
    `mx.implicit`)."""
    if not getattr(mx, "implicit", False):
        w.write(b"220 raw.test ESMTP\r\n")
        while (line := await r.readline()) and not line.upper().startswith(b"STARTTLS"):
            w.write(b"250-raw.test\r\n250 STARTTLS\r\n" if line[:4].upper() == b"EHLO"
                    else b"250 ok\r\n")
        w.write(b"220 2.0.0 go ahead\r\n")
        await w.drain()
    head = await r.readexactly(5)  # the hello's record, read whole (nothing left
    mx.received.append(head + await r.readexactly(int.from_bytes(head[3:5], "big")))
    w.write_eof()  # unread to make our close a reset), then a FIN
    await r.read()  # until the client hangs up


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_a_next_hop_leaving_in_the_handshake_is_said_to_have_closed(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, trustme_ca_file: Path,
        implicit: bool) -> None:
    """A next hop that closes the connection in the TLS handshake: the reason said
    `ConnectionResetError` (implicit TLS: `connect to ...: ConnectionResetError`, 4.4.1,
    as if no host had answered) or `connection lost`; it now says the server closed it,
    a TLS handshake failure (4.7.5) of a host that answered."""
    with RawMX("127.0.0.2", raw_port, _leaves_in_the_handshake) as mx:
        mx.implicit = implicit
        if implicit:
            cfg = smart_cfg(tmp_path, dns, [f"127.0.0.2:{raw_port}"], trustme_ca_file,
                            tls="tls")
        else:
            one_mx(dns)
            cfg = make_cfg(tmp_path, dns, raw_port, tls="encrypt")
        ml = ListLog()
        courier = Courier(cfg, maillog=ml)
        env = envelope("bob@example.test")
        try:
            res = (await deliver(courier, env))["bob@example.test"]
        finally:
            await courier.close()
    assert mx.received[-1][:1] == b"\x16"  # a TLS handshake record reached it
    assert (res.ok, res.permanent, res.enhanced, res.unanswered) \
        == (False, False, "4.7.5", False), res
    assert res.text.endswith("failed: the server closed the connection (eof)"), res


@pytest.mark.parametrize(("step", "reply", "why"), [
    (b"MAIL", b"250 " + b"x" * (1 << 20) + b"\r\n", "reply line longer than 4096 bytes"),
    (b"RCPT", b"250-x\r\n" * 10_000 + b"250 ok\r\n", "reply of more than 256 lines"),
    (b"DATA", b"354-go\r\n421 closing\r\n", "reply code changed within a reply"),
    (b".", b"hello there\r\n", "not an SMTP reply"),
])
async def test_garbage_from_the_next_hop_in_a_transaction_is_said_to_be_garbage(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, step: bytes, reply: bytes,
        why: str) -> None:
    """A reply that is no SMTP reply (a line of 1 MiB, 10,000 lines, a code changing
    within a reply, text without a code) to a transaction's command is a protocol error
    of the next hop, said so in the result and the maillog as it is in the greeting or
    EHLO, not "lost connection" (the connection was cut by us, for what it sent); after
    the end-of-data dot, the message may have been delivered."""
    one_mx(dns)
    ml = ListLog()
    script = verbs({b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n",
                     b"DATA": b"354 go ahead\r\n", step: reply})
    with RawMX("127.0.0.2", raw_port, script) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ml)
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, False, 451, "4.5.0"), r
    assert f"protocol error from mx1.example.test [127.0.0.2]:{raw_port}" in r.text, r
    assert why in r.text and "lost connection" not in r.text, r
    assert ("may have been delivered" in r.text) == (step == b"."), r
    if step == b".":
        assert b"message" in mx.received, mx.received
    else:  # the host failed before the message: one line says why
        assert len(ml.grep("status=host failed", "protocol error", why)) == 1, ml.lines


async def _early_reply(tmp_path: Path, dns: FakeDNSServer, port: int, size: int,
                       early: bytes, at_dot: bytes) -> Any:
    """The result of a `size`-octet spool file (sent whole below 1 MiB, else streamed)
    to a next hop answering DATA with "354" and at once `early`, the dot with `at_dot`."""
    one_mx(dns)
    body = b"Subject: early\r\n\r\n" + b"x" * 70 + b"\r\n"
    body += b"y" * 70 + b"\r\n" * ((size - len(body)) // 72)
    path = tmp_path / "queue-file"
    path.write_bytes(body)
    script = verbs({b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n",
                     b"DATA": b"354 go ahead\r\n" + early, b".": at_dot})
    with RawMX("127.0.0.2", port, script):
        courier = Courier(make_cfg(tmp_path, dns, port), maillog=ListLog())
        try:
            env = envelope("bob@example.test")
            return (await courier.deliver(env, env.recipients, path))["bob@example.test"]
        finally:
            await courier.close()


@pytest.mark.parametrize("size", [1_000, 3 << 20])  # sent whole; streamed from the file
async def test_a_reply_before_the_end_of_data_is_not_taken_for_its_reply(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, size: int) -> None:
    """A next hop answering DATA with "354" and at once "250" (out of step: answering
    twice), then refusing the message at its dot: the early 250 is no reply to the dot
    (it came before the dot went out), so the message is not counted sent (it was: the
    next hop refused it, and the message left the queue). Transient, no dot sent."""
    r = await _early_reply(tmp_path, dns, raw_port, size, b"250 2.0.0 taken early\r\n",
                           b"554 5.7.1 refused after all\r\n")
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, False, 451, "4.5.0"), r
    assert "protocol error" in r.text and "before the end of data" in r.text, r
    assert "may have been delivered" not in r.text, r


@pytest.mark.parametrize("size", [1_000, 3 << 20])
async def test_a_refusal_before_the_end_of_data_stands(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, size: int) -> None:
    """A next hop refusing the message before its end (a 552 while it comes: its size)
    has refused it: that reply is the outcome (bounced), the dot not sent, the
    connection dropped; not a protocol error retried for days (285768b's first cut)."""
    r = await _early_reply(tmp_path, dns, raw_port, size, b"552 5.3.4 too big for us\r\n",
                           b"250 2.0.0 taken after all\r\n")
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, True, 552, "5.3.4"), r
    assert r.text == "too big for us", r


# 255 continuation lines of 4,000 octets and a last one: a reply the parser takes whole
# (under wire.MAX_LINES, MAX_LINE), about 1 MiB of text
_HUGE_4XX = b"".join(b"%d-4.7.0 " + b"x" * 4000 + b"\r\n" for _ in range(255)) + \
    b"%d 4.7.0 last\r\n"


@pytest.mark.parametrize("where", ["greeting", "rcpt"])
async def test_a_huge_refusal_writes_a_bounded_maillog_line(
        tmp_path: Path, dns: FakeDNSServer, where: str) -> None:
    """A next hop's 1 MiB refusal (a greeting 421, a RCPT 450: 256 lines, each within the
    parser's limits) is clipped in the host's maillog line (`status=host failed` /
    `recipients passed to the next host`, reason=) to LOG_REPLY as in the delivery line:
    it was written as the result keeps it (types.MAX_TEXT, 16 KiB), a line per host, per
    attempt and per message."""
    from authrelay import maillog

    port = common_free_port(("127.0.0.2", "127.0.0.3"))
    if where == "greeting":
        async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(_HUGE_4XX.replace(b"%d", b"421"))
            await w.drain()
            await r.read()
    else:
        script = verbs({b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n",
                         b"RCPT": _HUGE_4XX.replace(b"%d", b"450")})
    ml = ListLog()
    backup = verbs({b"DATA": b"354 go\r\n"})
    with RawMX("127.0.0.2", port, script), RawMX("127.0.0.3", port, backup) as mx2:
        courier = Courier(make_cfg(tmp_path, dns, port), maillog=ml)
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    assert r.ok and b"message" in mx2.received, r  # the backup took it
    what = "status=host failed" if where == "greeting" else "passed to the next host"
    lines = ml.grep("mx1.example.test", what)
    assert len(lines) == 1, ml.lines
    assert maillog.LOG_TRUNCATED.strip() in lines[0], lines[0][-200:]
    assert len(lines[0]) < maillog.LOG_REPLY + 500, len(lines[0])


@pytest.mark.parametrize("size", ["-1", "+40", "\u0663\u0660", "4_0"])
async def test_a_malformed_size_limit_bounces_nothing(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, size: str) -> None:
    """RFC 1870: the EHLO SIZE parameter is digits. A next hop announcing anything else
    ("-1", "+40", Arabic-Indic digits, "4_0": all numbers to Python's int()) has announced
    no limit we can read: the message goes (as Postfix ignores a SIZE value that is not
    all digits), never bounced 5.3.4 for a limit the next hop did not state."""
    one_mx(dns)
    ehlo = f"250-raw.test\r\n250-PIPELINING\r\n250 SIZE {size}\r\n".encode()
    with RawMX("127.0.0.2", raw_port, verbs({b"EHLO": ehlo, b"DATA": b"354 go\r\n"})) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
        finally:
            await courier.close()
    assert r.ok, r
    assert b"message" in mx.received


def _journal_at_dot(path: Path) -> Any:
    """A RawMX script serving every message (PIPELINING); at each end-of-data dot
    `mx.dots` gets whether the in-flight journal at `path` had a begin line then (the
    next hop has the whole message from that moment)."""
    def seen(mx: RawMX) -> None:
        mx.dots = [*getattr(mx, "dots", []), b'{"b":' in path.read_bytes()]
    return verbs({b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n",
                   b"DATA": b"354 go ahead\r\n"}, at_dot=seen)


def _held(journal: InflightJournal, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The journal's thread held before each write until the Event is set (a spool
    filesystem that stalls)."""
    hold = threading.Event()
    write = journal._write

    def held(data: bytes) -> None:
        hold.wait()
        write(data)
    monkeypatch.setattr(journal, "_write", held)
    return hold


def _message(tmp_path: Path, big: bool) -> bytes | Path:
    if not big:
        return MSG
    path = tmp_path / "big.eml"  # streamed from its file (past _NORMALIZE_OFFLOAD)
    path.write_bytes(MSG + b"x" * 76 + b"\r\n" * (client._NORMALIZE_OFFLOAD // 78 + 1))
    return path


@pytest.mark.parametrize("big", [False, True], ids=["in-memory", "streamed"])
async def test_the_end_of_data_dot_waits_for_the_attempts_begin_line(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int,
        monkeypatch: pytest.MonkeyPatch, big: bool) -> None:
    """The in-flight journal's begin line is written by its own thread, after begin():
    a master killed (kill -9) once the next hop had the message but before that thread
    ran left no line, and the restart delivered the message again unannounced. Now the
    courier asks the journal before the end-of-data dot and, the line not written yet
    (here: the thread held), waits for it: the next hop has the whole message only once
    the line is in the file."""
    one_mx(dns)
    monkeypatch.setattr(inflight, "BEGIN_WAIT", DEADLINE)  # waits as long as the test
    journal = InflightJournal(tmp_path)
    journal.start()
    hold = _held(journal, monkeypatch)
    message = _message(tmp_path, big)
    with RawMX("127.0.0.2", raw_port, _journal_at_dot(journal.path)) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            env = envelope("r@example.test")
            token = journal.begin(env.queue_id, ["r@example.test"])
            task = asyncio.create_task(courier.deliver(
                env, env.recipients, message,
                before_end=functools.partial(journal.begun, token)))
            await until(lambda: journal.waiting or getattr(mx, "dots", None),
                        "the dot held, or sent")
            assert not getattr(mx, "dots", None)  # not sent: the line is not written
            assert b"DATA\r\n" in mx.received
            hold.set()
            r = (await task)["r@example.test"]
        finally:
            hold.set()
            await courier.close()
            journal.close()
    assert r.ok, r
    assert mx.dots == [True]  # the begin line was in the file when the next hop had it


async def test_a_journal_stalled_past_the_bound_holds_no_delivery(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A journal whose thread is stuck (a frozen spool) makes the first dot wait
    BEGIN_WAIT, then it goes on, as with a disabled journal, one warning; later attempts
    do not wait while the thread is behind; once it has caught up they wait again."""
    one_mx(dns)
    monkeypatch.setattr(inflight, "BEGIN_WAIT", 0.2)
    journal = InflightJournal(tmp_path)
    journal.start()
    hold = _held(journal, monkeypatch)
    results = []
    with caplog.at_level(logging.WARNING, logger=inflight.__name__), \
            RawMX("127.0.0.2", raw_port, _journal_at_dot(journal.path)) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            for i in range(3):
                if i == 2:  # the spool thaws: the thread writes what it was given
                    hold.set()
                    assert await asyncio.to_thread(journal.written, DEADLINE)
                env = envelope(f"r{i}@example.test")
                token = journal.begin(env.queue_id, [f"r{i}@example.test"])
                res = await courier.deliver(env, env.recipients, MSG,
                                            before_end=functools.partial(journal.begun, token))
                results.append(res[f"r{i}@example.test"])
        finally:
            hold.set()
            await courier.close()
            journal.close()
    assert all(r.ok for r in results), results
    assert mx.dots == [False, False, True]  # went on without the line while stalled
    said = [rec.getMessage() for rec in caplog.records if rec.name == inflight.__name__]
    assert len([m for m in said if "not written within" in m]) == 1, said
    assert len([m for m in said if "caught up" in m]) == 1, said


def _dot_answered_twice(pipelining: bool, at: bytes,
                        again: bytes = b"250 2.0.0 taken (said again)\r\n",
                        max_rcpts: int = 0, every: bool = False) -> Any:
    """A next hop whose first connection answers the first message's end-of-data dot
    twice, the second reply late: it arrives with the next message's `at` command, MAIL
    (written before the reply to MAIL: every reply of that transaction one step behind)
    or DATA (after its 354: a reply before the message's dot). Every other connection
    is served normally; RCPT TO:<nobody@...> is refused (550). `again`: the second
    reply; `max_rcpts`: recipients per transaction, then 452 4.5.3 (0: no limit); `every`:
    every connection's first dot is answered twice, not only the first connection's.
    `mx.conns` lists, per connection, the messages it took."""
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        index, taken = new_connection(mx)
        w.write(b"220 raw.test ESMTP\r\n")
        late = False  # the second reply to the dot is due
        rcpts = 0  # in this transaction
        while line := await r.readline():
            mx.received.append(line)
            v = line[:4].upper()
            if v == b"EHLO":
                w.write(b"250-raw.test\r\n250 PIPELINING\r\n" if pipelining
                        else b"250 raw.test\r\n")
            elif v == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            elif v == b"DATA":
                # the late reply in the 354's own write: one segment on loopback, so it
                # is there before the courier's check at the dot (a reply arriving after
                # that check is indistinguishable from the dot's own)
                w.write(b"354 go ahead\r\n" + (again if late and at == b"DATA" else b""))
                if at == b"DATA":
                    late = False
                await w.drain()
                body = b""
                while (ln := await r.readline()) != b".\r\n":
                    if not ln:
                        return  # cut before the dot: not taken
                    body += ln
                taken.append(body)
                w.write(b"250 2.0.0 taken\r\n")
                late = (every or index == 0) and len(taken) == 1
            elif v == b"MAIL" and late and at == b"MAIL":
                w.write(again + b"250 ok\r\n")
                late, rcpts = False, 0
            elif v == b"RCPT" and b"<nobody@" in line:
                w.write(b"550 5.1.1 no such user\r\n")
            elif v == b"RCPT" and max_rcpts and rcpts >= max_rcpts:
                w.write(b"452 4.5.3 Too many recipients\r\n")
            elif v in (b"RCPT", b"MAIL"):
                rcpts = rcpts + 1 if v == b"RCPT" else 0
                w.write(b"250 ok\r\n")
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
    return script


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
@pytest.mark.parametrize(("at", "refused"), [
    (b"MAIL", False), (b"MAIL", True), (b"DATA", False),
], ids=["with-MAIL", "with-MAIL-last-refused", "after-354"])
async def test_a_late_second_reply_to_the_dot_on_a_cached_connection_retries_at_once(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, pipelining: bool,
        at: bytes, refused: bool) -> None:
    """A next hop that answered the previous message's dot twice, the second reply
    arriving during the next message's MAIL/RCPT on the cached connection: the replies
    out of step, DATA got a 250 and the message was deferred `451 4.5.0 unexpected reply
    250` until its next retry (minutes), though the fault was the connection's; with its
    last recipient refused, that 550 came as DATA's reply and bounced every recipient;
    arriving after the 354, it was a protocol error, 451 4.5.0, deferred alike. Now, as
    the other replies blaming a cached connection (_Stale), the message goes at once on
    a new connection: each recipient gets its own reply."""
    for i, res in enumerate(await _two_messages(
            tmp_path, dns, raw_port, _dot_answered_twice(pipelining, at),
            *(["nobody@example.test"] if refused else []))):
        assert "taken" in res[f"r{i}@example.test"].text, res
        if refused:
            r = res["nobody@example.test"]
            assert (r.code, r.enhanced, r.permanent) == (550, "5.1.1", True), r


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_a_late_second_refusal_of_the_dot_on_a_cached_connection_retries_at_once(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, pipelining: bool) -> None:
    """The late second reply a refusal (554): taken for the reply to the next message's
    MAIL, it bounced that message (pipelined, the RSET after it got the 354 due to DATA,
    unseen; one by one, MAIL's own 250, and nothing showed it). Now a refusal of MAIL on
    a reused connection is no verdict (as a 503): the message goes at once on a new
    connection, and only that one's replies count."""
    for i, res in enumerate(await _two_messages(tmp_path, dns, raw_port, _dot_answered_twice(
            pipelining, b"MAIL", b"554 5.0.0 rejected after all\r\n"))):
        assert "taken" in res[f"r{i}@example.test"].text, res


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_a_late_second_refusal_of_the_dot_bounces_no_follow_up_transaction(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, pipelining: bool) -> None:
    """A next hop taking one recipient per transaction (452 4.5.3 for the next) that
    answers the first transaction's dot twice, the second reply a refusal arriving with
    the follow-up's MAIL on the same connection: that 554 bounced the second recipient
    (its RSET's 354, out of step, was seen only on a cached connection's first
    transaction); then (a9e8309) it was deferred to the next attempt. Now a refusal of
    MAIL on a reused connection is no verdict, and the follow-up goes at once on a new
    connection: each recipient delivered once, each on its own connection."""
    one_mx(dns)
    script = _dot_answered_twice(pipelining, b"MAIL", b"554 5.0.0 rejected after all\r\n",
                                 max_rcpts=1)
    ml = ListLog()
    with RawMX("127.0.0.2", raw_port, script) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ml)
        try:
            env = envelope("r0@example.test", "r1@example.test")
            res = await deliver(courier, env)
        finally:
            await courier.close()
    assert res["r0@example.test"].ok and res["r1@example.test"].ok, res
    assert [len(c) for c in mx.conns] == [1, 1]  # r0's transaction, then r1's, once each


def _rcpt_answered_late(stray: bytes) -> Any:
    """A next hop without PIPELINING that sends `stray` once it has read RCPT, and RCPT's
    own 250 only once it has read the command after it (then that command's reply): a
    late second reply to MAIL still in flight when RCPT went out, read as RCPT's."""
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 raw.test ESMTP\r\n")
        late = False
        while line := await r.readline():
            mx.received.append(line)
            verb = line[:4].upper()
            if late:
                w.write(b"250 2.1.5 ok\r\n")  # RCPT's own, one step behind
                late = False
            if verb == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            if verb == b"RCPT":
                w.write(stray)
                late = True
            else:
                w.write(b"250 raw.test\r\n" if verb == b"EHLO" else b"250 ok\r\n")
            await w.drain()
    return script


@pytest.mark.parametrize(("script", "said"), [
    (verbs({b"EHLO": b"250 raw.test\r\n",
            b"MAIL": b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n",
            b"DATA": b"354 go ahead\r\n"}),
     "before the next command was sent: 550 5.1.1 no such user"),
    (_rcpt_answered_late(b"550 5.1.1 no such user\r\n"),
     "out of step: 250 2.1.5 ok to QUIT after 550 5.1.1 no such user"),
], ids=["waiting", "in-flight"])
async def test_a_second_reply_to_mail_is_no_verdict_for_the_rcpt_after_it(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, script: Any, said: str) -> None:
    """A next hop without PIPELINING answering MAIL twice ("250", then "550 5.1.1"): the
    550 was read as the reply to the RCPT sent after it and bounced the recipient (the
    RSET then got RCPT's own 250). Now a reply already waiting when a command goes out
    is out of step (wire.OutOfStep, a9e8309: "waiting"). One still on its way when RCPT
    went out ("in-flight": sent once RCPT is read, RCPT's own 250 only once the next
    command is) bounced it still: now a permanent refusal no 354 followed stands only
    once QUIT is answered 221 in its place (Courier._settle), and here QUIT gets the 250
    due to RCPT, every reply a step behind. Either way the connection dropped, the
    recipient deferred 451 4.5.0 with the host's maillog line, no message sent."""
    one_mx(dns)
    ml = ListLog()
    with RawMX("127.0.0.2", raw_port, script) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ml)
        try:
            env = envelope("bob@example.test")
            r = (await deliver(courier, env))["bob@example.test"]
        finally:
            await courier.close()
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, False, 451, "4.5.0"), r
    assert said in r.text, r
    assert b"message" not in mx.received and b"RSET\r\n" not in mx.received
    assert len(ml.grep(env.queue_id, "status=host failed", "4.5.0")) == 1, ml.lines


async def test_a_refusal_answered_in_step_still_bounces_and_ends_the_session(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """The same refusal from a next hop in step: QUIT gets its 221, the 550 stands (the
    recipient bounced), and the session has ended (QUIT, no RSET, nothing cached)."""
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, verbs({
            b"EHLO": b"250 raw.test\r\n",
            b"RCPT": b"550 5.1.1 no such user\r\n"})) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            env = envelope("bob@example.test")
            r = (await deliver(courier, env))["bob@example.test"]
            assert not courier._idle
        finally:
            await courier.close()
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, True, 550, "5.1.1"), r
    assert [ln[:4] for ln in mx.received] == [b"EHLO", b"MAIL", b"RCPT", b"QUIT"]


def _closing_after(verb: bytes, refusal: bytes, pipelining: bool) -> Any:
    """A next hop that refuses `verb` for good and closes with a 421: Postfix's smtpd past
    smtpd_hard_error_limit (1 under stress, else 20) writes '421 4.7.0 ... Error: too many
    errors' right after the refusal, before it reads another command, and hangs up
    (verb QUIT: the refusal at RCPT, the 421 in QUIT's place, a server shutting down)."""
    closing = b"421 4.7.0 raw.test Error: too many errors\r\n"
    answers = {b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n" if pipelining
               else b"250 raw.test\r\n", b"QUIT": b"221 bye\r\n", verb: refusal + closing}
    if verb == b"QUIT":  # refused at RCPT, the 421 in QUIT's place
        answers.update({b"RCPT": refusal, b"QUIT": closing})

    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 raw.test ESMTP\r\n")
        while line := await r.readline():
            mx.received.append(line)
            reply = answers.get(line[:4].upper(), b"250 ok\r\n")
            w.write(reply)
            await w.drain()
            if reply.endswith((closing, b"221 bye\r\n")):
                return  # (hung up)
    return script


# (the verb refused, with the 421 after it; its refusal; whether PIPELINING is offered)
_CLOSING = {"rcpt": (b"RCPT", b"550 5.1.1 no such user\r\n", False),
            "mail": (b"MAIL", b"553 5.7.1 sender refused\r\n", False),
            "data-pipelined": (b"DATA", b"554 5.7.1 no thanks\r\n", True),
            "421-to-quit": (b"QUIT", b"550 5.1.1 no such user\r\n", False)}


@pytest.mark.parametrize("case", list(_CLOSING))
async def test_a_refusal_then_the_next_hop_closing_with_421_still_bounces(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, case: str) -> None:
    """A permanent refusal no 354 followed, then a 421 from a next hop closing (Postfix
    past its error limit: the 421 already waiting when QUIT goes out; or read in QUIT's
    place). Taken for an earlier command's reply (4cefd87's _settle: anything but 221),
    the refusal was no verdict: deferred 451 4.5.0 'replies out of step' at every
    attempt, the sender's bounce only at max_queue_lifetime. A 421 is the next hop
    closing (as after the dot, _after_dot), no reply of another step: the refusal
    stands, the recipient bounced at once."""
    verb, refusal, pipelining = _CLOSING[case]
    one_mx(dns)
    with RawMX("127.0.0.2", raw_port, _closing_after(verb, refusal, pipelining)) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            r = (await deliver(courier, envelope("bob@example.test")))["bob@example.test"]
            assert not courier._idle
        finally:
            await courier.close()
    code = int(refusal[:3])
    assert (r.ok, r.permanent, r.code) == (False, True, code), r.text
    assert b"message" not in mx.received


@pytest.mark.parametrize(("first", "second", "ok"), [
    (b"250 2.0.0 taken\r\n", b"554 5.7.1 refused after all\r\n", True),
    (b"250 2.0.0 taken\r\n", b"250 2.0.0 taken again\r\n", True),
    (b"250 2.0.0 taken\r\n", b"421 4.3.2 closing\r\n", True),
    (b"554 5.7.1 refused\r\n", b"250 2.0.0 taken after all\r\n", False),
], ids=["250-then-554", "250-then-250", "250-then-421", "554-then-250"])
async def test_two_replies_to_the_end_of_data_the_first_2xx_stands(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int, first: bytes, second: bytes,
        ok: bool) -> None:
    """A next hop answering the end-of-data dot with two replies at once (one answered
    DATA twice, the second after the courier's check at the dot, `_in_step`, or the dot
    twice). A 2xx first was no verdict (a9e8309): the message deferred 451 4.5.0, and
    the retry delivered it twice (two 250s: the next hop had it either way). Now a 2xx
    read first stands, as when the second comes later (RFC 5321 4.1.1.4: the next hop
    took responsibility; Postfix takes the first reply after the dot): delivered, one
    maillog warning naming the second reply, the connection dropped, not cached (a 421
    second: the next hop closing, nothing to warn of). A refusal read first is still no
    verdict (which is the dot's is unknown): deferred 451 4.5.0, "may have been
    delivered"."""
    one_mx(dns)
    ml = ListLog()
    with RawMX("127.0.0.2", raw_port, verbs({
            b"EHLO": b"250-raw.test\r\n250 PIPELINING\r\n", b"DATA": b"354 go ahead\r\n",
            b".": first + second})) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ml)
        try:
            env = envelope("bob@example.test")
            r = (await deliver(courier, env))["bob@example.test"]
            cached = bool(courier._idle)
        finally:
            await courier.close()
    assert b"message" in mx.received and not cached
    said = second.decode().strip()
    if ok:
        assert r.ok and r.text == "taken", r
        warned = ml.grep(env.queue_id, "warning=replies out of step", said,
                         "the first stands (delivered)")
        assert len(warned) == (0 if second.startswith(b"421") else 1), ml.lines
        return
    assert (r.ok, r.permanent, r.code, r.enhanced) == (False, False, 451, "4.5.0"), r
    assert "out of step" in r.text and said in r.text, r
    assert "may have been delivered" in r.text, r


async def test_a_follow_up_out_of_step_on_its_new_connection_too_is_deferred(
        tmp_path: Path, dns: FakeDNSServer, raw_port: int) -> None:
    """The same next hop answering every connection's first dot twice, three recipients
    one per transaction: r1's follow-up goes on a new connection (the first one's late
    554 is no verdict), whose own late 554 meets r2's follow-up: one new connection per
    attempt, so r2 is deferred (transient, naming the reply), not tried on a third
    connection, nor bounced; r0 and r1 delivered once each."""
    one_mx(dns)
    script = _dot_answered_twice(True, b"MAIL", b"554 5.0.0 rejected after all\r\n",
                                 max_rcpts=1, every=True)
    with RawMX("127.0.0.2", raw_port, script) as mx:
        courier = Courier(make_cfg(tmp_path, dns, raw_port), maillog=ListLog())
        try:
            env = envelope("r0@example.test", "r1@example.test", "r2@example.test")
            res = await deliver(courier, env)
        finally:
            await courier.close()
    assert res["r0@example.test"].ok and res["r1@example.test"].ok, res
    r = res["r2@example.test"]
    assert (r.ok, r.permanent, r.code) == (False, False, 451), r
    assert "554 5.0.0 rejected after all" in r.text, r
    assert [len(c) for c in mx.conns] == [1, 1]

