"""A small tmpfs for a test that needs a disk to fill up (root only: ci.require_root)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support import ci


@contextlib.contextmanager
def mounted(where: Path, size: str, *, inodes: int = 0) -> Iterator[Path]:
    """A tmpfs of `size` ("6m", "256k") at the new directory `where`, 0700, unmounted
    (lazily) at the end; `inodes`: at most that many files and directories (a create
    past them fails with ENOSPC), else tmpfs's default."""
    ci.require_root("mounting a tmpfs needs root")
    where.mkdir()
    opts = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
