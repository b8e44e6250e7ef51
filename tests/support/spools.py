"""`temp_spool()`: a real Spool in a fresh directory under /tmp, removed afterwards (a
short path: the notify socket must fit in sun_path, 108 bytes). `HeldDirSync`: queue/'s
group fsync held until a test lets it go; `held_commit()`: a message's commit waiting
there (ready, fsynced, still locked by its writer: a hung disk's directory fsync)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from authrelay.spool.envelope import Envelope
from authrelay.spool.store import Spool
from authrelay.spool.writer import DirSync, Incoming


class HeldDirSync(DirSync):
    """queue/'s group fsync, held until `go` is set (at most `limit` seconds, a hang
    detector): a commit thread waits there with its file written, marked ready, fsynced
    and still locked (a hung disk's directory fsync). Installed as `Spool.queue_dir_sync`
    with `journal_orders_create = False` (and fsync on)."""

    def __init__(self, path: Path, limit: float = 60.0) -> None:
        super().__init__(path)
        self.limit = limit
        self.entered = threading.Event()
        self.go = threading.Event()

    def sync(self) -> None:
        self.entered.set()
        assert self.go.wait(self.limit), "a held directory fsync never let go"
        super().sync()


def held_commit(queue_dir: Path, env: Envelope, body: bytes,
                limit: float = 30.0) -> tuple[Incoming, HeldDirSync]:
    """An Incoming of `body` whose commit, once started (`inc.commit()`), waits in
    queue/'s held fsync (`held.entered`) until `held.go` is set."""
    held = HeldDirSync(queue_dir, limit=limit)
    inc = Incoming(queue_dir, env, fsync=True, dir_sync=held,
                   notify=lambda qid, vouched: None)
    inc.write(body)
    return inc, held


@contextmanager
def temp_spool(*, fsync: bool = True) -> Iterator[Spool]:
    d = tempfile.mkdtemp(prefix="ars", dir="/tmp")
    s = Spool(Path(d) / "spool", fsync=fsync)
    s.ensure_dirs()
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)
