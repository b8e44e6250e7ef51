"""CI detection and the one rule for a test that cannot run here.

Owns: the answer to "is this CI?" (CI=true/1/yes, as GitHub Actions, GitLab CI and most
runners set it) and what a test does when its environment lacks something (root, a Debian
daemon, IPv6): under CI it FAILS, because a test that silently does not run in CI proves
nothing; on a developer machine it skips with the reason (listed by `pytest -rs`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest


def is_ci(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


IN_CI = is_ci()


def require(ok: object, why: str) -> None:
    """Go on if `ok`; else fail under CI, skip elsewhere, saying `why`."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{why} (CI=true: a test that cannot run is a failure, not a skip)",
                    pytrace=False)
    pytest.skip(why)


def require_root(why: str = "needs root") -> None:
    require(os.geteuid() == 0, why)


def which(tool: str) -> str | None:
    """`tool`'s path on PATH or in the sbin directories (not on a user's PATH)."""
    found = shutil.which(tool)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        if (Path(d) / tool).exists():
            return str(Path(d) / tool)
    return None


def require_tool(tool: str, package: str) -> str:
    """The path of `tool`; fails (CI) or skips (elsewhere) naming the Debian `package`."""
    path = which(tool)
    require(path, f"{tool} not installed (apt-get install {package})")
    assert path is not None
    return path
