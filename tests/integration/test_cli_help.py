"""`authrelay --help` names every command; `--version` is the installed release, with the
commit when run from a git checkout."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from authrelay import cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authrelay", *args], capture_output=True,
                          text=True, timeout=60)


def test_help_lists_every_command() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = set(sub.choices)
    assert {"serve", "sendmail", "send-test", "queue", "check-config"} <= names
    out = _run("--help")
    assert out.returncode == 0
    listed = {ln.split()[0] for ln in out.stdout.splitlines()
              if ln.startswith("    ") and ln.split() and not ln.split()[0].startswith("-")}
    assert names <= listed, names - listed
    assert "sendmail, mailq or newaliases" in out.stdout


def test_version_is_the_release_and_the_commit() -> None:
    out = _run("--version")
    assert out.returncode == 0
    release = metadata.version("authrelay")
    assert out.stdout.startswith(f"authrelay {release}")
    assert release != "0.1.0"
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert f"(git {head}" in out.stdout, out.stdout
