"""What a process holds, read from /proc (the tests run as the relay's user or root).

Owns: counting a process's socket descriptors (`sockets_of`), what tests of floods and
evictions compare with a baseline to find a connection the server never closed.
"""

from __future__ import annotations

import contextlib
import os


def sockets_of(pid: int) -> int:
    """How many of `pid`'s open descriptors are sockets now."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while we looked
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
    return n
