"""The syslog maillog target of a real `authrelay serve` (master and two workers) against a
syslog socket the test owns (`[log] target = "syslog:PATH"`): a daemon that stops reading,
one that goes away and comes back. Sessions are never held up by the log, and no line is
lost without a word: what the socket did not take went to stderr, counted, and the count
is said through syslog when it takes lines again.
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from support.wait import wait_until

pytestmark = pytest.mark.slow

DGRAM = re.compile(r"<22>\w{3} [ \d]\d \d\d:\d\d:\d\d authrelay\[(\d+)\]: (.*)")
DISCONNECT = "NOQUEUE: disconnect=from unknown [127.0.0.1], commands=ehlo=1 quit=1"


class SyslogDaemon:
    """A datagram socket at `path`, read by a thread that can be paused (a daemon that
    does not read) or closed and bound again (a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.reading = threading.Event()
        self.reading.set()
        self._bind()

    def _bind(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            if not self.reading.wait(0.2):
                continue
            try:
                self.lines.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def gone(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()
        self.path.unlink()

    def back(self) -> None:
        self._bind()

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def syslogd(tmp_path: Path) -> Iterator[SyslogDaemon]:
    d = SyslogDaemon(tmp_path / "log")
    yield d
    d._stop = True


def _relay(relay_factory, syslogd: SyslogDaemon) -> RelayProcess:  # noqa: ANN001
    r = relay_factory({"log": {"target": f"syslog:{syslogd.path}"}}, workers=2, start=False)
    r.start()
    wait_until(lambda: syslogd.text().count("daemon=started") == 3, what="started")
    for line in syslogd.lines:
        assert DGRAM.fullmatch(line), line
    return r


def _session(r: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=20) as s:
        s.ehlo("client.example")


def _back_in_syslog(r: RelayProcess, syslogd: SyslogDaemon, why: str) -> int:
    """Sessions until every worker whose lines went to stderr said through syslog how
    many; returns the sessions made."""
    diverted = set(re.findall(r" authrelay\[(\d+)\]: NOQUEUE: ", r.log.read_text()))
    note = re.compile(r"NOQUEUE: warning=maillog: syslog socket " + re.escape(str(syslogd.path))
                      + r" took no lines from \d\d:\d\d:\d\d to \d\d:\d\d:\d\d \("
                      + re.escape(why) + r"\): \d+ lines went to stderr")
    made = 0

    def said() -> bool:
        nonlocal made
        _session(r)
        made += 1
        pids = {m[1] for ln in syslogd.lines if (m := DGRAM.fullmatch(ln)) and note.fullmatch(m[2])}
        return bool(diverted) and pids == diverted

    wait_until(said, what=lambda: f"each worker's count in {syslogd.text()[-2000:]}")
    return made


def _sessions_logged(r: RelayProcess, syslogd: SyslogDaemon) -> int:
    """Each session's last line, in syslog or (counted) on stderr; never in both."""
    in_syslog = sum(1 for ln in syslogd.lines if ln.endswith(DISCONNECT))
    on_stderr = r.log.read_text().count(DISCONNECT)
    return in_syslog + on_stderr


def test_a_syslog_daemon_that_stops_reading_holds_up_no_session(relay_factory,  # noqa: ANN001
                                                                  syslogd: SyslogDaemon) -> None:
    """syslog(3) was called on the event loop: a daemon that stopped reading (its queue
    full) blocked every session of the worker. Lines are sent by the writer thread; what
    the daemon leaves unread 2 s goes to stderr, and is counted when it reads again."""
    r = _relay(relay_factory, syslogd)
    syslogd.reading.clear()
    sessions = 0

    def diverted() -> bool:  # each session completes while the daemon reads nothing
        nonlocal sessions
        _session(r)
        sessions += 1
        return "lines go to stderr until it takes them again" in r.log.read_text()

    wait_until(diverted, what="lines to stderr")
    assert (f"authrelay: warning: maillog: syslog socket {syslogd.path} the syslog daemon "
            "did not read within 2 s; lines go to stderr until it takes them again"
            ) in r.log.read_text()
    syslogd.reading.set()
    sessions += _back_in_syslog(r, syslogd, "the syslog daemon did not read within 2 s")
    r.stop()
    assert _sessions_logged(r, syslogd) == sessions


def test_a_syslog_daemon_restarted_gets_the_lines_again(relay_factory,  # noqa: ANN001
                                                        syslogd: SyslogDaemon) -> None:
    """The daemon gone (its socket removed) and back (bound again): the lines meanwhile
    go to stderr, then syslog gets them again, with the count."""
    r = _relay(relay_factory, syslogd)
    syslogd.gone()
    _session(r)
    _session(r)
    wait_until(lambda: r.log.read_text().count(DISCONNECT) == 2, what="lines on stderr")
    assert f"syslog socket {syslogd.path} is missing; lines go to stderr" in r.log.read_text()
    syslogd.back()
    sessions = 2 + _back_in_syslog(r, syslogd, "is missing")
    r.stop()
    assert _sessions_logged(r, syslogd) == sessions
