"""`temp_spool()`: a real Spool in a fresh directory under /tmp, removed afterwards (a
short path: the notify socket must fit in sun_path, 108 bytes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from authrelay.spool.store import Spool


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
