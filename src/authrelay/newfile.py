"""Writing a file the admin's commands hand out (a private key, a password file, a client
set-up file) so that nobody else's file or link is ever written through.

Contract: `replace_with_new(path, data, mode)` leaves `path` a file this process created,
holding `data`, with `mode` set on the descriptor before any byte is written (mkstemp: a
random name opened O_EXCL, 0600 until then), renamed over `path`: the rename replaces
`path` itself, never what a link there points to. A fixed `NAME.tmp`, or `path` written
in place, followed a link someone planted in a shared directory (root writing a key or a
password into the link's target) or filled a file of theirs. Failure policy: the
temporary file is removed and the error propagates.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_with_new(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
