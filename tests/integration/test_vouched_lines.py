"""The courier's line-end check skipped for a file a receiving worker vouched for (issue 22).

What the next hop receives must not change: every message of a corpus of body edges
(leading dots, "..", a lone "." line, lines of 998 octets, 8-bit text, an empty body, a
streamed 1.5 MB one) is received by the real body reader, stored through the real submitter
as an SMTP session stores it (with and without a DKIM signature), then delivered twice by
the real courier to a loopback MX, plain and over STARTTLS: once with the worker's notice
honoured (`Envelope.lines_checked`) and once without. Both must put the same bytes on the
wire. A file whose line ends nobody vouched for (the sendmail command's: bare CR and LF)
is still normalised, also when a notice names an inode that is not its file's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory, bare_line_ends
from support.certs import server_tls_context
from support.maillog import ListLog

from authrelay import wiring
from authrelay.config import Config, from_dict
from authrelay.delivery.client import Courier
from authrelay.dkim.keys import KeyStore
from authrelay.smtpd.bodyreader import OK, BodyReader
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool

ZONES = {"example.test": {"MX": [(10, "mx1.example.test")]},
         "mx1.example.test": {"A": ["127.0.0.2"]}}
HEAD = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: edges\r\n\r\n"
X998 = b"x" * 998
CORPUS: dict[str, bytes] = {  # the message as the client means it (CRLF, not stuffed)
    "plain": HEAD + b"hello\r\n",
    "leading dots": HEAD + b".\r\n..\r\n...x\r\n.a\r\nend\r\n",
    "dot lines last": HEAD + b"text\r\n.\r\n..\r\n",
    "first body line a dot": HEAD + b".hidden\r\n",
    "998-octet lines": HEAD + (X998 + b"\r\n") * 3 + b"." + X998[1:] + b"\r\n",
    "8-bit": HEAD + "grüße, ça va? — ☃\r\n".encode() * 50,
    "empty body": HEAD,
    "no header end": b"Subject: only a header\r\n",
    "100 KiB": HEAD + (b"X" * 78 + b"\r\n") * 1280,
    "1.5 MB streamed": HEAD + (b"line of text, . and .. inside\r\n" + b".dot\r\n") * 40_000,
}


def wire_of(message: bytes) -> bytes:
    """What an SMTP client sends after 354 for `message` (RFC 5321 4.5.2)."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    return stuffed + b".\r\n" if stuffed.endswith(b"\r\n") or not stuffed \
        else stuffed + b"\r\n.\r\n"


def cfg_for(tmp_path: Path, dns: FakeDNSServer, port: int, *, dkim: bool) -> Config:
    data: dict[str, Any] = {
        "hostname": "relay.test", "state_dir": str(tmp_path),
        "delivery": {"port": port, "nameservers": [dns.nameserver], "dns_timeout": "1s",
                     "connect_timeout": "5s", "command_timeout": "10s",
                     "data_timeout": "30s"}}
    cfg = from_dict(data)
    if dkim:
        KeyStore(cfg.dkim_dir).generate("sender.test", "s1", "ed25519")
    return cfg


async def store(spool: Spool, cfg: Config, message: bytes, *, vouched: bool,
                notes: dict[str, int]) -> str:
    """`message` stored as an SMTP session stores it (the body reader, then the
    submitter with lines_checked) or, unvouched, as the sendmail command does."""
    sub = wiring.submitter(cfg, spool, ListLog())
    env = Envelope(new_queue_id(), "a@sender.test", [Recipient("b@example.test")],
                   client_ip="127.0.0.1", protocol="ESMTP", listener="smtp 127.0.0.1:25")
    draft = sub.begin(env, nul_checked=vouched, lines_checked=vouched, sign=True)
    if vouched:
        reader = BodyReader(64 * 1024 * 1024)
        out = reader.feed(wire_of(message))
        assert out.done and out.error == OK
        for seg in out.segments:
            draft.write(seg)
    else:
        draft.write(message)
    await draft.commit()
    assert env.queue_id in notes
    return env.queue_id


async def deliver_twice(cfg: Config, spool: Spool, qid: str, vouched: int) -> list[bool]:
    """Delivered with the notice honoured, then without: `lines_checked` of each load."""
    courier = Courier(cfg, maillog=ListLog())
    marks = []
    try:
        for v in (vouched, 0):
            env, data, off = spool.load_for_delivery(qid, vouched=v)
            marks.append(env.lines_checked)
            res = await courier.deliver(env, env.recipients, data, off)
            assert res["b@example.test"].ok, res
    finally:
        await courier.close()
    return marks


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
@pytest.mark.parametrize("dkim", [False, True], ids=["unsigned", "dkim"])
async def test_a_vouched_file_goes_out_byte_for_byte_as_a_checked_one(
        tmp_path: Path, dns_server: FakeDNSServer, fake_mx: MXFactory, trustme_ca: Any,
        tls: bool, dkim: bool) -> None:
    dns_server.set_zones(ZONES)
    ctx = server_tls_context(trustme_ca, "mx1.example.test") if tls else None
    mx = fake_mx("127.0.0.2", starttls_context=ctx)
    cfg = cfg_for(tmp_path, dns_server, fake_mx.port, dkim=dkim)
    spool = Spool(cfg.spool_dir, fsync=False)
    spool.ensure_dirs()
    notes: dict[str, int] = {}
    spool.on_commit = notes.__setitem__  # (queue id, vouched inode): the worker's notice
    for name, message in CORPUS.items():
        qid = await store(spool, cfg, message, vouched=True, notes=notes)
        assert notes[qid], f"{name}: the session's file was not vouched for"
        first = len(mx.messages)
        assert await deliver_twice(cfg, spool, qid, notes[qid]) == [True, False], name
        fast, slow = mx.messages[first:first + 2]
        assert fast.content == slow.content, name
        assert fast.tls == slow.tls == tls
        if dkim and message.startswith(b"From:"):  # signed: the prepend goes out first
            assert fast.content.startswith(b"DKIM-Signature:"), name
    # The DATA of each pair on the wire (one connection, reused): the same bytes.
    datas = [d for w in mx.wire for d in re.findall(rb"\r\nDATA\r\n(.*?\r\n\.\r\n)", w, re.S)]
    if not tls:  # over TLS the tap holds the ciphertext: the contents above compare
        assert len(datas) == 2 * len(CORPUS)
        assert all(datas[i] == datas[i + 1] for i in range(0, len(datas), 2))


async def test_an_unvouched_file_is_still_normalised(
        tmp_path: Path, dns_server: FakeDNSServer, fake_mx: MXFactory) -> None:
    """Bare CR and LF (8-bit text from the sendmail command) become CRLF on the wire,
    also when a notice names an inode that is not this file's (forged, or a file put in
    the place of the worker's after its notice)."""
    dns_server.set_zones(ZONES)
    mx = fake_mx("127.0.0.2")
    cfg = cfg_for(tmp_path, dns_server, fake_mx.port, dkim=False)
    spool = Spool(cfg.spool_dir, fsync=False)
    spool.ensure_dirs()
    notes: dict[str, int] = {}
    spool.on_commit = notes.__setitem__
    message = HEAD + "grüße\n.\nbare CR\rend".encode()
    qid = await store(spool, cfg, message, vouched=False, notes=notes)
    assert notes[qid] == 0
    other = await store(spool, cfg, CORPUS["plain"], vouched=True, notes=notes)
    courier = Courier(cfg, maillog=ListLog())
    try:
        for forged in (0, notes[other], notes[other] + 1):
            env, data, off = spool.load_for_delivery(qid, vouched=forged)
            assert not env.lines_checked
            assert (await courier.deliver(env, env.recipients, data, off))[
                "b@example.test"].ok
    finally:
        await courier.close()
    assert len(mx.messages) == 3
    for w in mx.wire:
        assert bare_line_ends(w) == []
    # aiosmtpd's content is un-stuffed: the lone "." line went out as "..", no bare end
    assert all(m.content.endswith("grüße\r\n.\r\nbare CR\r\nend\r\n".encode())
               for m in mx.messages)
