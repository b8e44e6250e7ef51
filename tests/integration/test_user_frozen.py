"""`authrelay user` with the state directory's filesystem frozen (fsfreeze: a backup's, a
VM snapshot's; support.tmpfs.ext4 + frozen): every command answers at once, exit 1, with
"not writable", nothing done, never waiting for the thaw (as `queue` changes do)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import tmpfs

from authrelay.spool.writable import NOT_WRITABLE

pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture
def frozen_site() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="aru", dir="/tmp"))
    with tmpfs.ext4(base / "mnt") as mnt:
        cfgfile = base / "authrelay.toml"
        cfgfile.write_text(f'hostname = "relay.test"\nstate_dir = "{mnt}"\n')
        yield cfgfile, mnt
    shutil.rmtree(base, ignore_errors=True)


def _user(cfgfile: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    p = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(cfgfile), "user",
                        *args], input=stdin, capture_output=True, text=True, env=env,
                       timeout=120)  # (a hang's bound: the thaw comes at 90 s)
    return p.returncode, p.stdout, p.stderr


def test_with_the_state_frozen_user_commands_say_not_writable(
        frozen_site: tuple[Path, Path]) -> None:
    """`user add` (and every `user` command: SQLite writes its write-ahead log even to
    read) waited for the thaw, in the kernel, on users.db or containment.db; `user resume
    --release` besides moved held mail on the spool. Each now answers while frozen, exit
    1, naming the directory and `not writable (filesystem frozen?)`, and changed
    nothing."""
    cfgfile, mnt = frozen_site
    assert _user(cfgfile, "add", "alice", "--password-stdin", stdin="pw one two\n")[0] == 0
    with tmpfs.frozen(mnt, limit=90) as thawed:
        for args, stdin in ((("add", "bob", "--password-stdin"), "pw three four\n"),
                            (("list",), ""), (("del", "alice"), ""),
                            (("suspended",), ""), (("resume", "alice", "--release"), "")):
            rc, out, err = _user(cfgfile, *args, stdin=stdin)
            assert not thawed.is_set(), f"user {args[0]} answered only after the thaw"
            assert (rc, out) == (1, ""), (args, err)
            assert err.startswith("authrelay user: ") and NOT_WRITABLE in err, (args, err)
    rc, out, _ = _user(cfgfile, "list")
    assert rc == 0 and out.split()[0] == "alice" and "bob" not in out
