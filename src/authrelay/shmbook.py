"""shmbook: an instance's book in /dev/shm, a file every process of it maps shared, so
what a process writes there outlives its death (not a machine's crash: memory).

Owned here: where a book lives (`book_path`: named by the spool directory's device and
inode, the same at the instance's next start), opening it safely (`open_own`):
/dev/shm is everyone's, so a file found there is used only when it is this user's own
regular file, 0600, with one link, opened without following a link; and mapping it with
its memory taken at the start (`map_taken`): a page first touched in a full /dev/shm (any
local user can fill it) is a SIGBUS, the process dead at its write. Users:
owedlines.py (refusal lines a process died owing), spool/abandoned.py (commits given up).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from pathlib import Path

SHM = Path("/dev/shm")  # a memory filesystem (tmpfs): no freeze, no writeback


def book_path(name: str, spool_dir: Path) -> Path:
    """The book `name` of the instance whose spool is `spool_dir`."""
    st = os.stat(spool_dir)
    return SHM / f"{name}-{st.st_dev:x}-{st.st_ino:x}"


def open_own(path: Path) -> tuple[int, int]:
    """(descriptor, size) of the book at `path`, created 0600 when absent; the caller
    closes the descriptor. PermissionError when it is not this user's own file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                or st.st_mode & 0o077 or st.st_nlink != 1:
            raise PermissionError(errno.EPERM, "not a file of this user's own", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def map_taken(fd: int, path: Path, size: int) -> tuple[mmap.mmap, OSError | None]:
    """The book `fd` (at `path`, what it held read already) as a shared mapping of `size`
    bytes, every byte zero, its pages taken now; and None. No room in /dev/shm for them:
    an anonymous shared mapping instead (what a process writes there outlives only the
    process, not the instance) and the OSError naming `path`; the file is left as it
    was (what it holds is for the next start)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        return mmap.mmap(-1, size), OSError(e.errno, e.strerror, str(path))
    os.ftruncate(fd, size)  # (a larger one: a book of more slots)
    m = mmap.mmap(fd, size)
    m[:] = bytes(size)
    return m, None
