"""Message integrity end to end (issue 11): NUL, routing characters, hop limit, spool damage.

A real `authrelay serve`, real sockets, the fake DNS and a fake MX (aiosmtpd) on loopback.
What the MX receives (or never receives), what stays in the spool and the maillog lines
are the evidence.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient
from support.tmpfs import mounted
from support.wait import wait_until
from test_e2e_delivery import (
    SENDER,
    delivered_to,
    gone,
    log_lines,
    mx_overrides,
    submit,
)

from authrelay.spool import format as fmt
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id

pytestmark = pytest.mark.slow

HEAD = b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: integrity\r\n"


def _received(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.example (hop%d.example [192.0.2.%d])\r\n"
                    b"\tby hop%d.example with ESMTP id H%d; Fri, 27 Nov 2026 10:00:00 +0000\r\n"
                    % (i, i, i % 250 + 1, i + 1, i) for i in range(n))


def _raw_data(relay: RelayProcess, rcpt: str, payload: bytes, *, port: str = "smtp"
              ) -> tuple[int, str]:
    """MAIL/RCPT/DATA on port 25 without AUTH (to a local domain); payload is sent raw and
    must end with the end-of-data marker. Returns the reply to the final dot."""
    c = RawClient(relay.ports[port])
    try:
        assert c.reply().code == 220
        c.send(b"EHLO client.example\r\n")
        assert c.reply().code == 250
        c.send(b"MAIL FROM:<someone@remote.example>\r\n")
        assert c.reply().code == 250
        c.send(f"RCPT TO:<{rcpt}>\r\n".encode())
        r = c.reply()
        assert r.code == 250, r
        c.send(b"DATA\r\n")
        assert c.reply().code == 354
        c.send(payload)
        r = c.reply()
        c.send(b"QUIT\r\n")
        return r.code, r.text
    finally:
        c.sock.close()


def _no_tracebacks(relay: RelayProcess) -> None:
    assert "Traceback" not in relay.maillog()


# ---------------------------------------------------------------------- NUL

NUL_VARIANTS = {
    "smuggling_line": HEAD + b"\r\nfirst\r\n\x00.\r\nMAIL FROM:<x@evil.example>\r\n.\r\n",
    "nul_in_header": b"Subject: a\x00b\r\n\r\nbody\r\n.\r\n",
    "nul_only": b"\x00\r\n.\r\n",
    "nul_before_dot": HEAD + b"\r\nbody\x00\r\n.\r\n",
    "nul_in_stuffed_dot_line": HEAD + b"\r\n..\x00\r\n.\r\n",
    "nul_streamed_after_spill": HEAD + b"\r\n" + b"x" * 70 + b"\r\n" * 1
    + (b"y" * 78 + b"\r\n") * 3000 + b"tail\x00\r\n.\r\n",
}


def test_nul_refused_nothing_stored(relay_factory: Callable[..., RelayProcess],
                                    dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    relay = relay_factory({**mx_overrides(dns, fake_mx.port),
                           "relay": {"smart_host": [], "local_domains": ["example.test"]}})
    for name, payload in NUL_VARIANTS.items():
        code, text = _raw_data(relay, "bob@example.test", payload)
        assert (code, text) == (554, "5.6.0 Message contains NUL characters"), name
    assert relay.nothing_stored()
    log = relay.maillog()
    assert log.count("reject=554 5.6.0 Message contains NUL characters") == len(NUL_VARIANTS)
    # The same message without the NUL is queued and delivered.
    code, text = _raw_data(relay, "bob@example.test", HEAD + b"\r\nfirst\r\n.\r\n")
    assert code == 250, text
    relay.wait_for(lambda: delivered_to(mx, "bob@example.test"), what="clean mail delivered")
    assert len(mx.messages) == 1 and b"\x00" not in mx.messages[0].content
    _no_tracebacks(relay)


# ---------------------------------------------------------------------- routing characters

ROUTING = ["victim%remote.example@example.test", "remote.example!victim@example.test",
           '"victim@remote.example"@example.test', '"victim%remote.example"@example.test']


def _rcpt_reply(relay: RelayProcess, rcpt: str, *, source: str = "127.0.0.1",
                login: bool = False) -> tuple[int, bytes]:
    port = relay.ports["submission" if login else "smtp"]
    with smtplib.SMTP("127.0.0.1", port, timeout=20,
                      source_address=(source, 0)) as s:
        s.ehlo("client.example")
        if login:
            s.starttls(context=relay.client_context())
            s.ehlo("client.example")
            s.login("alice", PASSWORD)
        assert s.mail("someone@remote.example")[0] == 250
        return s.rcpt(rcpt)


def test_routing_chars_refused_unless_authenticated_or_trusted(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    relay = relay_factory({**mx_overrides(dns, fake_mx.port),
                           "relay": {"smart_host": [], "local_domains": ["example.test"],
                                     "trusted_networks": ["127.0.0.77/32"]}})
    for rcpt in ROUTING:
        code, msg = _rcpt_reply(relay, rcpt)
        assert (code, msg[:5]) == (550, b"5.7.1"), rcpt
        assert _rcpt_reply(relay, rcpt, login=True)[0] == 250, rcpt
        assert _rcpt_reply(relay, rcpt, source="127.0.0.77")[0] == 250, rcpt
    assert _rcpt_reply(relay, "plain@example.test")[0] == 250
    # Authenticated mail with such a recipient goes out unchanged (we never route on it).
    qid = submit(relay, [ROUTING[0]])
    relay.wait_for(lambda: gone(relay, qid), what="delivered")
    assert mx.messages[-1].rcpt_tos == [ROUTING[0]]
    log = relay.maillog()
    assert log.count("reject=550 5.7.1") == len(ROUTING)


# ---------------------------------------------------------------------- hop limit

def test_hop_limit(relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
                   fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20) as s:
        s.ehlo("laptop.test")
        s.starttls(context=relay.client_context())
        s.ehlo("laptop.test")
        s.login("alice", PASSWORD)
        s.mail(SENDER)
        s.rcpt("bob@example.test")
        code, msg = s.data(_received(51) + HEAD + b"\r\nlooping\r\n")
        assert (code, msg) == (554, b"5.4.6 Too many hops")
    assert relay.nothing_stored()
    assert "reject=554 5.4.6 Too many hops" in relay.maillog()
    qid = submit(relay, ["bob@example.test"], _received(50) + HEAD + b"\r\nfifty\r\n")
    relay.wait_for(lambda: gone(relay, qid), what="50 hops delivered")
    got = mx.messages[-1].content
    assert got.count(b"\r\nReceived: ") + got.startswith(b"Received: ") == 51  # + ours
    _no_tracebacks(relay)


def _sendmail(relay: RelayProcess, args: list[str], stdin: bytes
              ) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "AUTHRELAY_CONFIG": str(relay.config)}
    return subprocess.run([sys.executable, "-m", "authrelay", "sendmail", *args], env=env,
                          input=stdin, capture_output=True, timeout=60)


def test_sendmail_nul_and_hops(relay_factory: Callable[..., RelayProcess],
                               dns: FakeDNSServer, sender_mx: FakeSMTPServer,
                               fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port), start=False)
    res = _sendmail(relay, ["-i", "bob@example.test"], b"Subject: x\n\nbo\x00dy\n")
    assert res.returncode == 65 and b"NUL" in res.stderr
    assert relay.queued() == []
    # Over the hop limit: accepted (exit 0), bounced to the sender, never relayed.
    res = _sendmail(relay, ["-i", "-f", SENDER, "bob@example.test"],
                    _received(51).replace(b"\r\n", b"\n") + b"Subject: loop\n\nbody\n")
    assert res.returncode == 0, res.stderr
    [path] = relay.queued()
    ej, msg = fmt.split(path.read_bytes())
    env = json.loads(ej)
    assert env["sender"] == "" and env["is_bounce"]
    assert [r["address"] for r in env["recipients"]] == [SENDER]
    assert b"5.4.6" in msg and b"Too many hops" in msg
    relay.start()
    relay.wait_for(lambda: sender_mx.messages, what="the bounce delivered")
    assert delivered_to(mx, "bob@example.test") == []
    assert sender_mx.messages[0].rcpt_tos == [SENDER]


def test_sendmail_hop_limit_bounce_honours_notify(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """sendmail -N never (RFC 3461 4.1: no DSN whatever happens) over the hop limit:
    accepted, not relayed, and no bounce (one was queued all the same); nor with -N
    success (no failure notice asked for). Without -N the bounce names every recipient."""
    fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port), start=False)
    loop = _received(51).replace(b"\r\n", b"\n") + b"Subject: loop\n\nbody\n"
    res = _sendmail(relay, ["-i", "-N", "never", "-f", SENDER, "bob@example.test"], loop)
    assert res.returncode == 0, res.stderr
    assert relay.queued() == []
    res = _sendmail(relay, ["-i", "-N", "success", "-f", SENDER, "bob@example.test"], loop)
    assert res.returncode == 0, res.stderr
    assert relay.queued() == []
    res = _sendmail(relay, ["-i", "-f", SENDER, "bob@example.test", "carol@example.test"],
                    loop)
    assert res.returncode == 0, res.stderr
    [path] = relay.queued()
    _, msg = fmt.split(path.read_bytes())
    assert b"Final-Recipient: rfc822; bob@example.test" in msg
    assert b"Final-Recipient: rfc822; carol@example.test" in msg


# ---------------------------------------------------------------------- spool damage

def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x04]) + raw[at + 1:]


def _v1_file(qid: str, rcpt: str) -> bytes:
    env = Envelope(queue_id=qid, sender=SENDER, recipients=[Recipient(rcpt)],
                   client_ip="127.0.0.1", helo="laptop.test", protocol="ESMTPSA")
    return fmt.encode_v1(env, HEAD + b"Message-ID: <v1@sender.test>\r\n\r\nold format\r\n")


def test_damaged_spool_files_go_to_corrupt_never_deleted(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", rcpt_replies={
        f"{n}@example.test": "451 4.3.0 later" for n in ("trunc", "nokey", "flip", "live")})
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1s"]))
    qids = {n: submit(relay, [f"{n}@example.test"]) for n in ("trunc", "nokey", "flip")}
    for q in qids.values():
        relay.wait_for(lambda q=q: any("stat=Deferred" in ln for ln in log_lines(relay, q)),
                       what=f"{q} deferred")
    relay.stop()
    q = relay.queue_dir
    originals = {n: (q / i).read_bytes() for n, i in qids.items()}
    damaged = {
        "trunc": originals["trunc"][:-7],
        "nokey": originals["nokey"].replace(b'"recipients":', b'"recipientz":', 1),
        "flip": _flip(originals["flip"], len(originals["flip"]) - 5),  # message body bit
    }
    for n, data in damaged.items():
        (q / qids[n]).write_bytes(data)
        (q / qids[n]).chmod(0o700)
    v1 = new_queue_id()
    (q / v1).write_bytes(_v1_file(v1, "old@example.test"))
    (q / v1).chmod(0o700)
    mx.rcpt_replies.clear()  # the MX accepts everything from now on
    relay.start()
    # The version 1 file is delivered as before.
    relay.wait_for(lambda: delivered_to(mx, "old@example.test"), what="v1 file delivered")
    assert b"old format" in delivered_to(mx, "old@example.test")[0].content
    # Every damaged file ends in corrupt/, byte for byte, with a warning; none delivered.
    corrupt = relay.state / "spool" / "corrupt"
    relay.wait_for(lambda: all((corrupt / i).exists() for i in qids.values()),
                   what="damaged files quarantined")
    for n, i in qids.items():
        assert (corrupt / i).read_bytes() == damaged[n], n
        assert not (q / i).exists()
        assert delivered_to(mx, f"{n}@example.test") == [], n
    log = relay.maillog()
    for i in qids.values():
        assert re.search(rf"{i}: .*(corrupt|damaged)", log), i
        assert f"{i}: status=removed" not in log  # never deleted as "removed"
    # A bit flipped in a queued message while the server runs: found before delivery.
    mx.rcpt_replies["live@example.test"] = "451 4.3.0 later"
    live = submit(relay, ["live@example.test"])
    relay.wait_for(lambda: any("stat=Deferred" in ln for ln in log_lines(relay, live)),
                   what="live deferred")
    raw = (q / live).read_bytes()
    (q / live).write_bytes(_flip(raw, len(raw) - 3))
    mx.rcpt_replies.clear()
    relay.wait_for(lambda: (corrupt / live).exists(), what="live file quarantined")
    assert delivered_to(mx, "live@example.test") == []
    assert re.search(rf"{live}: warning=damaged queue file moved to corrupt/: checksum",
                     relay.maillog())
    _no_tracebacks(relay)


# ---------------------------------------------------------------------- free space (tmpfs)

@pytest.fixture
def tmpfs(tmp_path: Path):  # noqa: ANN201
    with mounted(tmp_path / "tmpfs", "6m") as mnt:
        yield mnt


def _fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem until only about `leave` bytes are free (0: full)."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    try:
        with open(filler, "ab") as f:
            f.write(b"\1" * max(0, free - leave))
            if leave == 0:
                while True:  # what statvfs rounds away
                    f.write(b"\1" * 4096)
                    f.flush()
    except OSError:
        pass
    return filler


def _mail_reply(relay: RelayProcess, size: int | None = None) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=20) as s:
        s.ehlo("client.example")
        opts = [f"SIZE={size}"] if size else []
        return s.mail("someone@remote.example", opts)


@pytest.mark.root
def test_queue_min_free_refuses_mail(tmp_path: Path, tmpfs: Path) -> None:
    relay = RelayProcess(tmpfs, {"limits": {"queue_min_free": "1MB"}})
    relay.log = tmp_path / "maillog.txt"  # the log must not fill the tmpfs itself
    relay.start()
    full = (452, b"4.3.1 Insufficient system storage")
    refused: list[tuple[int, bytes]] = []

    def reply_is(code: int) -> bool:
        """One MAIL FROM; the server answers from a statvfs cached for about a second,
        so a change of free space shows within that: polled, never a guessed sleep."""
        got = _mail_reply(relay)
        if got[0] == 452:
            assert got == full
            refused.append(got)
        return got[0] == code

    try:
        assert reply_is(250)
        filler = _fill(tmpfs, 512 * 1024)  # below the 1 MB minimum
        wait_until(lambda: reply_is(452), "452 once free space is below the minimum",
                   interval=0.1)
        filler.unlink()
        wait_until(lambda: reply_is(250), "250 once the space is back", interval=0.1)
        filler = _fill(tmpfs, 0)  # to the brim
        wait_until(lambda: reply_is(452), "452 on a full disk", interval=0.1)
        filler.unlink()
        wait_until(lambda: reply_is(250), "250 once the space is back", interval=0.1)
        # SIZE counts: free minus the declared size must stay above the minimum.
        st = os.statvfs(tmpfs)
        free = st.f_bavail * st.f_frsize
        assert _mail_reply(relay, free - 512 * 1024)[0] == 452
        assert _mail_reply(relay, free - 2 * 1000 * 1000)[0] == 250
        log = relay.maillog()
        # Every refusal (the client's 452s, and the SIZE one) is one maillog line.
        assert len(re.findall(r"reject=452 4\.3\.1 <someone@remote\.example>\.\.\. "
                              r"Insufficient system storage, .*stage=MAIL", log)) \
            == len(refused) + 1
    finally:
        relay.stop()
    assert "Traceback" not in relay.maillog()


@pytest.mark.root
def test_enospc_during_data(tmp_path: Path, tmpfs: Path) -> None:
    relay = RelayProcess(tmpfs, {"limits": {"queue_min_free": 0}})
    relay.log = tmp_path / "maillog.txt"
    relay.start()
    try:
        _fill(tmpfs, 1024 * 1024)  # 1 MB left; the message is 2 MB
        body = HEAD + b"\r\n" + (b"z" * 998 + b"\r\n") * 2000
        with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=60) as s:
            s.ehlo("client.example")
            assert s.mail("someone@remote.example")[0] == 250
            assert s.rcpt("user@local.test")[0] == 250
            code, msg = s.data(body)
            assert (code, msg) == (452, b"4.3.1 Insufficient system storage")
            assert s.noop()[0] == 250  # the session goes on
        assert relay.nothing_stored()  # nothing half-written left
        assert [p for p in (relay.queue_dir).iterdir()] == []
        log = relay.maillog()
        lines = [ln for ln in log.splitlines() if "4.3.1" in ln]
        assert len(lines) == 1 and "No space left on device" in lines[0], lines
        assert "Traceback" not in log
        # Room again: the same message is accepted.
        (tmpfs / "filler").unlink()
        with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=60) as s:
            s.ehlo("client.example")
            s.mail("someone@remote.example")
            s.rcpt("user@local.test")
            assert s.data(body)[0] == 250
    finally:
        relay.stop()


@pytest.mark.root
def test_a_state_not_saved_on_a_full_disk_is_a_line_of_its_message(tmp_path: Path,
                                                                    tmpfs: Path) -> None:
    """A deferral whose state cannot be written (the spool's disk full) is an error line
    that starts with the message's queue id, as every line about a message: it started
    `NOQUEUE: error=...: QID: cannot save state`, missed by `grep QID` of the message's
    lines."""
    relay = RelayProcess(tmpfs, {"limits": {"queue_min_free": "0"}})  # the smart host
    # does not answer: deferred
    relay.log = tmp_path / "maillog.txt"  # the log must not fill the tmpfs itself
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=20) as s:
            s.sendmail("someone@remote.example", ["bob@local.test"], b"Subject: x\r\n\r\nhi\r\n")
        qid = wait_until(lambda: re.search(r"(\w+): to=<bob@local\.test>.*stat=Deferred",
                                           relay.maillog()), what="deferred")[1]
        filler = _fill(tmpfs, 0)
        relay.cli("queue", "flush")
        line = wait_until(lambda: re.search(r".*cannot save state.*", relay.maillog()),
                          what="the state not saved")[0]
        filler.unlink()
    finally:
        relay.stop()
    assert re.fullmatch(rf".* authrelay\[\d+\]: {qid}: error=authrelay\.scheduler\.scheduler: "
                        rf"{qid}: cannot save state: OSError: \[Errno 28\] No space left on "
                        r"device.*", line), line
