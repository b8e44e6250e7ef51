"""Packaging (issue 12 item 7): the metadata, the systemd unit and the docs agree with
each other and with what is installed; README's first steps work verbatim after run.sh
(a real run.sh in a copy of the checkout, a real server, `authrelay send-test`, a
pseudo-terminal for the password prompts)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ci, daemons, ports
from support.sdnotify import NotifySocket

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]


def test_license_is_spdx_and_shipped() -> None:
    proj = PYPROJECT["project"]
    assert proj["license"] == "MIT"  # a PEP 639 expression, not the deprecated table
    assert proj["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_every_dependency_has_an_upper_bound_and_ruff_is_pinned() -> None:
    proj = PYPROJECT["project"]
    reqs = list(proj["dependencies"])
    for extra in proj["optional-dependencies"].values():
        reqs += extra
    reqs += PYPROJECT["build-system"]["requires"]
    for req in reqs:
        spec = req.split(";")[0]
        assert "<" in spec or "==" in spec, f"no upper bound: {req}"
    ruff = [r for r in proj["optional-dependencies"]["test"] if _req_name(r) == "ruff"]
    assert len(ruff) == 1 and re.fullmatch(r"ruff==\d+\.\d+\.\d+", ruff[0]), ruff


def test_package_data_exists() -> None:
    for pkg, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        base = ROOT / "src" / pkg.replace(".", "/")
        for pat in patterns:
            assert list(base.glob(pat)), f"package-data {pkg}: {pat!r} matches nothing"


def test_wheel_carries_license_and_data(tmp_path: Path) -> None:
    """A real build: the wheel's metadata says MIT (License-Expression) and holds the
    LICENSE and the package data."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("authrelay-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "authrelay/py.typed" in names


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ln in (ROOT / "contrib" / "authrelay.service").read_text().splitlines():
        if "=" in ln and not ln.startswith(("#", "[")):
            k, v = ln.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_and_docs_agree() -> None:
    unit = _unit()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    guide = (ROOT / "contrib" / "README.md").read_text()
    # The binary the unit runs is the one the install steps link.
    for key in ("ExecStart", "ExecStartPre"):
        binary = unit[key][0].split()[0]
        assert f"ln -s /opt/authrelay/bin/authrelay {binary}" in guide, (key, binary)
    # Every Documentation= file is installed by the guide's steps, from a file that exists.
    for url in unit["Documentation"][0].split():
        path = url.removeprefix("file://")
        m = re.search(rf"install -D -m 0644 (\S+) {re.escape(path)}\b", guide)
        assert m, f"Documentation={url} is not installed by contrib/README.md"
        assert (ROOT / m.group(1)).is_file(), m.group(1)
    # Every .md file the guides name exists in the checkout.
    for doc in ("README.md", "contrib/README.md"):
        text = (ROOT / doc).read_text()
        # Relative names (absolute ones are install targets, checked above). bench/*.md
        # are results a bench run writes (bench/scale.py writes SCALE.md): not checked.
        for name in set(re.findall(r"(?<![/\w])([A-Za-z_][A-Za-z_/]*\.md)\b", text)):
            if name.startswith("bench/"):
                continue
            candidates = [ROOT / name, ROOT / "docs" / name, ROOT / "contrib" / name]
            assert any(c.is_file() for c in candidates), f"{doc} names {name}: missing"


# --------------------------------------------------------------------------- README

def _first_steps() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## First steps\n.*?```sh\n(.*?)```", text, re.S)
    assert m, "README has no First steps block"
    return m.group(1)


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of the checkout (no venv, no state), as a fresh clone would be."""
    d = Path(tempfile.mkdtemp(prefix="authrelay-co-"))
    dest = d / "authrelay"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".venv", "var", ".git", "__pycache__", "*.egg-info", "build", ".pytest_cache",
        ".ruff_cache", ".hypothesis", "bench", "authrelay.toml"))
    yield dest
    shutil.rmtree(d, ignore_errors=True)


def _run_sh(checkout: Path, log: Path, notify: NotifySocket) -> subprocess.Popen[bytes]:
    """./run.sh as README says, its output (pip's, then the server's maillog) appended to
    `log` (a file: a pipe nobody reads would stall the server once full), $NOTIFY_SOCKET
    set to the test's socket."""
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    env["PYTHON"] = sys.executable
    env["NOTIFY_SOCKET"] = str(notify.path)
    with log.open("ab") as out:
        return subprocess.Popen(["./run.sh"], cwd=checkout, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_serving(p: subprocess.Popen[bytes], log: Path, notify: NotifySocket) -> None:
    """Until run.sh's own server says READY=1 (run.sh execs it: the same pid), i.e. it has
    bound all its listeners; `serve` binds only addresses no other process holds, so the
    ports are then this server's (something merely answering on them may be another's)."""

    def alive() -> None:
        if p.poll() is None:
            return
        out = log.read_text(errors="replace")
        taken = [ln for ln in out.splitlines() if "address already in use by " in ln]
        # Another process took a port after dev_ports() found them free (something that
        # does not take the lock): not this checkout's fault; fails under CI all the same.
        ci.require(not taken, f"run.sh's server could not listen: {taken[-1] if taken else ''}"
                              f" ({'; '.join(ports.busy_dev_ports()) or 'since freed'})")
        raise AssertionError(f"run.sh exited {p.returncode}:\n{out[-3000:]}")

    notify.messages.clear()
    # The first run installs the dependencies: a generous bound, not a timing assertion.
    pid = notify.wait_for("READY=1", timeout=900, check=alive)
    assert pid == p.pid, f"READY=1 from pid {pid}, not run.sh's {p.pid}: {notify.messages}"


def _on_pty(cmd: list[str], cwd: Path, env: dict[str, str], answers: list[str]
            ) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal as its controlling terminal; answer each password
    prompt (a line ending in "assword: " or "again): ") with the next of `answers`,
    written only once the prompt is shown (getpass flushes earlier input)."""
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the last process holding the terminal is gone
                    break
                if not data:
                    break
                out += data
                tail = out[-40:].rstrip(b" ")
                if answers and (tail.endswith(b"assword:") or tail.endswith(b"again):")):
                    os.write(master, answers.pop(0).encode() + b"\n")
            elif p.poll() is not None:
                break
        p.wait(timeout=60)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out.decode(errors="replace")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    yield ns
    ns.close()


@pytest.mark.external
def test_readme_first_steps_verbatim_after_run_sh(checkout: Path, notify: NotifySocket,
                                                  tmp_path: Path) -> None:
    if shutil.which("script") is None:
        pytest.fail("script is not installed (test.sh installs it)")
    log = tmp_path / "run.sh.log"
    with ports.dev_ports():  # run.sh's listeners are README's fixed ports
        # 1. The first run writes ./authrelay.toml and serves on it.
        p = _run_sh(checkout, log, notify)
        try:
            _wait_serving(p, log, notify)
        finally:
            daemons.stop(p, group=True, grace=60)
        # Stopped means stopped: nothing of it holds a port (the next run binds them).
        assert p.returncode == 0, log.read_text(errors="replace")[-3000:]
        assert not ports.busy_dev_ports(), ports.busy_dev_ports()
        cfg = (checkout / "authrelay.toml").read_text()
        assert f'state_dir = "{checkout}/var"' in cfg
        # Only loopback traffic in tests: the message of the README goes to example.net,
        # so its MX lookup is pointed at a closed local port (the mail stays queued).
        (checkout / "authrelay.toml").write_text(
            cfg + '\n[delivery]\nnameservers = ["127.0.0.1:9"]\ndns_timeout = "1s"\n')
        p = _run_sh(checkout, log, notify)
        try:
            _wait_serving(p, log, notify)
            # 2. README's first steps, verbatim, in a shell on a pseudo-terminal (the
            # password prompts read /dev/tty), in the checkout, with a fresh environment.
            steps = checkout / "steps.sh"
            steps.write_text("set -e\n" + _first_steps())
            env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
            env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            # add alice (twice), passwd alice (twice), send-test (once): answered at each
            # prompt. Nothing but what run.sh installed (no swaks).
            answers = ["first-steps pw 1"] * 2 + ["second pw 2"] * 2 + ["second pw 2"]
            rc, out = _on_pty(["bash", "steps.sh"], checkout, env, answers)

            def server() -> str:
                state = "running" if p.poll() is None else f"exited {p.returncode}"
                return f"\n--- run.sh's server ({state}):\n" \
                       f"{log.read_text(errors='replace')[-3000:]}"

            assert answers == [], f"prompts left unanswered: {answers}\n{out[-4000:]}"
            assert rc == 0, out[-4000:] + server()
            assert "user alice added" in out and "user bob added" in out
            assert "250 2.0.0 Ok: queued as" in out  # send-test: accepted and queued
            assert "alice@example.org" in out  # `authrelay queue` shows it
        finally:
            daemons.stop(p, group=True, grace=60)
