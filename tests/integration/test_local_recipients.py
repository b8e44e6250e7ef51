"""`[relay] local_recipients_file` on a real server (port 25 mode, smtplib over real
sockets): mail from anyone to a local domain reaches only its known recipients; the rest
is 550 5.1.1 at RCPT (no relaying on, no backscatter later), counted by the bad-RCPT
throttle; SIGHUP re-reads the list; a list that cannot be read stops the start and fails
a reload whole. Authenticated and trusted clients are unchanged."""

from __future__ import annotations

import os
import re
import signal
import smtplib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess, children

pytestmark = pytest.mark.slow

LIST = """\
# valid recipients of the local domains (Postfix relay_recipients style)
known@local.test
Mixed.Case@LOCAL.TEST    OK
@open.test
anna@xn--bcher-kva.example
otto@müller.example
"""
DOMAINS = ["local.test", "open.test", "bücher.example", "xn--mller-kva.example",
           "relay.test"]
UNKNOWN = ("550", "5.1.1 <{}>: Recipient address rejected: user unknown in local "
           "recipient table")


def _relay(make: Callable[..., RelayProcess], rcpts: Path, start: bool = True,
           workers: int = 1, **limits: int) -> RelayProcess:
    return make({"relay": {"local_domains": DOMAINS, "local_recipients_file": str(rcpts),
                           "trusted_networks": ["127.0.0.9/32"]},
                 "aliases": {"root": "admin@c.test"},
                 "limits": {"bad_rcpt_throttle": 3, "bad_rcpt_limit": 6, **limits}},
                start=start, workers=workers)


@contextmanager
def stranger(relay: RelayProcess, source: str = "127.0.0.3") -> Iterator[smtplib.SMTP]:
    """An unauthenticated client on port 25, in a transaction (SMTPUTF8 for IDN)."""
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], local_hostname="stranger.test",
                      source_address=(source, 0), timeout=30) as s:
        s.ehlo()
        assert s.mail("x@sender.test", ["SMTPUTF8"])[0] == 250
        yield s


def rcpt(s: smtplib.SMTP, address: str) -> tuple[int, str]:
    code, text = s.rcpt(address)
    return code, text.decode()


def unknown(address: str) -> tuple[int, str]:
    return 550, UNKNOWN[1].format(address)


def test_strangers_reach_only_known_recipients(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path) -> None:
    f = tmp_path / "recipients"
    f.write_text(LIST)
    relay = _relay(relay_factory, f)
    started = relay.wait_log(r"daemon=started")
    assert "any_local_part=open.test" in started  # said at start: @open.test
    # A user's own addresses count, asked of the user DB at RCPT: no reload needed.
    relay.cli("user", "add", "carol", "--password-stdin", "--address",
              "Carol.X@local.test", input="pw\n")
    relay.cli("user", "add", "dave@local.test", "--password-stdin", input="pw\n")
    known = ["known@local.test", "KNOWN@Local.Test", "mixed.case@local.test",
             '"known"@local.test', "anyone@open.test", "anna@bücher.example",
             "anna@xn--bcher-kva.example", "otto@xn--mller-kva.example",
             "otto@müller.example", "carol.x@local.test", "dave@local.test",
             "root@relay.test",  # [aliases] at hostname
             "postmaster@local.test", "Postmaster"]  # RFC 5321 4.5.1
    with stranger(relay) as s:
        for a in known:
            assert rcpt(s, a)[0] == 250, a
    cases = ["nobody@local.test", "bob@bücher.example", "anna@local.test",
             "webmaster@relay.test", "carol@local.test"]
    for a in cases:  # one a session: under bad_rcpt_throttle
        with stranger(relay) as s:
            assert rcpt(s, a) == unknown(a)
            # The session goes on: a known recipient after it, and the message queued.
            assert rcpt(s, "known@local.test")[0] == 250
            code, _ = s.data(b"Subject: hi\r\n\r\nhi\r\n")
            assert code == 250
    log = relay.maillog()
    for a in cases:  # one maillog line each, naming the sender
        lines = [ln for ln in log.splitlines()
                 if f"reject=550 5.1.1 <{a}>: Recipient address rejected" in ln]
        assert len(lines) == 1, (a, lines)
        assert "from=<x@sender.test>" in lines[0]
    # Not local: relaying denied, as before.
    with stranger(relay) as s:
        assert rcpt(s, "x@remote.test")[:1] == (550,)
        assert "5.7.1" in rcpt(s, "y@remote.test")[1]


def test_authenticated_and_trusted_clients_are_unchanged(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path) -> None:
    f = tmp_path / "recipients"
    f.write_text(LIST)
    relay = _relay(relay_factory, f)
    ctx = relay.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", relay.ports["submissions"], context=ctx,
                          timeout=30) as s:
        s.login("alice", PASSWORD)
        s.mail("alice@local.test", ["SMTPUTF8"])
        for a in ("nobody@local.test", "x@remote.test", "bob@bücher.example"):
            assert rcpt(s, a)[0] == 250, a
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=30) as s:  # port 25 AUTH
        s.starttls(context=ctx)
        s.login("alice", PASSWORD)
        s.mail("alice@local.test")
        assert rcpt(s, "nobody@local.test")[0] == 250
    with stranger(relay, source="127.0.0.9") as s:  # trusted_networks
        assert rcpt(s, "nobody@local.test")[0] == 250
        assert rcpt(s, "x@remote.test")[0] == 250


def test_a_dictionary_attack_is_throttled_then_cut(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path) -> None:
    f = tmp_path / "recipients"
    f.write_text(LIST)
    relay = _relay(relay_factory, f, bad_rcpt_throttle=2, bad_rcpt_limit=4)
    src = "127.0.0.4"
    with stranger(relay, src) as s:
        assert rcpt(s, "a@local.test") == unknown("a@local.test")
        assert rcpt(s, "b@local.test") == unknown("b@local.test")
        assert "RCPT flood" not in relay.maillog()
        assert rcpt(s, "known@local.test")[0] == 250  # delayed, still answered
        flood = relay.wait_log(rf"possible SMTP RCPT flood.*\[{re.escape(src)}\]")
        assert "bad_rcpts=2" in flood
        assert rcpt(s, "c@local.test") == unknown("c@local.test")
        # The 4th unknown recipient: 550, then 421 and the connection is closed.
        assert rcpt(s, "d@local.test") == unknown("d@local.test")
        code, text = rcpt(s, "e@local.test")  # reads the 421 sent after the 550
        assert (code, text[:5]) == (421, "4.7.0")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()
    lines = [ln for ln in relay.maillog().splitlines() if f"[{src}]" in ln]
    kinds = [k for k in (("unknown" if "5.1.1" in ln else "flood" if "RCPT flood" in ln
                          else "limit" if "invalid recipients" in ln else None)
                         for ln in lines) if k]
    assert kinds == ["unknown", "unknown", "flood", "unknown", "unknown", "limit"]


def _reload(relay: RelayProcess, outcome: str, processes: int = 1) -> str:
    """SIGHUP, then the `outcome` line of each of `processes` (the last one returned)."""
    before = relay.maillog().count(outcome)
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGHUP)
    relay.wait_for(lambda: relay.maillog().count(outcome) >= before + processes,
                   what=outcome)
    return [ln for ln in relay.maillog().splitlines() if outcome in ln][-1]


def _workers(relay: RelayProcess) -> list[int]:
    assert relay.proc is not None
    return [p for p in children(relay.proc.pid)
            if Path(f"/proc/{p}/comm").read_text().startswith("authrelay-w")]


def test_every_worker_uses_the_reloaded_list(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path) -> None:
    """With workers, the master re-reads the list too: a list it cannot read fails the
    reload before any worker is told (each keeps the running list); a good one reaches
    every worker, and a worker started after the reload (one that died) has it."""
    f = tmp_path / "recipients"
    f.write_text(LIST)
    relay = _relay(relay_factory, f, workers=2)
    relay.wait_for(lambda: relay.maillog().count("daemon=started (worker)") == 2
                   and len(_workers(relay)) == 2, what="both workers serving")
    f.unlink()
    assert f"{f}: cannot read: No such file or directory" in _reload(relay, "reload failed")
    f.write_text(LIST + "new@local.test\n")
    _reload(relay, "daemon=reloaded", processes=3)  # the master and both workers
    # Sessions land on either worker (SO_REUSEPORT): each one knows the new recipient.
    for i in range(8):
        with stranger(relay, f"127.0.0.{10 + i}") as s:
            assert rcpt(s, "new@local.test")[0] == 250
            assert rcpt(s, "old@local.test") == unknown("old@local.test")
    victim = _workers(relay)[0]
    started = relay.maillog().count("daemon=started (worker)")
    os.kill(victim, signal.SIGKILL)
    relay.wait_for(lambda: relay.maillog().count("daemon=started (worker)") > started
                   and victim not in _workers(relay) and len(_workers(relay)) == 2,
                   what="the worker replaced")
    for i in range(8):
        with stranger(relay, f"127.0.0.{20 + i}") as s:
            assert rcpt(s, "new@local.test")[0] == 250
            assert rcpt(s, "old@local.test") == unknown("old@local.test")


_LOAD_HOOK = """\
import os, threading
import authrelay.policy.recipients as recipients

_load = recipients.load


def load(cfg):
    with open(os.environ["LOAD_RECORD"], "a") as out:
        on_main = threading.current_thread() is threading.main_thread()
        out.write(f"{os.getpid()} {'loop' if on_main else 'thread'}\\n")
    return _load(cfg)


recipients.load = load
"""


def test_a_reload_reads_the_list_off_the_event_loop(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGHUP re-reads the list in every process; 200,000 entries took seconds, and
    read on the event loop (the main thread) they held every session of the process
    for as long. Each process reads it in a thread (a sitecustomize hook in the served
    interpreter records where each read ran: the start's reads are before the loop)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_LOAD_HOOK)
    record = tmp_path / "loads"
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("LOAD_RECORD", str(record))
    f = tmp_path / "recipients"
    f.write_text(LIST)
    relay = _relay(relay_factory, f, workers=2)
    relay.wait_for(lambda: relay.maillog().count("daemon=started (worker)") == 2
                   and len(_workers(relay)) == 2, what="both workers serving")
    record.write_text("")
    f.write_text(LIST + "new@local.test\n")
    _reload(relay, "daemon=reloaded", processes=3)  # the master and both workers
    reads = record.read_text().split()
    assert len(reads) == 6, reads  # (pid, where) for each of the three processes
    assert set(reads[1::2]) == {"thread"}, reads
    assert len(set(reads[0::2])) == 3, reads
    with stranger(relay) as s:
        assert rcpt(s, "new@local.test")[0] == 250


def test_sighup_rereads_the_list_and_keeps_it_when_unreadable(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path) -> None:
    from authrelay.policy.recipients import MAX_FILE_BYTES

    f = tmp_path / "recipients"
    f.write_text(LIST)
    relay = _relay(relay_factory, f)
    with stranger(relay) as s:
        assert rcpt(s, "new@local.test") == unknown("new@local.test")
    # Oversized: the reload fails whole, naming the file; the old list stays.
    with open(f, "ab") as out:
        out.truncate(MAX_FILE_BYTES + 1)
    line = _reload(relay, "reload failed")
    assert f"{f}: cannot read: larger than {MAX_FILE_BYTES} bytes" in line
    with stranger(relay) as s:
        assert rcpt(s, "known@local.test")[0] == 250
        assert rcpt(s, "new@local.test") == unknown("new@local.test")
    # Unreadable (gone), likewise.
    f.unlink()
    line = _reload(relay, "reload failed")
    assert f"{f}: cannot read: No such file or directory" in line
    with stranger(relay) as s:
        assert rcpt(s, "known@local.test")[0] == 250
    # Fixed, with a recipient added: the next session knows it.
    f.write_text(LIST + "new@local.test\n")
    _reload(relay, "daemon=reloaded")
    with stranger(relay) as s:
        assert rcpt(s, "new@local.test")[0] == 250
        assert rcpt(s, "known@local.test")[0] == 250
        assert rcpt(s, "other@local.test") == unknown("other@local.test")


@pytest.mark.parametrize("problem", ["missing", "oversized", "bad line"])
def test_a_list_that_cannot_be_read_stops_the_start(
        relay_factory: Callable[..., RelayProcess], tmp_path: Path, problem: str) -> None:
    from authrelay.policy.recipients import MAX_FILE_BYTES

    f = tmp_path / "recipients"
    if problem == "oversized":
        with open(f, "wb") as out:
            out.truncate(MAX_FILE_BYTES + 1)
        why = f"{f}: cannot read: larger than {MAX_FILE_BYTES} bytes"
    elif problem == "bad line":
        f.write_text("known@local.test\nuser@@local.test\n")
        why = f"{f}: line 2: 'user@@local.test': bad address syntax (more than one @)"
    else:
        why = f"{f}: cannot read: No such file or directory"
    relay = _relay(relay_factory, f, start=False)
    with pytest.raises(RuntimeError, match="authrelay exited"):
        relay.start()
    assert f"authrelay: relay.local_recipients_file: {why}\n" in relay.log.read_text()
