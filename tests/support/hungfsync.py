"""A hung disk's fsync for a real `authrelay serve` (a process the test starts): an
LD_PRELOAD shim (built here with the system's C compiler) whose fsync() of a regular file
under `prefix` waits while the file `gate` exists. The rest of the file's write path (its
data, the ready mark's chmod) is the kernel's as ever: a commit is held exactly in its
fsync, past its ready mark, as on a disk whose writeback hangs. The wait sleeps, so a
process held there dies at once when killed (a real hung fsync is uninterruptible: the
process dies once the disk answers, with the same file left)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import ci

_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int held(int fd) {
    const char *gate = getenv("AUTHRELAY_TEST_FSYNC_GATE");
    const char *prefix = getenv("AUTHRELAY_TEST_FSYNC_PREFIX");
    struct stat st;
    char link[64], path[PATH_MAX];
    ssize_t n;
    if (!gate || !prefix || stat(gate, &st) != 0) return 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, prefix, strlen(prefix)) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    struct timespec ts = {0, 10000000};
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    while (held(fd)) nanosleep(&ts, NULL);
    return real(fd);
}
"""


def build(where: Path) -> Path:
    """The shim's shared object, built in the directory `where`."""
    ci.require_tool("gcc", "gcc")
    src = where / "hungfsync.c"
    src.write_text(_SOURCE)
    lib = where / "hungfsync.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                   check=True)
    return lib


def environ(lib: Path, gate: Path, prefix: Path) -> dict[str, str]:
    """The environment variables that load the shim: fsyncs of files under `prefix`
    wait while `gate` exists."""
    return {"LD_PRELOAD": str(lib), "AUTHRELAY_TEST_FSYNC_GATE": str(gate),
            "AUTHRELAY_TEST_FSYNC_PREFIX": os.path.realpath(prefix) + "/"}
