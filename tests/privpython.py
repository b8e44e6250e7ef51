"""A Python with authrelay installed where an unprivileged user can run it.

The tests' own interpreter often lives where only root may read (pyenv under /root, a
checkout in a 0700 home), so a process that drops to another user, or a command run as
that user, could not even import authrelay. `python_for(user)` returns an interpreter the
user can run: this one when it already can, else a venv built once per test session in a
world-readable temporary directory (0755) from a base interpreter of the same minor
version the user can run (the base of this venv, or /usr/bin/python3.X), with this
environment's site-packages and the authrelay source copied into it.

Failure policy: when no such interpreter can be made, `python_for` fails under CI=true (a
privilege test must not silently not run in CI) and skips otherwise, saying why
(support.ci.require).
"""

from __future__ import annotations

import atexit
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from support import ci

SRC = Path(__file__).resolve().parent.parent / "src" / "authrelay"
_made: dict[str, str] = {}


def usable_by(user: str, python: str) -> bool:
    r = subprocess.run(["runuser", "-u", user, "--", python, "-c", "import authrelay.cli"],
                       capture_output=True, timeout=120, cwd="/")
    return r.returncode == 0


def _base_candidates() -> list[str]:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = []
    base = getattr(sys, "_base_executable", "") or sys.executable
    for p in (base, os.path.realpath(base), f"/usr/bin/python{ver}",
              f"/usr/local/bin/python{ver}"):
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    return out


def _build(user: str) -> str:
    root = Path(tempfile.mkdtemp(prefix="authrelay-py-"))
    os.chmod(root, 0o755)
    atexit.register(shutil.rmtree, root, True)
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    for base in _base_candidates():
        probe = subprocess.run(["runuser", "-u", user, "--", base, "-c",
                                f"import sys; assert sys.version.startswith('{ver}')"],
                               capture_output=True, timeout=60, cwd="/")
        if probe.returncode != 0:
            continue
        venv = root / "venv"
        r = subprocess.run([base, "-m", "venv", "--without-pip", str(venv)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            continue
        py = venv / "bin" / "python"
        dest = Path(subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip())
        ours = Path(sysconfig.get_paths()["purelib"])
        for sp in [ours, *map(Path, site.getsitepackages())]:
            if not sp.is_dir():
                continue
            for item in sp.iterdir():
                if item.name.startswith(("__editable__", "authrelay", "pip", "_pytest",
                                         "pytest", "hypothesis", "ruff")) \
                        or item.name.endswith(".pth") or (dest / item.name).exists():
                    continue
                if item.is_dir():
                    shutil.copytree(item, dest / item.name, symlinks=True)
                else:
                    shutil.copy2(item, dest / item.name)
            break
        shutil.copytree(SRC, dest / "authrelay",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o755)
            for n in filenames:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o444)
        if usable_by(user, str(py)):
            return str(py)
    ci.require(False, f"no Python {ver} that user {user} can run (tried {_base_candidates()})")
    raise AssertionError("unreachable")


def python_for(user: str) -> str:
    """An interpreter with authrelay importable that `user` can run (see module doc)."""
    ci.require_root("needs root (to run commands as another user)")
    ci.require_tool("runuser", "util-linux")
    if user not in _made:
        _made[user] = sys.executable if usable_by(user, sys.executable) else _build(user)
    return _made[user]
