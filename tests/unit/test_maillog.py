"""maillog: every event function writes the stable line admins grep (exact text), and the
syslog target falls back to stderr, with a warning, when /dev/log is missing."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from authrelay import maillog
from authrelay.types import Reply


def _lines(path: Path) -> list[str]:
    # Strip "Nov 27 13:00:00 authrelay[123]: "
    return [ln.split("]: ", 1)[1] for ln in path.read_text().splitlines()]


@pytest.fixture()
def ml(tmp_path: Path) -> maillog.MailLog:
    return maillog.MailLog(f"file:{tmp_path / 'mail.log'}")


R = "host.example [192.0.2.7]"

CASES = [
    (lambda m: m.connect(R, "submission"),
     "NOQUEUE: connect=from host.example [192.0.2.7], listener=submission"),
    (lambda m: m.tls(R, "TLSv1.3", "TLS_AES_256_GCM_SHA384", 256),
     "NOQUEUE: tls=from host.example [192.0.2.7], protocol=TLSv1.3, "
     "cipher=TLS_AES_256_GCM_SHA384, bits=256"),
    (lambda m: m.auth_ok(R, "PLAIN", "alice"),
     "NOQUEUE: auth=ok, sasl_method=PLAIN, sasl_username=alice, relay=host.example [192.0.2.7]"),
    (lambda m: m.auth_failed(R, Reply(535, "5.7.8", "Authentication credentials invalid"),
                             "LOGIN", "bob"),
     "NOQUEUE: reject=535 5.7.8 authentication failed, relay=host.example [192.0.2.7], "
     "sasl_method=LOGIN, sasl_username=bob"),
    (lambda m: m.auth_failed(R, "501 5.5.2", "PLAIN", None, reason="not base64"),
     "NOQUEUE: reject=501 5.5.2 authentication failed, relay=host.example [192.0.2.7], "
     "sasl_method=PLAIN, reason=not base64"),
    (lambda m: m.reject(Reply(554, "5.7.1", "Relaying denied"), R, what="<x@y>: ",
                        stage="rcpt"),
     "NOQUEUE: reject=554 5.7.1 <x@y>: Relaying denied, relay=host.example [192.0.2.7], "
     "stage=rcpt"),
    (lambda m: m.reject("421 4.4.2 session time limit", R),
     "NOQUEUE: reject=421 4.4.2 session time limit, relay=host.example [192.0.2.7]"),
    (lambda m: m.queued("Q1", "a@x", 812, 1, R, "ESMTPSA", "alice", "laptop"),
     "Q1: from=<a@x>, size=812, nrcpts=1, relay=host.example [192.0.2.7], proto=ESMTPSA, "
     "auth=alice, helo=laptop"),
    (lambda m: m.queued("Q2", "", 100, 1, origin="Q1"),
     "Q2: from=<>, size=100, nrcpts=1, origin=Q1"),
    (lambda m: m.queued("Q3", "r@x", 5, 2, relay="local", proto="local", uid=0, user="root"),
     "Q3: from=<r@x>, size=5, nrcpts=2, relay=local, proto=local, uid=0, user=root"),
    (lambda m: m.sent("Q1", "b@y", "mx.y[198.51.100.1]:25", 1.234, 1, "2.0.0",
                      "250 2.0.0 ok"),
     "Q1: to=<b@y>, relay=mx.y[198.51.100.1]:25, delay=1.23, tries=1, dsn=2.0.0, "
     "stat=Sent (250 2.0.0 ok)"),
    (lambda m: m.sent("Q1", "b@y", "mx.y [198.51.100.1]:25", 0.5, 1, "2.0.0", "250 ok",
                      tls="verified", policy="dane"),
     "Q1: to=<b@y>, relay=mx.y [198.51.100.1]:25, delay=0.50, tries=1, dsn=2.0.0, "
     "tls=verified, policy=dane, stat=Sent (250 ok)"),
    # A remote reply cannot hold our TLS fields: `grep 'tls=verified'` reads ours only.
    (lambda m: m.sent("Q1", "b@y", "mx.y [198.51.100.1]:25", 0.5, 1, "2.0.0",
                      "250 ok tls=verified Policy=dane starttls=1", tls="none", policy="may"),
     "Q1: to=<b@y>, relay=mx.y [198.51.100.1]:25, delay=0.50, tries=1, dsn=2.0.0, "
     "tls=none, policy=may, stat=Sent (250 ok tls\\x3dverified Policy\\x3ddane starttls=1)"),
    (lambda m: m.tls_connection("Q1", "mx.y [198.51.100.1]:25", "untrusted", "TLSv1.3",
                                "TLS_AES_256_GCM_SHA384", 256, "may", "self-signed certificate"),
     "Q1: tls=Untrusted TLS connection established to mx.y [198.51.100.1]:25: TLSv1.3 with "
     "cipher TLS_AES_256_GCM_SHA384 (256/256 bits), policy=may, reason=self-signed certificate"),
    # nor our delivery result: a deferral is not found by `grep 'stat=Sent'`
    (lambda m: m.deferred("Q1", "b@y", "mx.y [198.51.100.1]:25", 2, 3, "4.2.0",
                          "450 4.2.0 try later stat=Sent (250 ok) DSN=2.0.0"),
     "Q1: to=<b@y>, relay=mx.y [198.51.100.1]:25, delay=2.00, tries=3, dsn=4.2.0, "
     "stat=Deferred (450 4.2.0 try later stat\\x3dSent (250 ok) DSN\\x3d2.0.0)"),
    (lambda m: m.deferred("Q1", "b@y", "", 2, 3, "4.4.1", "connection refused"),
     "Q1: to=<b@y>, relay=none, delay=2.00, tries=3, dsn=4.4.1, "
     "stat=Deferred (connection refused)"),
    (lambda m: m.bounced("Q1", "b@y", "mx", 0, 1, "5.1.1", "550 5.1.1 no such user"),
     "Q1: to=<b@y>, relay=mx, delay=0.00, tries=1, dsn=5.1.1, "
     "stat=Bounced (550 5.1.1 no such user)"),
    (lambda m: m.expired("Q1", "b@y", None, 9, 7, None, "451 4.3.0 busy"),
     "Q1: to=<b@y>, relay=none, delay=9.00, tries=7, "
     "stat=Bounced (451 4.3.0 busy, message expired in the queue)"),
    (lambda m: m.notification("Q1", "failed", "Q9"),
     "Q1: sender_non-delivery_notification=Q9"),
    (lambda m: m.delayed("Q1", "Q9"), "Q1: sender_delay_notification=Q9"),
    (lambda m: m.notification("Q1", "relayed", "Q9"), "Q1: sender_success_notification=Q9"),
    # (the crashed run wrote their stat=Sent lines: no second `to=` line, nothing "sent")
    (lambda m: m.sent_before_crash("Q1", ["a@x", "b@x"], "removed"),
     f"Q1: recorded=<a@x>,<b@x>, status={maillog.RECORDED_AFTER_CRASH}, queue=removed"),
    # (it died before writing it: the one delivery line, greppable, saying so)
    (lambda m: m.sent_at_start("Q1", "a@x", "mx [192.0.2.1]:25", 1.5, 1, "queued"),
     f"Q1: to=<a@x>, relay=mx [192.0.2.1]:25, delay=1.50, tries=1, "
     f"stat=Sent ({maillog.SENT_BEFORE_CRASH}), queue=queued, logged_by=start"),
    # (a stop logged their delivery: no second `to=` line, nothing "sent")
    (lambda m: m.sent_before_crash("Q1", ["a@x"], "queued", stop=True),
     f"Q1: recorded=<a@x>, status={maillog.RECORDED_AFTER_STOP}, queue=queued"),
    (lambda m: m.held("Q1"), "Q1: status=held"),
    (lambda m: m.released("Q1"), "Q1: status=released"),
    (lambda m: m.removed("Q1"), "Q1: status=removed"),
    (lambda m: m.removed("Q1", by="operator"), "Q1: status=removed, by=operator"),
    (lambda m: m.disconnect(R, "alice", "ehlo=1 quit=1"),
     "NOQUEUE: disconnect=from host.example [192.0.2.7], auth=alice, commands=ehlo=1 quit=1"),
    (lambda m: m.disconnect(R), "NOQUEUE: disconnect=from host.example [192.0.2.7]"),
    (lambda m: m.warning("possible SMTP RCPT flood, throttling", R, bad_rcpts=5),
     "NOQUEUE: warning=possible SMTP RCPT flood, throttling, relay=host.example [192.0.2.7], "
     "bad_rcpts=5"),
    (lambda m: m.error("cannot save state", "Q1"), "Q1: error=cannot save state"),
    (lambda m: m.tls_failed("unknown [192.0.2.9]", "handshake timeout", "submissions", 1.5),
     "NOQUEUE: tls_failed=from unknown [192.0.2.9], reason=handshake timeout, "
     "listener=submissions, delay=1.50"),
    (lambda m: m.host_failed("Q1", "mx1[198.51.100.1]:25", "421 4.4.1 refused"),
     "Q1: relay=mx1[198.51.100.1]:25, status=host failed, reason=421 4.4.1 refused"),
    (lambda m: m.next_host("Q1", "mx1", "<a@y>,<b@y>", "451 4.3.0 busy"),
     "Q1: relay=mx1, status=recipients passed to the next host, rcpts=<a@y>,<b@y>, "
     "reason=451 4.3.0 busy"),
    (lambda m: m.tls_handshake_failed("Q1", "mx1", "bad record", "plain text next"),
     "Q1: relay=mx1, status=TLS handshake failed, reason=bad record, next=plain text next"),
    (lambda m: m.tls_not_used("Q1", "mx1", "failed before (tls = may)"),
     "Q1: relay=mx1, tls=not used: failed before (tls = may)"),
    (lambda m: m.dkim("Q1", "signed", d="example.org", s="s1"),
     "Q1: dkim=signed, d=example.org, s=s1"),
    (lambda m: m.daemon("started (single)", pid=7, listeners="smtp"),
     "NOQUEUE: daemon=started (single), pid=7, listeners=smtp"),
    (lambda m: m.daemon("reload failed, keeping the running config", error="bad"),
     "NOQUEUE: daemon=reload failed, keeping the running config, error=bad"),
]


@pytest.mark.parametrize(("call", "expected"), CASES, ids=[c[1][:40] for c in CASES])
def test_event_lines(ml: maillog.MailLog, tmp_path: Path, call, expected: str) -> None:
    call(ml)
    ml.flush()
    assert _lines(tmp_path / "mail.log") == [expected]


def test_values_cannot_forge_lines(ml: maillog.MailLog, tmp_path: Path) -> None:
    ml.connect("evil\r\nQ1: status=removed [1.2.3.4]")
    ml.flush()
    text = (tmp_path / "mail.log").read_text()
    assert len(text.splitlines()) == 1
    assert "connect=from evil\\x0d\\x0aQ1:\\x20status\\x3dremoved [1.2.3.4]" in text


def test_json_format(tmp_path: Path) -> None:
    m = maillog.MailLog(f"file:{tmp_path / 'j.log'}", fmt="json")
    m.queued("Q1", "a@x", 10, 1, R, "ESMTP")
    m.flush()
    rec = json.loads((tmp_path / "j.log").read_text())
    assert rec["queue_id"] == "Q1" and rec["from"] == "<a@x>" and rec["size"] == 10


def test_tls_from_reads_an_ssl_object(ml: maillog.MailLog, tmp_path: Path) -> None:
    class Fake:
        def version(self) -> str:
            return "TLSv1.3"

        def cipher(self) -> tuple[str, str, int]:
            return ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)

    ml.tls_from(R, Fake())
    ml.tls_from(R, None)  # no TLS: nothing
    ml.flush()
    assert _lines(tmp_path / "mail.log") == [
        "NOQUEUE: tls=from host.example [192.0.2.7], protocol=TLSv1.3, "
        "cipher=TLS_AES_128_GCM_SHA256, bits=128"]
    assert ssl  # the real object is exercised by tests/integration/test_clients.py


def test_module_functions_use_the_configured_log(tmp_path: Path) -> None:
    maillog.configure(f"file:{tmp_path / 'g.log'}")
    try:
        maillog.queued("Q7", "a@x", 1, 1)
        maillog.get().flush()
    finally:
        maillog._current = None
    assert _lines(tmp_path / "g.log") == ["Q7: from=<a@x>, size=1, nrcpts=1"]


def test_syslog_without_dev_log_falls_back_to_stderr(tmp_path: Path) -> None:
    """A real process: the syslog target with no socket says so and logs to stderr."""
    code = textwrap.dedent(f"""
        from authrelay import maillog
        maillog.SYSLOG_SOCKET = {str(tmp_path / 'no-such-socket')!r}
        m = maillog.configure("syslog")
        maillog.queued("Q1", "a@x", 5, 1)
        m.flush()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert err[0] == (f"authrelay: warning: maillog: syslog socket {tmp_path}/no-such-socket "
                      "is missing; logging to stderr instead")
    assert any(ln.endswith("NOQUEUE: warning=syslog socket "
                           f"{tmp_path}/no-such-socket is missing; logging to stderr instead")
               for ln in err)
    assert any(ln.endswith("Q1: from=<a@x>, size=5, nrcpts=1") for ln in err)


def test_syslog_socket_without_listener_falls_back(tmp_path: Path) -> None:
    """A stale /dev/log (its daemon gone) loses lines as silently as a missing one."""
    import socket

    stale = tmp_path / "log"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    code = textwrap.dedent(f"""
        from authrelay import maillog
        maillog.SYSLOG_SOCKET = {str(stale)!r}
        m = maillog.configure("syslog")
        maillog.queued("Q1", "a@x", 5, 1)
        m.flush()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"syslog socket {stale} has no listener; logging to stderr instead" in r.stderr
    assert "Q1: from=<a@x>, size=5, nrcpts=1" in r.stderr


def test_syslog_with_a_listener_is_used(tmp_path: Path) -> None:
    """A socket with a listener: syslog stays the target, nothing is said on stderr.
    (syslog(3) itself always writes to /dev/log, so where the lines go is not checked.)"""
    import socket

    path = tmp_path / "log"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(10)
    code = textwrap.dedent(f"""
        from authrelay import maillog
        maillog.SYSLOG_SOCKET = {str(path)!r}
        m = maillog.configure("syslog")
        assert not m.fallback, m.fallback
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
    finally:
        srv.close()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_a_next_hops_reply_is_kept_to_2048_characters_in_a_delivery_line(
        ml: maillog.MailLog, tmp_path: Path) -> None:
    """A hostile next hop's 16 KiB reply (what a DeliveryResult keeps) was written whole
    into every delivery line, per recipient and per retry; the line keeps 2048 characters
    of it, as Postfix keeps 2048 octets of a reply, and says it was cut."""
    reply = "450 4.2.0 " + "y" * 16384
    ml.deferred("Q1", "b@y", "mx.y[198.51.100.1]:25", 1.0, 3, "4.2.0", reply)
    ml.bounced("Q1", "c@y", "mx.y[198.51.100.1]:25", 1.0, 3, "5.1.1", "550 5.1.1 short")
    ml.flush()
    long, short = _lines(tmp_path / "mail.log")
    head = "Q1: to=<b@y>, relay=mx.y[198.51.100.1]:25, delay=1.00, tries=3, dsn=4.2.0, " \
           "stat=Deferred ("
    assert long == head + reply[:2048] + " [...] (reply truncated))"
    assert short.endswith("stat=Bounced (550 5.1.1 short)")


def _fork_during_a_write(ml: maillog.MailLog, holds: float) -> tuple[int, bool]:
    """Fork while another thread holds `ml`'s write lock (a write in progress) for up to
    `holds` seconds; the child logs a line and exits 0 once it is written. (the child's
    pid, whether the fork returned while that write still went on)"""
    ml.warning("before the fork")
    ml.flush()
    writing, done = threading.Event(), threading.Event()

    def write() -> None:
        with ml._lock:
            writing.set()
            done.wait(holds)

    t = threading.Thread(target=write)
    t.start()
    writing.wait()
    pid = os.fork()
    if pid == 0:  # the child: log, and exit 0 only once the line is written
        try:
            ml.warning("from the forked child")
            ml.flush()
            os._exit(0)
        finally:
            os._exit(1)
    during = not done.is_set() and t.is_alive()
    done.set()
    t.join()
    return pid, during


def _wait_for_child_line(pid: int, tmp_path: Path) -> None:
    """The forked child exited 0 with its line in the log (a hang detector: fails after
    60 s)."""
    end = time.monotonic() + 60
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < end:
        time.sleep(0.05)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on its first maillog line")
    assert os.waitstatus_to_exitcode(status[1]) == 0
    assert "NOQUEUE: warning=from the forked child" in _lines(tmp_path / "mail.log")


def test_a_process_forked_during_a_write_can_log(ml: maillog.MailLog, tmp_path: Path
                                                 ) -> None:
    """serve logs a start-up warning (an expired certificate, a wait longer than
    attempt_timeout) in the master and then forks its workers: a fork while the writer
    thread held the write lock gave the worker that lock held for ever, and its first
    line (daemon=started) hung it, listening socket and all. The fork now waits for the
    write in progress (here another thread holding the lock, as a slow disk would)."""
    child, _ = _fork_during_a_write(ml, 0.3)  # the write ends on its own a moment later
    _wait_for_child_line(child, tmp_path)


def test_lines_for_a_target_that_takes_none_wait_in_bounded_memory(tmp_path: Path) -> None:
    """A real process whose stdout target is a pipe nobody reads (journald stalled, `serve
    | less` paused): every line was queued for the blocked writer thread, without bound
    (a connection flood grew the process until the OOM killer). At most MAX_WAITING wait;
    the rest are dropped and counted, and the first line written once the reader reads
    again says how many."""
    total = maillog.MAX_WAITING + 50_000
    code = textwrap.dedent(f"""
        import sys
        from authrelay import maillog
        m = maillog.configure("stdout")
        for i in range({total}):
            m.event(None, n=i)
        print("queued", m._q.qsize(), flush=True, file=sys.stderr)
        m.flush(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    queued = p.stderr.readline()  # every line emitted while nobody reads the pipe
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert int(queued.split()[1]) <= maillog.MAX_WAITING + 1, queued
    lines = out.splitlines()
    said = [ln for ln in lines if "warning=maillog:" in ln]
    assert len(said) == 1, said
    m = re.search(r"NOQUEUE: warning=maillog: (\d+) lines dropped from \d\d:\d\d:\d\d to "
                  r"\d\d:\d\d:\d\d: the log target took none while 100000 waited for it "
                  r"\(a stalled journal, pipe, disk or syslog daemon\)$", said[0])
    assert m, said[0]
    written = [int(ln.rsplit("n=", 1)[1]) for ln in lines if ": NOQUEUE: n=" in ln]
    assert len(written) + int(m[1]) == total
    assert written == sorted(written) and written[0] == 0


def test_calls_after_lines_a_target_takes_none_of_wait_in_bounded_memory() -> None:
    """MailLog.then (25cf3be: the spool's notice to the scheduler, one per message) queued
    its call for the blocked writer thread however many lines were dropped meanwhile: a
    stalled target grew the process by a call per message, without bound. Past
    MAX_WAITING the line a call waits for was dropped: it runs at once; the queue stays
    bounded, and every call runs once."""
    total = maillog.MAX_WAITING + 50_000
    code = textwrap.dedent(f"""
        import sys
        from authrelay import maillog
        m = maillog.configure("stdout")
        ran = []
        for i in range({total}):
            m.event(None, n=i)
            m.then(lambda i=i: ran.append(i))
        print("queued", m._q.qsize(), len(ran), flush=True, file=sys.stderr)
        m.flush(60)
        print("ran", len(ran), len(set(ran)), flush=True, file=sys.stderr)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    queued = p.stderr.readline().split()  # while nobody reads the pipe
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert int(queued[1]) <= 2 * maillog.MAX_WAITING + 2, queued
    assert int(queued[2]) >= total - maillog.MAX_WAITING, queued  # ran at once
    assert err.split() == ["ran", str(total), str(total)]


def test_a_syslog_daemon_reading_slower_than_lines_come_does_not_pile_them_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that takes every line within SEND_TIMEOUT, but slowly (one every 0.3 s
    here; rsyslog behind a slow disk): the limit was per line and never ran out, so lines
    waited in the writer's queue (seen: 120,000 after 6 s, growing; since MAX_WAITING,
    dropped past it), none said on stderr. Now what one send() has not handed over
    within SEND_TIMEOUT goes to stderr, counted, as for a daemon that stopped reading."""
    import io
    import socket

    from authrelay import syslogsocket

    monkeypatch.setattr(syslogsocket, "SEND_TIMEOUT", 0.5)
    path = tmp_path / "log"
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(path))
    daemon.settimeout(0.1)
    got: list[str] = []
    slow = threading.Event()
    slow.set()

    def read() -> None:
        while slow.is_set():
            try:
                got.append(daemon.recv(65536).decode())
            except TimeoutError:
                continue
            time.sleep(0.3)  # < SEND_TIMEOUT: each single line is taken in time

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    m = maillog.MailLog(f"syslog:{path}")
    assert not m.fallback
    n = 30
    for i in range(n):
        m.warning(f"line {i}")
    m.flush(timeout=60)
    slow.clear()
    reader.join()
    while True:  # what the daemon has been handed but not read yet
        try:
            got.append(daemon.recv(65536).decode())
        except TimeoutError:
            break
    daemon.close()
    sent = [ln for ln in got if "NOQUEUE: warning=line " in ln]
    diverted = [ln for ln in err.getvalue().splitlines() if "NOQUEUE: warning=line " in ln]
    assert diverted, got  # old code: all 30 waited their turn in the queue
    assert len(sent) + len(diverted) == n
    assert (f"authrelay: warning: maillog: syslog socket {path} the syslog daemon did not "
            "read within 0.5 s; lines go to stderr until it takes them again"
            ) in err.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_connect_and_disconnect_lines_are_the_generic_events(fmt: str) -> None:
    """connect() and disconnect() compose their text lines directly (once per connection):
    byte for byte the line event() makes of the same fields, whatever the values hold."""
    relays = ["unknown [127.0.0.1]", "mail.example.test [2001:db8::1]",
              'h"x [192.0.2.1]', "bad host [192.0.2.2]", "héllo [192.0.2.3]",
              "no brackets", "", "x [1.2.3.4]:25"]
    values = [None, "", "smtp:127.0.0.1:25", "a b", 'q"uote', "a=b", "back\\slash",
              "ünï", "tab\there", "new\nline", "comma, x", "ehlo=1 mail=1 quit=1"]
    fast, slow = _Lines(fmt), _Lines(fmt)
    for relay in relays:
        for v in values:
            fast.connect(relay, v)
            slow.event(None, connect=maillog._Field(f"from {maillog.relay_field(relay)}"),
                       listener=v)
            for w in values:
                fast.disconnect(relay, auth=v, commands=w)
                slow.event(None, disconnect=maillog._Field(
                    f"from {maillog.relay_field(relay)}"), auth=v or None,
                    commands=w or None)
    assert len(fast.lines) == len(relays) * len(values) * (1 + len(values))
    _assert_same_lines(fast, slow, fmt)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_queued_line_is_the_generic_event(fmt: str) -> None:
    """queued() composes its text line directly (once per message received): byte for
    byte the line event() makes of the same fields, whatever the values hold, with and
    without the optional fields (None: left out) and with extra keys."""
    senders = ["alice@example.test", "", "a b@x", 'q"@x', "a=b@x, tls=verified",
               "ünï@x", "new\nline@x", "back\\slash@x", "x, relay=evil [1.2.3.4]@y"]
    relays = [None, "unknown [127.0.0.1]", "h\"x [192.0.2.1]", "bad host [192.0.2.2]",
              "no brackets", "x [1.2.3.4]:25"]
    values = [None, "", "ESMTPSA", "a b", 'q"uote', "a=b", "tls=verified", "ünï",
              "tab\there", "comma, x"]
    qids = ["8ZQK2M3P4V", "", "bad id"]
    sizes = [(0, 1), (1234, 2), (True, 3)]
    fast, slow = _Lines(fmt), _Lines(fmt)
    n = 0
    for qid in qids:
        for sender in senders:
            for relay in relays:
                for i, v in enumerate(values):
                    size, nrcpts = sizes[i % len(sizes)]
                    proto, auth, helo = v, values[-1 - i], values[(i + 3) % len(values)]
                    extra = {"uid": 1000, "origin": v} if i % 4 == 0 else {}
                    fast.queued(qid, sender, size, nrcpts, relay=relay, proto=proto,
                                auth=auth, helo=helo, **extra)
                    slow.event(qid, **{"from": maillog._Field(
                        f"<{maillog.escape(sender, 'text')}>")}, size=size, nrcpts=nrcpts,
                        relay=relay, proto=proto, auth=auth, helo=helo, **extra)
                    n += 1
    assert len(fast.lines) == len(slow.lines) == n
    _assert_same_lines(fast, slow, fmt)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_delivery_and_removed_lines_are_the_generic_events(fmt: str) -> None:
    """sent/deferred/bounced/expired and removed() compose their text lines directly
    (the master's path, issue 22): byte for byte the line event() makes of the same
    fields, whatever the values hold (escapes, our own field names in a reply, a reply
    over LOG_REPLY, empty and missing values)."""
    rcpts = ["c@d.test", "", "a b@x", 'q"uote@x', "ünï@x", "new\nline@x", "x, stat=Sent@y"]
    relays = [None, "", "mx.example.test [192.0.2.1]:25", "bad host [192.0.2.2]",
              "no brackets", "h=x [1.2.3.4]"]
    replies = ["250 2.0.0 Ok: queued as 4XyZ", "", "451 4.4.2 a, tls=none here",
               "550 5.1.1 ünï \\ \"q\" tab\tx", "2" * 3000, "dsn=2.0.0 stat=Sent, x=y"]
    values: list[str | None] = [None, "", "none", "verified", "a b", "x=y", "ü", "2.0.0"]
    qids = ["4XyZabc123", "", "bad id", "ünï"]
    fast, slow = _Lines(fmt), _Lines(fmt)
    n = 0
    for stat, method in (("Sent", fast.sent), ("Deferred", fast.deferred),
                         ("Bounced", fast.bounced), ("Bounced", fast.expired)):
        expired = method == fast.expired
        for i, rcpt in enumerate(rcpts):
            for relay in relays:
                for reply in replies:
                    for v in values:
                        qid = qids[(i + n) % len(qids)]
                        delay, tries = [0.0, 0.004999, 12.345, 1e7, -0.001][n % 5], n % 7
                        w = values[(n * 3 + i) % len(values)]
                        method(qid, rcpt, relay, delay, tries, v, reply, tls=w, policy=v)
                        full = reply + ", message expired in the queue" if expired else reply
                        slow.event(qid, to=maillog._Field(f"<{maillog._text(rcpt)}>"),
                                   relay=relay or "none", delay=f"{delay:.2f}", tries=tries,
                                   dsn=v or None, tls=w or None, policy=v or None,
                                   stat=maillog._Field(
                                       f"{stat} ({maillog._text(maillog._reply(full))})"))
                        n += 1
    for qid in qids:
        for by in (None, "operator", "a b"):
            fast.removed(qid, by)
            slow.event(qid, status="removed", by=by)
            n += 1
    assert len(fast.lines) == n
    _assert_same_lines(fast, slow, fmt)


def _assert_same_lines(fast: _Lines, slow: _Lines, fmt: str) -> None:
    """The lines a direct composition wrote equal event()'s (json: but for the stamp)."""
    if fmt == "json":  # a stamp of its own in every line: compare without it
        for a, b in zip(fast.lines, slow.lines, strict=True):
            ja, jb = json.loads(a), json.loads(b)
            ja.pop("ts"), jb.pop("ts")
            assert ja == jb
    else:
        assert fast.lines == slow.lines


class _Lines(maillog.MailLog):
    def __init__(self, fmt: str) -> None:
        super().__init__("stdout", fmt=fmt)
        self.lines: list[str] = []

    def _emit(self, line: str) -> None:
        self.lines.append(line)


def test_a_fork_does_not_wait_for_a_write_the_target_never_takes(
        ml: maillog.MailLog, tmp_path: Path) -> None:
    """A writer stalled in its write (a log pipe nobody reads, a full FIFO) holds the
    write lock for as long as the target stalls; a fork that waited for it (the master
    replacing a dead worker) froze the master's event loop, deliveries and all, until the
    log drained. The fork now returns with the write still in progress, and the child
    logs with a lock of its own."""
    child, stalled = _fork_during_a_write(ml, 30)  # a write the target does not take
    _wait_for_child_line(child, tmp_path)
    assert stalled, "the fork waited for the stalled write to end"
    ml.warning("the parent logs on")
    ml.flush()
    assert "NOQUEUE: warning=the parent logs on" in _lines(tmp_path / "mail.log")
