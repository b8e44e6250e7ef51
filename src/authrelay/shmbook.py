"""shmbook: an instance's book in /dev/shm, a file every process of it maps shared, so
what a process writes there outlives its death (not a machine's crash: memory).

Owned here: where a book lives (`book_path`: named by the spool directory's device and
inode, the same at the instance's next start) and opening it safely (`open_own`):
/dev/shm is everyone's, so a file found there is used only when it is this user's own
regular file, 0600, with one link, opened without following a link. Users:
owedlines.py (refusal lines a process died owing), spool/abandoned.py (commits given up).
"""

from __future__ import annotations

import errno
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
