"""The unprivileged system user privilege tests drop to, made on first use.

Owns: `TEST_USER` ("authrelay-test", a system user with no home and no shell) and
`unprivileged_user()`, which needs root (support.ci: fails under CI, skips elsewhere).
The `reachable_dir` fixture (tests/integration/conftest.py) gives a directory that user
can reach: pytest's own temp root is 0700 root.
"""

from __future__ import annotations

import pwd
import subprocess

from support import ci

TEST_USER = "authrelay-test"


def unprivileged_user() -> pwd.struct_passwd:
    ci.require_root("privilege tests need root (a test user, dropping privileges)")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", TEST_USER], check=True, timeout=30)
        return pwd.getpwnam(TEST_USER)
