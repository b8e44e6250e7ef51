"""Small filesystems for tests (root only: ci.require_root): a tmpfs for a test that
needs a disk to fill up (`mounted`); an ext4 image on a loop device (`ext4`), which
`frozen` freezes (fsfreeze, as a snapshot tool does: every write waits until the thaw)
for a test that needs a stalled disk held deterministically."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
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


def fill(d: Path) -> None:
    """Take every free block of the filesystem at `d` (the file `d/filler`)."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


@contextlib.contextmanager
def ext4(where: Path, size_mb: int = 32) -> Iterator[Path]:
    """An ext4 filesystem of `size_mb` MiB (an image beside `where`, on a loop device)
    mounted at the new directory `where`, 0700; unmounted and removed at the end."""
    ci.require_root("mounting a filesystem needs root")
    ci.require_tool("mkfs.ext4", "e2fsprogs")
    img = where.with_name(where.name + ".img")
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(where)], check=True)
    try:
        where.chmod(0o700)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        img.unlink()


@contextlib.contextmanager
def frozen(where: Path, limit: float) -> Iterator[threading.Event]:
    """The filesystem mounted at `where` (ext4()) frozen: every write to it waits. Thawed
    at the end, or by a timer after `limit` seconds (a hang detector: a test whose own
    thread waits on the filesystem gets it back); the event yielded is set as the thaw begins."""
    ci.require_tool("fsfreeze", "util-linux")
    thawed = threading.Event()

    def thaw() -> None:
        if not thawed.is_set():
            # (set first: what the thaw releases is never taken for done before it)
            thawed.set()
            subprocess.run(["fsfreeze", "-u", str(where)], check=False)

    subprocess.run(["fsfreeze", "-f", str(where)], check=True)
    timer = threading.Timer(limit, thaw)
    timer.start()
    try:
        yield thawed
    finally:
        timer.cancel()
        thaw()
