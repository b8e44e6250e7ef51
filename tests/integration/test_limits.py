"""Each limit of issue 4 ("Hold under abuse") crossed against a real authrelay process.

Every test checks the reply code, the maillog line, and that another client is still
served. Tests isolate their per-IP state by connecting from their own loopback source
address (127.0.0.N). Durations in the configs are small ("1s") so timeouts fire quickly;
no assertion is about speed.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.dnsserver import FakeDNSServer
from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient, client_ctx, plain
from support import ci

pytestmark = pytest.mark.slow


class Client(RawClient):
    """RawClient bound to a chosen loopback source address (per-IP limits)."""

    def __init__(self, port: int, src: str = "127.0.0.1", timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(src, 0))
        self.buf = b""


def submit_tls(relay: RelayProcess, src: str) -> Client:
    """A submission session from `src` after STARTTLS (and EHLO again)."""
    c = Client(relay.ports["submission"], src)
    assert c.reply().code == 220
    assert c.cmd("EHLO client.test").code == 250
    assert c.cmd("STARTTLS").code == 220
    c.starttls(client_ctx())
    assert c.cmd("EHLO client.test").code == 250
    return c


def submit_login(relay: RelayProcess, src: str, user: str = "alice",
                 password: str = PASSWORD) -> Client:
    """A submission session after STARTTLS and a successful AUTH."""
    c = submit_tls(relay, src)
    r = c.cmd(f"AUTH PLAIN {plain(user, password)}")
    assert r.code == 235, r
    return c


def served(relay: RelayProcess, src: str, listener: str = "smtp") -> None:
    """Another client is still served normally."""
    with Client(relay.ports[listener], src) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO other.test").code == 250
        assert c.cmd("QUIT").code == 221


def envelope(relay: RelayProcess, qid: str) -> dict:
    from authrelay.spool.format import split

    return json.loads(split((relay.queue_dir / qid).read_bytes())[0])


def qid_of(reply: object) -> str:
    m = re.search(r"queued as (\S+)", str(reply))
    assert m, reply
    return m.group(1)


def status(pid: int, key: str) -> int:
    """A kB figure from /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Samples the server's VmRSS in a thread while the block runs; `.peak_growth` in kB.

    (VmHWM is no use: argon2 hashing at login may already have set a high peak.)
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = status(pid, "VmRSS")
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status(self.pid, "VmRSS"))
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status(self.pid, "VmRSS"))

    @property
    def peak_growth(self) -> int:
        return self.peak - self.base


def no_traceback(relay: RelayProcess) -> None:
    assert "Traceback" not in relay.maillog()


# ============================================================== one relay, many limits
@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess(
        tmp_path_factory.mktemp("limits"),
        overrides={
            # oversize_read_rate: the 1 MiB overshoot in a second, not 16 s
            "limits": {"max_message_size": 100000, "max_recipients": 3,
                       "oversize_read_rate": "1MiB", "bad_rcpt_throttle": 2, "bad_rcpt_limit": 4,
                       "max_auth_failures": 2,
                       "connection_rate_per_ip": 0, "max_errors": 50,
                       "user_messages_per_hour": 3, "user_recipients_per_hour": 4},
            "auth": {"sender_policy": "own", "max_failures_per_ip": 3,
                     "max_failures_per_user": 3, "failure_window": "10m"},
        },
        users={},
    )
    for name, addrs in {"alice": ["alice@example.org"],
                        "bob": ["bob@example.org", "sales@example.org"],
                        "carol": ["carol@example.org"], "dan": ["dan@example.org"],
                        "erin": [], "frank": [], "gina": ["gina@example.org"],
                        "hank": ["hank@example.org"]}.items():
        extra = [a for addr in addrs for a in ("--address", addr)]
        r.cli("user", "add", name, *extra, "--password-stdin", input=PASSWORD + "\n")
    r.start()
    yield r
    r.stop()
    no_traceback(r)


def test_size_param_too_big(relay: RelayProcess) -> None:
    c = submit_login(relay, "127.0.0.2", "bob")
    r = c.cmd("MAIL FROM:<bob@example.org> SIZE=100001")
    assert (r.code, r.text[:5]) == (552, "5.3.4")
    relay.wait_log(r"reject=552 5\.3\.4 <bob@example.org>.*size=100001")
    assert c.cmd("MAIL FROM:<bob@example.org> SIZE=100000").code == 250
    c.close()
    served(relay, "127.0.0.3")


def test_body_too_big_nothing_stored_memory_bounded(relay: RelayProcess) -> None:
    before = set(p.name for p in relay.queued())
    c = submit_login(relay, "127.0.0.4", "bob")
    assert c.cmd("MAIL FROM:<bob@example.org>").code == 250
    assert c.cmd("RCPT TO:<x@remote.test>").code == 250
    assert c.cmd("DATA").code == 354
    assert relay.proc is not None
    line = b"y" * 998 + b"\r\n"
    with PeakRSS(relay.proc.pid) as mem:
        try:
            for _ in range(20):  # ~20 MB, 200x the limit
                c.send(line * 1000)
            c.send(b".\r\n")
        except OSError:
            pass  # issue 17: past the limit + 1 MiB the server answers and hangs up
        r = c.reply()
    assert (r.code, r.text[:5]) == (552, "5.3.4")
    relay.wait_log(r"reject=552 5\.3\.4 .*relay=unknown \[127\.0\.0\.4\]")
    # Over-limit bytes are never kept: RSS never grows near the 20 MB sent.
    assert mem.peak_growth < 8_000, mem.peak_growth
    assert set(p.name for p in relay.queued()) == before
    assert relay.unready() == []  # the streamed part of the refused message is gone
    assert c.closed()  # far past the overshoot: closed (a small overshoot: body_too_big)
    c.close()
    served(relay, "127.0.0.5")


def test_max_recipients_accepted_ones_queued(relay: RelayProcess) -> None:
    c = submit_login(relay, "127.0.0.6", "alice")
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    for i in range(3):
        assert c.cmd(f"RCPT TO:<r{i}@remote.test>").code == 250
    r = c.cmd("RCPT TO:<r3@remote.test>")
    assert (r.code, r.text) == (452, "4.5.3 Too many recipients")
    relay.wait_log(r"reject=452 4\.5\.3 <r3@remote.test>")
    assert c.cmd("DATA").code == 354
    r = c.cmd("Subject: hi\r\n\r\nbody\r\n.")
    assert r.code == 250
    env = envelope(relay, qid_of(r))
    assert [x["address"] for x in env["recipients"]] == [f"r{i}@remote.test" for i in range(3)]
    c.close()
    served(relay, "127.0.0.7")


def test_recipients_past_the_limit_are_not_a_maillog_line_each(relay: RelayProcess) -> None:
    """A client pipelining RCPTs past max_recipients (452s, 1,000 a transaction before they
    count as errors) gets the first few logged one by one, then one summary line at the
    session's end: it cannot multiply the relay's maillog lines."""
    c = submit_login(relay, "127.0.0.61", "hank")  # (its own user: recipients per hour)
    assert c.cmd("MAIL FROM:<hank@example.org>").code == 250
    for i in range(3):
        assert c.cmd(f"RCPT TO:<r{i}@remote.test>").code == 250
    c.send("".join(f"RCPT TO:<x{i}@remote.test>\r\n" for i in range(300)))
    for _ in range(300):
        assert c.reply().code == 452
    assert c.cmd("QUIT").code == 221
    c.close()
    relay.wait_log(r"disconnect=from unknown \[127\.0\.0\.61\]")
    mine = [ln for ln in relay.maillog().splitlines() if "[127.0.0.61]" in ln]
    assert [ln.split(": ", 1)[1] for ln in mine if "reject=" in ln] == [
        f"NOQUEUE: reject=452 4.5.3 <x{i}@remote.test>... Too many recipients, "
        "relay=unknown [127.0.0.61]" for i in range(5)]
    assert [ln.split(": ", 1)[1] for ln in mine if "warning=" in ln] == [
        "NOQUEUE: warning=295 more refusals of the same kind suppressed "
        "(452 4.5.3 Too many recipients), relay=unknown [127.0.0.61]"]


def test_bad_rcpt_throttle_then_limit(relay: RelayProcess) -> None:
    src = "127.0.0.8"
    c = Client(relay.ports["smtp"], src)
    assert c.reply().code == 220
    assert c.cmd("EHLO spammer.test").code == 250
    assert c.cmd("MAIL FROM:<s@spam.test>").code == 250
    assert c.cmd("RCPT TO:<v1@victim.test>").code == 550
    assert c.cmd("RCPT TO:<v2@victim.test>").code == 550
    assert "RCPT flood" not in relay.maillog()
    # Past bad_rcpt_throttle (2): every RCPT, good or bad, is delayed and the flood logged.
    assert c.cmd("RCPT TO:<ok@local.test>").code == 250
    flood = relay.wait_log(rf"possible SMTP RCPT flood.*\[{re.escape(src)}\]")
    assert "bad_rcpts=2" in flood
    assert c.cmd("RCPT TO:<v3@victim.test>").code == 550
    # The bad_rcpt_limit-th (4th) refusal ends the session.
    r = c.cmd("RCPT TO:<v4@victim.test>")
    assert r.code == 550
    r = c.reply()
    assert (r.code, r.text[:5]) == (421, "4.7.0")
    assert c.closed()
    log = relay.maillog()
    lines = [ln for ln in log.splitlines() if f"[{src}]" in ln]
    kinds = [("flood" if "RCPT flood" in ln else "denied" if "Relaying denied" in ln
              else "limit" if "invalid recipients" in ln else None) for ln in lines]
    kinds = [k for k in kinds if k]
    assert kinds == ["denied", "denied", "flood", "denied", "denied", "limit"]
    assert len(re.findall(r"RCPT flood.*" + re.escape(src), log)) == 1  # logged once
    served(relay, "127.0.0.9")


def test_max_auth_failures_per_connection(relay: RelayProcess) -> None:
    src = "127.0.0.10"
    c = Client(relay.ports["submissions"], src)
    c.sock = client_ctx().wrap_socket(c.sock)
    assert c.reply().code == 220
    assert c.cmd("EHLO brute.test").code == 250
    assert c.cmd(f"AUTH PLAIN {plain('frank', 'guess1')}").code == 535
    r = c.cmd(f"AUTH PLAIN {plain('frank', 'guess2')}")
    assert r.code == 535
    r = c.reply()
    assert (r.code, r.text[:5]) == (421, "4.7.0")
    assert c.closed()
    # fail2ban: IP and username on the failure lines.
    relay.wait_log(rf"authentication failed, relay=unknown \[{re.escape(src)}\].*"
             r"sasl_username=frank")
    relay.wait_log(rf"reject=421 4\.7\.0 Too many authentication failures.*\[{src}\]")
    submit_login(relay, "127.0.0.11", "alice").close()  # others log in fine


def test_auth_locked_per_ip(relay: RelayProcess) -> None:
    # A network nobody logged in from (a user known from the address's network is still
    # checked there: test_lockout_nat.py).
    src = "127.0.9.12"
    # 3 failures (max_failures_per_ip) over two connections, unknown users.
    for users in (["nobody1", "nobody2"], ["nobody3"]):
        c = Client(relay.ports["submission"], src)
        c.reply()
        c.cmd("EHLO brute.test")
        c.cmd("STARTTLS")
        c.starttls(client_ctx())
        c.cmd("EHLO brute.test")
        for u in users:
            assert c.cmd(f"AUTH PLAIN {plain(u, 'x')}").code == 535
        c.close()
    # Now even the right password is refused from that IP, without being checked (alice
    # never logged in from its network).
    c = Client(relay.ports["submission"], src)
    c.reply()
    c.cmd("EHLO brute.test")
    c.cmd("STARTTLS")
    c.starttls(client_ctx())
    c.cmd("EHLO brute.test")
    r = c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
    assert (r.code, r.text[:5]) == (454, "4.7.0")
    relay.wait_log(rf"reject=454 4\.7\.0 .*\[{re.escape(src)}\].*sasl_username=alice")
    c.close()
    submit_login(relay, "127.0.0.13", "alice").close()  # another IP: same user fine


def test_auth_locked_per_user(relay: RelayProcess) -> None:
    # One failure each from three addresses: the user "erin" is locked for everyone.
    for i, src in enumerate(("127.0.0.14", "127.0.0.15", "127.0.0.16")):
        c = submit_tls(relay, src)
        assert c.cmd(f"AUTH PLAIN {plain('erin', f'wrong{i}')}").code == 535
        c.close()
    c = submit_tls(relay, "127.0.0.17")
    r = c.cmd(f"AUTH PLAIN {plain('erin', PASSWORD)}")
    assert (r.code, r.text[:5]) == (454, "4.7.0")
    # The same connection (same IP) may still log in as somebody else.
    assert c.cmd(f"AUTH PLAIN {plain('carol', PASSWORD)}").code == 235
    c.close()
    relay.wait_log(r"reject=454 4\.7\.0 .*\[127\.0\.0\.17\].*sasl_username=erin")


def test_failed_auth_same_answer_known_and_unknown(relay: RelayProcess) -> None:
    c = submit_tls(relay, "127.0.0.18")
    known = c.cmd(f"AUTH PLAIN {plain('dan', 'wrong')}")
    unknown = c.cmd(f"AUTH PLAIN {plain('nosuchuser', 'wrong')}")
    assert known.lines == unknown.lines == ["535 5.7.8 Authentication credentials invalid"]
    c.close()
    a = relay.wait_log(r"authentication failed.*\[127\.0\.0\.18\].*sasl_username=dan")
    b = relay.wait_log(r"authentication failed.*\[127\.0\.0\.18\].*sasl_username=nosuchuser")
    strip = re.compile(r"^.*?NOQUEUE: |sasl_username=\S+")
    assert strip.sub("", a) == strip.sub("", b)


def test_a_foreign_authzid_is_logged_with_its_reason(relay: RelayProcess) -> None:
    """AUTH PLAIN whose authorization identity is not the user it authenticates (proxy
    authorization, which we do not grant: RFC 4616 2): 535 5.7.8 as for a wrong
    password, and its line says why and whom, as the other AUTH failures do (it had
    neither: `reject=535 5.7.8 authentication failed, relay=..., sasl_method=PLAIN`)."""
    c = submit_tls(relay, "127.0.0.27")
    r = c.cmd(f"AUTH PLAIN {plain('dan', PASSWORD, 'alice')}")
    assert r.lines == ["535 5.7.8 Authentication credentials invalid"]
    c.close()
    line = relay.wait_log(r"authentication failed, relay=\S+ \[127\.0\.0\.27\]")
    assert line.endswith(
        "reject=535 5.7.8 authentication failed, relay=unknown [127.0.0.27], "
        "sasl_method=PLAIN, sasl_username=dan, "
        "reason=authorization identity differs from the user"), line


def test_command_line_too_long(relay: RelayProcess) -> None:
    c = Client(relay.ports["smtp"], "127.0.0.19")
    c.reply()
    r = c.cmd("EHLO " + "a" * 600)
    assert (r.code, r.text[:5]) == (500, "5.5.6")
    assert c.cmd("EHLO ok.test").code == 250  # the session goes on
    c.close()
    served(relay, "127.0.0.20")


def test_text_line_too_long(relay: RelayProcess) -> None:
    before = set(p.name for p in relay.queued())
    c = submit_login(relay, "127.0.0.21", "bob")
    assert c.cmd("MAIL FROM:<bob@example.org>").code == 250
    assert c.cmd("RCPT TO:<x@remote.test>").code == 250
    assert c.cmd("DATA").code == 354
    r = c.cmd("Subject: long\r\n\r\n" + "z" * 999 + "\r\nok\r\n.")
    assert (r.code, r.text[:5]) == (550, "5.6.0")
    relay.wait_log(r"reject=550 5\.6\.0 .*\[127\.0\.0\.21\]")
    assert set(p.name for p in relay.queued()) == before
    # A 998-octet line is fine.
    assert c.cmd("MAIL FROM:<bob@example.org>").code == 250
    assert c.cmd("RCPT TO:<x@remote.test>").code == 250
    assert c.cmd("DATA").code == 354
    assert c.cmd("Subject: ok\r\n\r\n" + "z" * 998 + "\r\n.").code == 250
    c.close()


def test_no_crlf_flood_bounded_memory(relay: RelayProcess) -> None:
    assert relay.proc is not None
    c = Client(relay.ports["smtp"], "127.0.0.22", timeout=60)
    c.reply()
    chunk = b"A" * (1 << 20)
    with PeakRSS(relay.proc.pid) as mem:
        for _ in range(10):  # 10 MB without a line end
            c.send(chunk)
        served(relay, "127.0.0.23")  # meanwhile another client is served
        c.send(b"\r\n")
        r = c.reply()
    assert (r.code, r.text[:5]) == (500, "5.5.6")
    assert mem.peak_growth < 8_000, mem.peak_growth  # kB: never near the 10 MB sent
    assert c.cmd("NOOP").code == 250
    c.close()


def test_sender_policy_own(relay: RelayProcess) -> None:
    c = submit_login(relay, "127.0.0.24", "alice")
    r = c.cmd("MAIL FROM:<sales@example.org>")
    assert (r.code, r.text) == (553, "5.7.1 Sender address not owned by user")
    relay.wait_log(r"reject=553 5\.7\.1 <sales@example.org>.*sasl_username=alice")
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    c.close()
    c = submit_login(relay, "127.0.0.24", "bob")  # bob owns sales@
    assert c.cmd("MAIL FROM:<sales@example.org>").code == 250
    c.close()


def _send(c: Client, sender: str, rcpts: list[str]) -> list[int]:
    codes = [c.cmd(f"MAIL FROM:<{sender}>").code]
    if codes[0] != 250:
        return codes
    codes += [c.cmd(f"RCPT TO:<{r}>").code for r in rcpts]
    if 250 in codes[1:]:
        c.cmd("DATA")
        codes.append(c.cmd("Subject: t\r\n\r\nx\r\n.").code)
    else:
        c.cmd("RSET")
    return codes


def test_user_messages_per_hour(relay: RelayProcess) -> None:
    c = submit_login(relay, "127.0.0.25", "carol")
    for _ in range(3):
        assert _send(c, "carol@example.org", ["a@remote.test"]) == [250, 250, 250]
    r = c.cmd("MAIL FROM:<carol@example.org>")
    assert (r.code, r.text[:5]) == (450, "4.7.1")
    relay.wait_log(r"reject=450 4\.7\.1 .*sasl_username=carol")
    c.close()
    c = submit_login(relay, "127.0.0.25", "dan")  # other users unaffected
    assert _send(c, "dan@example.org", ["a@remote.test"]) == [250, 250, 250]
    c.close()


def test_user_recipients_per_hour(relay: RelayProcess) -> None:
    c = submit_login(relay, "127.0.0.26", "gina")
    assert _send(c, "gina@example.org", ["a@r.test", "b@r.test", "c@r.test"]) == [250] * 5
    assert c.cmd("MAIL FROM:<gina@example.org>").code == 250
    assert c.cmd("RCPT TO:<d@r.test>").code == 250
    r = c.cmd("RCPT TO:<e@r.test>")
    assert (r.code, r.text[:5]) == (450, "4.7.1")
    relay.wait_log(r"reject=450 4\.7\.1 .*sasl_username=gina")
    assert c.cmd("DATA").code == 354
    r = c.cmd("Subject: t\r\n\r\nx\r\n.")
    assert r.code == 250
    assert [x["address"] for x in envelope(relay, qid_of(r))["recipients"]] == ["d@r.test"]
    c.close()


# ============================================================== timeouts
@pytest.fixture(scope="module")
def slow_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess(
        tmp_path_factory.mktemp("timeouts"),
        overrides={"limits": {"command_timeout": "1s", "data_block_timeout": "1s",
                              "data_final_timeout": "2s", "tls_handshake_timeout": "1s",
                              "session_timeout": "4s", "connection_rate_per_ip": 0}},
    ).start()
    yield r
    r.stop()
    no_traceback(r)


def _timeout_reply(c: Client) -> None:
    r = c.reply()
    assert (r.code, r.text[:5]) == (421, "4.4.2"), r
    assert c.closed()


def test_command_timeout(slow_relay: RelayProcess) -> None:
    c = Client(slow_relay.ports["smtp"], "127.0.1.1")
    assert c.reply().code == 220
    assert c.cmd("EHLO idle.test").code == 250
    _timeout_reply(c)  # then nothing: the server gives up
    slow_relay.wait_log(r"reject=421 4\.4\.2 .*\[127\.0\.1\.1\], stage=timeout")
    served(slow_relay, "127.0.1.2")


def test_data_block_timeout(slow_relay: RelayProcess) -> None:
    before = len(slow_relay.queued())
    c = Client(slow_relay.ports["smtp"], "127.0.1.3")
    c.reply()
    c.cmd("EHLO x.test")
    c.cmd("MAIL FROM:<a@x.test>")
    assert c.cmd("RCPT TO:<b@local.test>").code == 250
    assert c.cmd("DATA").code == 354
    sent = b"Subject: stall\r\n\r\nhalf a mess"
    c.send(sent)
    _timeout_reply(c)
    # The lost message's own line, as Postfix's "timeout after DATA (N bytes)": its
    # queue id first and the bytes that came, not a NOQUEUE line like an idle client's.
    slow_relay.wait_log(r": [0-9A-Z]{17}: reject=421 4\.4\.2 Timeout exceeded, closing "
                        r"connection, relay=unknown \[127\.0\.1\.3\], stage=timeout, "
                        rf"size={len(sent)}$")
    assert len(slow_relay.queued()) == before
    served(slow_relay, "127.0.1.4")


def test_data_final_timeout_dribbling_client(slow_relay: RelayProcess) -> None:
    """Each byte arrives within the block timeout, but the whole DATA takes too long."""
    before = len(slow_relay.queued())
    c = Client(slow_relay.ports["smtp"], "127.0.1.5")
    c.reply()
    c.cmd("EHLO x.test")
    c.cmd("MAIL FROM:<a@x.test>")
    c.cmd("RCPT TO:<b@local.test>")
    assert c.cmd("DATA").code == 354
    c.sock.settimeout(0.4)
    got = b""
    for _ in range(40):  # up to ~16 s of dribbling; the server stops it after 2 s
        try:
            c.send(b"x")
            got += c.sock.recv(1000)
        except TimeoutError:
            continue
        except OSError:
            break
        if got:
            break
    assert got.startswith(b"421 4.4.2"), got
    slow_relay.wait_log(r"reject=421 4\.4\.2 .*\[127\.0\.1\.5\]")
    assert len(slow_relay.queued()) == before
    served(slow_relay, "127.0.1.6")


def test_starttls_handshake_timeout(slow_relay: RelayProcess) -> None:
    c = Client(slow_relay.ports["smtp"], "127.0.1.7")
    c.reply()
    c.cmd("EHLO x.test")
    assert c.cmd("STARTTLS").code == 220
    # Half a ClientHello (a record header announcing more): the server drops the
    # connection after tls_handshake_timeout, sending nothing in clear (RFC 3207 4: a
    # 421 there reached the client's TLS layer as a broken record), and logs the expiry
    # as a 465 handshake's.
    c.send(b"\x16\x03\x01\x02\x00\x01\x00")
    assert c.closed(timeout=10)
    assert c.buf == b""
    slow_relay.wait_log(r"tls_failed=from unknown \[127\.0\.1\.7\], "
                        r"reason=handshake timed out, listener=smtp:")
    assert not re.search(r"reject=421 .*\[127\.0\.1\.7\]", slow_relay.maillog())
    served(slow_relay, "127.0.1.8")


def test_session_timeout_in_a_starttls_handshake(relay_factory) -> None:  # noqa: ANN001
    """The session time limit passing while a STARTTLS handshake waits (a ClientHello
    half sent): the connection is cut at once, nothing written in clear (RFC 3207 4),
    one line for the limit. Before, `421 4.4.2 Session time limit exceeded` went out in
    clear into the handshake and the session lived on, holding its slot, until
    tls_handshake_timeout (here 10 min) ended the handshake's wait."""
    r = relay_factory({"limits": {"session_timeout": "2s", "tls_handshake_timeout": "10m",
                                  "connection_rate_per_ip": 0}})
    c = Client(r.ports["submission"], "127.0.1.15")
    c.reply()
    c.cmd("EHLO x.test")
    assert c.cmd("STARTTLS").code == 220
    c.send(b"\x16\x03\x01\x02\x00\x01\x00")  # a record header announcing more
    assert c.closed(timeout=10)
    assert c.buf == b""
    r.wait_log(r"disconnect=from unknown \[127\.0\.1\.15\]")
    log = r.maillog()
    assert len(re.findall(r"421 4\.4\.2 session time limit, relay=unknown "
                          r"\[127\.0\.1\.15\]", log)) == 1
    assert "tls_failed=from unknown [127.0.1.15]" not in log
    no_traceback(r)


def test_implicit_tls_handshake_timeout(slow_relay: RelayProcess) -> None:
    c = Client(slow_relay.ports["submissions"], "127.0.1.9")
    assert c.closed(timeout=10)  # never said hello: closed, not held open
    served(slow_relay, "127.0.1.10")


def test_session_timeout(slow_relay: RelayProcess) -> None:
    """A client that keeps the command timer happy is still cut at session_timeout."""
    c = Client(slow_relay.ports["smtp"], "127.0.1.11")
    c.reply()
    c.cmd("EHLO x.test")
    r = None
    for _ in range(40):
        readable, _w, _x = select.select([c.sock], [], [], 0.4)
        try:
            r = c.reply() if readable else c.cmd("NOOP")
        except OSError:
            break
        if r.code != 250:
            break
    assert r is not None and (r.code, r.text[:5]) == (421, "4.4.2"), r
    slow_relay.wait_log(r"421 4\.4\.2 session time limit.*\[127\.0\.1\.11\]")
    served(slow_relay, "127.0.1.12")


def _drip_data(c: Client, until_closed: bool) -> None:
    """A transaction to a local address, then body lines slower than nothing cuts."""
    assert c.reply().code == 220
    c.cmd("EHLO x.test")
    assert c.cmd("MAIL FROM:<a@remote.example>").code == 250
    assert c.cmd("RCPT TO:<x@local.test>").code == 250
    assert c.cmd("DATA").code == 354
    for _ in range(40 if until_closed else 3):
        try:
            c.send(b"Subject: dripped\r\n")
        except OSError:
            return
        readable, _w, _x = select.select([c.sock], [], [], 0.3)
        if readable:
            return


def test_cut_in_data_names_the_lost_message(tmp_path: Path) -> None:
    """The session time limit and a shutdown that end a session in DATA log the queue id
    of the message they lose (and its bytes so far): before, the 421 line said NOQUEUE and
    a shutdown logged nothing, so the message a client was sending vanished unnamed."""
    r = RelayProcess(tmp_path, overrides={
        "shutdown_timeout": "1s",
        "limits": {"session_timeout": "3s", "data_final_timeout": "60s",
                   "data_block_timeout": "10s", "connection_rate_per_ip": 0}}).start()
    try:
        c = Client(r.ports["smtp"], "127.0.1.13")
        _drip_data(c, until_closed=True)
        assert (c.reply().code, c.closed()) == (421, True)
        line = r.wait_log(r"reject=421 4\.4\.2 session time limit, "
                          r"relay=unknown \[127\.0\.1\.13\]")
        m = re.search(r": (\w+): reject=421 4\.4\.2 session time limit, .*, size=(\d+)", line)
        assert m and m[1] != "NOQUEUE" and int(m[2]) > 0, line
        d = Client(r.ports["smtp"], "127.0.1.14")
        _drip_data(d, until_closed=False)
        r.stop()
        assert d.reply().code == 421
        log = r.maillog()
        m = re.search(r": (\w+): reject=421 4\.3\.2 Service shutting down.*"
                      r"\[127\.0\.1\.14\], size=(\d+)", log)
        assert m and m[1] != "NOQUEUE" and int(m[2]) > 0, log
        assert not r.queued()
    finally:
        r.stop()
    no_traceback(r)


def test_shutdown_in_a_starttls_handshake_writes_nothing_in_clear(tmp_path: Path
                                                                  ) -> None:
    """A stop (SIGTERM, past shutdown_timeout) that ends a session waiting in a STARTTLS
    handshake: aborted without a reply (RFC 3207 4: after our 220 only TLS may cross).
    Before, `421 4.3.2 Service shutting down` went out in clear into the handshake."""
    r = RelayProcess(tmp_path, overrides={
        "shutdown_timeout": "1s",
        "limits": {"tls_handshake_timeout": "10m", "connection_rate_per_ip": 0}}).start()
    try:
        c = Client(r.ports["submission"], "127.0.1.16")
        c.reply()
        c.cmd("EHLO x.test")
        assert c.cmd("STARTTLS").code == 220
        c.send(b"\x16\x03\x01\x02\x00\x01\x00")  # a record header announcing more
        r.stop()
        assert c.closed(timeout=10)
        assert c.buf == b""
    finally:
        r.stop()
    no_traceback(r)


# ============================================================== connections
def test_max_connections_global_and_per_ip(tmp_path: Path) -> None:
    # pool_eviction off: the held sessions are idle before AUTH and would otherwise make
    # room for the fifth (issue 17; tests/integration/test_eviction.py).
    r = RelayProcess(tmp_path, overrides={"limits": {
        "max_connections": 4, "max_connections_per_ip": 2, "connection_rate_per_ip": 0,
        "pool_eviction": False}}).start()
    try:
        port = r.ports["smtp"]
        held = [Client(port, "127.0.2.1"), Client(port, "127.0.2.1")]
        for c in held:
            assert c.reply().code == 220
        third = Client(port, "127.0.2.1")
        x = third.reply()
        assert (x.code, x.text[:5]) == (421, "4.7.0") and "your address" in x.text
        assert third.closed()
        r.wait_log(r"reject=421 4\.7\.0 Too many connections from your address.*"
                 r"\[127\.0\.2\.1\], stage=connect")
        held += [Client(port, "127.0.2.2"), Client(port, "127.0.2.3")]
        for c in held[2:]:
            assert c.reply().code == 220
        fifth = Client(port, "127.0.2.4")
        x = fifth.reply()
        assert (x.code, x.text) == (421, "4.7.0 Too many connections, try again later")
        r.wait_log(r"reject=421 4\.7\.0 Too many connections, .*\[127\.0\.2\.4\]")
        # A slot freed is a slot served.
        held.pop().cmd("QUIT")
        deadline = time.monotonic() + 10
        while True:
            c = Client(port, "127.0.2.5")
            if c.reply().code == 220:
                break
            c.close()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.cmd("EHLO ok.test").code == 250
        for c in held:
            c.close()
        no_traceback(r)
    finally:
        r.stop()


def test_burst_of_plaintext_connects_from_one_address_is_not_pending(tmp_path: Path
                                                                        ) -> None:
    """`max_pending_per_ip` counts connections in a 465 handshake or a greeting delay,
    nothing else: 8 simultaneous connects from one address to 25 and 8 to 587 (an MTA's
    parallel deliveries, an office behind one NAT), accepted in one batch, are all
    greeted. The relay is stopped while they wait in the backlog, so one accept batch
    takes them all; before, every one past the fifth was refused "Too many connections
    from your address in handshake" although none of them had a handshake to do."""
    r = RelayProcess(tmp_path).start()
    assert r.proc is not None
    pid = r.proc.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            clients = [Client(r.ports[m], "127.0.3.9") for m in ("smtp", "submission")
                       for _ in range(8)]
        finally:
            os.kill(pid, signal.SIGCONT)
        codes = [c.reply().code for c in clients]
        assert codes == [220] * 16, codes
        for c in clients:
            assert c.cmd("EHLO burst.test").code == 250
            c.close()
        assert "reason=pending_ip" not in r.maillog()
        no_traceback(r)
    finally:
        r.stop()


def test_connection_rate_per_ip(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path, overrides={"limits": {"connection_rate_per_ip": 3}}).start()
    try:
        port = r.ports["smtp"]
        for _ in range(3):
            with Client(port, "127.0.3.1") as c:
                assert c.reply().code == 220
        with Client(port, "127.0.3.1") as c:
            x = c.reply()
            assert (x.code, x.text[:5]) == (421, "4.7.0") and "rate" in x.text
            assert c.closed()
        r.wait_log(r"reject=421 4\.7\.0 Connection rate limit.*\[127\.0\.3\.1\]")
        served(r, "127.0.3.2")
    finally:
        r.stop()


def test_connection_rate_global_delays_not_refuses(tmp_path: Path) -> None:
    """sendmail's CONNECTION_RATE_THROTTLE: past the rate new connections wait for their
    greeting; 421 only when the wait would pass connection_rate_max_delay."""
    r = RelayProcess(tmp_path, overrides={"limits": {
        "connection_rate": 3, "connection_rate_per_ip": 0,
        "connection_rate_max_delay": "1s"}}).start()
    try:
        port = r.ports["smtp"]
        time.sleep(1.5)  # let wait_ready's probes leave the schedule
        burst = [Client(port, f"127.0.4.{i + 1}") for i in range(6)]  # all at once
        assert [c.reply().code for c in burst] == [220] * 6
        for c in burst:
            c.close()
        time.sleep(3)
        # 20 at once: 3 at once, then 1 every 1/3 s up to a 1 s wait; the rest get 421.
        flood = [Client(port, f"127.0.4.{i + 20}") for i in range(20)]
        codes = [c.reply().code for c in flood]
        for c in flood:
            c.close()
        assert codes.count(220) >= 6 and codes.count(421) >= 1, codes
        assert set(codes) == {220, 421}
        r.wait_log(r"reject=421 4\.7\.0 Connection rate limit.*reason=rate")
        # Later, service resumes.
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.3)
            with Client(port, "127.0.4.99") as c:
                if c.reply().code == 220:
                    break
            assert time.monotonic() < deadline
    finally:
        r.stop()


# ============================================================== host checks (delay_checks)
@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDNSServer]:
    srv = FakeDNSServer({
        "40.5.0.127.in-addr.arpa": {"PTR": ["good.test"]},
        "good.test": {"A": ["127.0.5.40"]},
        "42.5.0.127.in-addr.arpa": {"PTR": ["listed.test"]},
        "listed.test": {"A": ["127.0.5.42"]},
        "42.5.0.127.bl.test": {"A": ["127.0.0.2"]},
        "43.5.0.127.in-addr.arpa": {"PTR": ["forged.test"]},
        "forged.test": {"A": ["127.0.5.99"]},
        "44.5.0.127.in-addr.arpa": "SERVFAIL",
    }).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def checked_relay(tmp_path_factory: pytest.TempPathFactory, dns: FakeDNSServer
                  ) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path_factory.mktemp("checks"), overrides={
        "checks": {"require_reverse_dns": True, "dnsbl": ["bl.test"]},
        "delivery": {"nameservers": [dns.nameserver], "dns_timeout": "3s"},
        "limits": {"connection_rate_per_ip": 0},
    }).start()
    yield r
    r.stop()
    no_traceback(r)


def _rcpt_unauth(relay: RelayProcess, src: str, rcpt: str = "x@local.test") -> object:
    with Client(relay.ports["smtp"], src) as c:
        c.reply()
        c.cmd("EHLO host.test")
        assert c.cmd("MAIL FROM:<a@remote.test>").code == 250
        return c.cmd(f"RCPT TO:<{rcpt}>")


def test_no_ptr_refused_without_auth_relays_after_auth(checked_relay: RelayProcess) -> None:
    r = _rcpt_unauth(checked_relay, "127.0.5.41")
    assert (r.code, r.text[:6]) == (550, "5.7.25"), r
    checked_relay.wait_log(r"reject=550 5\.7\.25 <x@local.test>.*\[127\.0\.5\.41\]")
    c = submit_login(checked_relay, "127.0.5.41")
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert c.cmd("RCPT TO:<someone@far.test>").code == 250
    assert c.cmd("DATA").code == 354
    assert c.cmd("Subject: roaming\r\n\r\nhi\r\n.").code == 250
    c.close()


def test_forward_confirmed_ptr_accepted(checked_relay: RelayProcess) -> None:
    r = _rcpt_unauth(checked_relay, "127.0.5.40")
    assert r.code == 250, r
    checked_relay.wait_log(r"good\.test \[127\.0\.5\.40\]")


def test_ptr_not_pointing_back_refused(checked_relay: RelayProcess) -> None:
    r = _rcpt_unauth(checked_relay, "127.0.5.43")
    assert (r.code, r.text[:6]) == (550, "5.7.25"), r


def test_ptr_servfail_temporary(checked_relay: RelayProcess) -> None:
    r = _rcpt_unauth(checked_relay, "127.0.5.44")
    assert (r.code, r.text[:6]) == (450, "4.7.25"), r


@pytest.mark.parametrize("src", ["127.0.5.42", "127.0.5.41"])  # listed; no PTR
def test_postmaster_at_a_local_domain_passes_host_checks(checked_relay: RelayProcess,
                                                         src: str) -> None:
    """RFC 5321 4.5.1: postmaster at a domain we serve MUST be supported, and blocks on it
    narrowly tailored. <Postmaster> was exempt from the host checks but
    <PostMaster@local.test> was refused (554 / 550), so a listed or PTR-less sender
    could not reach the postmaster to ask for help. Other recipients still refused."""
    with Client(checked_relay.ports["smtp"], src) as c:
        c.reply()
        c.cmd("EHLO host.test")
        assert c.cmd("MAIL FROM:<a@remote.test>").code == 250
        r = c.cmd("RCPT TO:<PostMaster@local.test>")
        assert r.code == 250, r
        assert c.cmd("RCPT TO:<x@local.test>").code in (550, 554)
        assert c.cmd("RCPT TO:<postmaster@remote.test>").code == 550  # not ours: relay


def test_dnsbl_listed_refused_without_auth(checked_relay: RelayProcess) -> None:
    r = _rcpt_unauth(checked_relay, "127.0.5.42")
    assert (r.code, r.text[:5]) == (554, "5.7.1") and "bl.test" in str(r), r
    checked_relay.wait_log(r"reject=554 5\.7\.1 <x@local.test>.*bl\.test.*\[127\.0\.5\.42\]")
    c = submit_login(checked_relay, "127.0.5.42")
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert c.cmd("RCPT TO:<someone@far.test>").code == 250
    c.close()


def test_auth_before_starttls_is_logged(relay: RelayProcess) -> None:
    """AUTH on 587 before STARTTLS: 538 5.7.11 (RFC 4954 4) and one `reject=` line naming
    the mechanism, and whether the client sent its credentials in clear with it (it had
    no line: the admin never saw a client trying to log in without TLS)."""
    c = Client(relay.ports["submission"], "127.0.0.28")
    c.reply()
    c.cmd("EHLO x.test")
    r = c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
    assert r.lines == ["538 5.7.11 Encryption required for requested authentication mechanism"]
    r = c.cmd("AUTH LOGIN")
    assert r.lines == ["538 5.7.11 Encryption required for requested authentication mechanism"]
    c.cmd("QUIT")
    c.close()
    relay.wait_log(r"disconnect=from \S+ \[127\.0\.0\.28\]")
    lines = [ln for ln in relay.maillog().splitlines()
             if "reject=538 " in ln and "[127.0.0.28]" in ln]
    assert [ln.split(": ", 1)[1] for ln in lines] == [
        "NOQUEUE: reject=538 5.7.11 Encryption required for requested authentication "
        "mechanism, relay=unknown [127.0.0.28], sasl_method=PLAIN, "
        "reason=credentials sent without TLS",
        "NOQUEUE: reject=538 5.7.11 Encryption required for requested authentication "
        "mechanism, relay=unknown [127.0.0.28], sasl_method=LOGIN",
    ], lines
    assert PASSWORD not in relay.maillog()


def test_a_non_ascii_address_without_smtputf8_is_logged(relay: RelayProcess) -> None:
    """A client that does not say SMTPUTF8 (swaks, an older mail program) naming a
    non-ASCII recipient or sender: 553 5.6.7 (RFC 6531 3.5) and one `reject=` line naming
    the address (it had none: the admin could not see why a recipient was lost)."""
    swaks = ci.require_tool("swaks", "swaks")
    r = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--local-interface", "127.0.0.29",
         "--port", str(relay.ports["submission"]), "--tls",
         "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
         "--from", "alice@example.org", "--to", "b\u00f8b@remote.example"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 24, r.stdout + r.stderr  # swaks: RCPT refused
    assert "553 5.6.7 Non-ASCII address requires SMTPUTF8" in r.stdout, r.stdout
    c = Client(relay.ports["smtp"], "127.0.0.30")
    c.reply()
    c.cmd("EHLO x.test")
    assert c.cmd("MAIL FROM:<j\u00f6rg@remote.example>").lines == [
        "553 5.6.7 Non-ASCII address requires SMTPUTF8"]
    c.cmd("QUIT")
    c.close()
    relay.wait_log(r"disconnect=from \S+ \[127\.0\.0\.30\]")
    relay.wait_log(r"disconnect=from \S+ \[127\.0\.0\.29\]")
    lines = [ln.split(": ", 1)[1] for ln in relay.maillog().splitlines()
             if "5.6.7" in ln and ("[127.0.0.29]" in ln or "[127.0.0.30]" in ln)]
    assert lines == [
        "NOQUEUE: reject=553 5.6.7 <b\u00f8b@remote.example>... Non-ASCII address requires "
        "SMTPUTF8, relay=unknown [127.0.0.29]",
        "NOQUEUE: reject=553 5.6.7 <j\u00f6rg@remote.example>... Non-ASCII address requires "
        "SMTPUTF8, relay=unknown [127.0.0.30]"], lines
