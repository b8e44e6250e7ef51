"""authrelay: an SMTP AUTH submission relay (RFC 6409) with a durable queue."""

from __future__ import annotations

import contextlib
import subprocess
from importlib import metadata
from pathlib import Path


def _installed() -> str:
    """The installed distribution's version (pyproject.toml's, as pip recorded it)."""
    try:
        return metadata.version("authrelay")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


__version__ = _installed()


def version_string() -> str:
    """`authrelay --version`: the release, and the commit when running from a git checkout
    (an editable install, as run.sh makes): `0.2.0 (git 7fa4095, modified)`."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return __version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+",
                            "--abbrev=10"], capture_output=True, text=True, timeout=5)
        desc = r.stdout.strip()
        if r.returncode == 0 and desc:
            modified = desc.endswith("+")
            return f"{__version__} (git {desc.rstrip('+')}{', modified' if modified else ''})"
    return __version__
