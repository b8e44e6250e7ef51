"""process.return_big_allocations(): memory of argon2 hashes (19 MiB each, in the AUTH
hashing threads) goes back to the system when the hash is done, instead of staying in
each thread's malloc arena (bench (f): +60 MB per worker after the first logins)."""

from __future__ import annotations

import subprocess
import sys

from support import ci

PROBE = r"""
import sys, threading
from argon2.low_level import Type, hash_secret_raw
from authrelay import process
if sys.argv[1] == "set":
    process.return_big_allocations()

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def hashing(barrier: threading.Barrier) -> None:
    for _ in range(2):  # the second round is where glibc's raised threshold kept the memory
        barrier.wait()
        hash_secret_raw(b"correct horse", b"0123456789abcdef", time_cost=1,
                        memory_cost=19 * 1024, parallelism=1, hash_len=32, type=Type.ID)

before = rss()
barrier = threading.Barrier(4)
threads = [threading.Thread(target=hashing, args=(barrier,)) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print((rss() - before) // (1 << 20))
"""


def retained_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_argon2_memory_is_given_back() -> None:
    ci.require(sys.platform.startswith("linux"), "needs glibc malloc and /proc (Linux)")
    kept_default = retained_mb("default")
    kept = retained_mb("set")
    # 4 hashing threads x 19 MiB stay resident with glibc's dynamic threshold
    assert kept_default >= 38, kept_default
    assert kept < 10, (kept, kept_default)
