"""A small ext4 filesystem a test can freeze and thaw (fsfreeze), as a backup's or a VM
snapshot's freeze does to a spool: a loop-mounted image (root only: ci.require_root).
While frozen, a write to it blocks (a write(2), a page of a shared file mapping) until
the thaw; the context always thaws before it unmounts."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support import ci


class FrozenFS:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.frozen = False

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "-f", str(self.path)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", str(self.path)], check=True)
            self.frozen = False


@contextlib.contextmanager
def ext4(where: Path, size: str = "64M") -> Iterator[FrozenFS]:
    """An ext4 of `size` mounted at the new directory `where` (its image beside it)."""
    ci.require_root("mounting a loop device needs root")
    for tool in ("mkfs.ext4", "fsfreeze"):
        ci.require(ci.which(tool), f"{tool} not installed (util-linux, e2fsprogs)")
    image = where.with_name(where.name + ".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    fs = FrozenFS(where)
    try:
        yield fs
    finally:
        fs.thaw()
        subprocess.run(["umount", "-l", str(where)], check=False)
        image.unlink(missing_ok=True)
