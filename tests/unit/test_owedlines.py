"""owedlines: the refusal lines a process owes, kept in a /dev/shm book (the real
server's: tests/integration/test_maillog_stalled.py)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from support import tmpfs

from authrelay.owedlines import ENTRIES, OwedLines


def test_a_full_dev_shm_never_kills_a_process_at_its_refusal_line(tmp_path: Path) -> None:
    """The book was a sparse file, its pages taken as lines were first written: with
    /dev/shm full (any local user can fill it) a process's first refusal line into an
    untouched page was a SIGBUS, the worker (or the master) dead at a client's refusal.
    Now its pages are taken at the start; no room then: anonymous memory (`unkept`)."""
    with tmpfs.mounted(tmp_path / "shm", "1m") as shm:
        path = shm / "book"
        pid = os.fork()
        if pid == 0:  # (the child: a SIGBUS kills it, not the test)
            try:
                book = OwedLines(path, 3)
                tmpfs.fill(shm)
                slot = book.slot(2)
                kept = [slot.keep(f"reject=550 5.7.1 no {n}") for n in range(ENTRIES)]
                os._exit(0 if book.unkept is None and min(kept) >= 0 else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert not os.WIFSIGNALED(status), signal.Signals(os.WTERMSIG(status)).name
        assert os.waitstatus_to_exitcode(status) == 0
        # The lines it owed are the next start's, though there is no room for its book.
        again = OwedLines(path, 4)
        assert len(again.leftovers) == ENTRIES and again.leftovers[0].endswith("no 0")
        assert again.unkept is not None and again.unkept.errno == errno.ENOSPC
        assert again.unkept.filename == str(path)
        assert again.slot(3).keep("reject=550 5.7.1 anonymous") >= 0
