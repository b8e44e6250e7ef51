"""Config lookup (issue 12 item 1): -c, $AUTHRELAY_CONFIG, ./authrelay.toml,
/etc/authrelay/authrelay.toml; only `serve` falls back to the embedded default. The
commands that use a server's state exit 75 (EX_TEMPFAIL) with one line and write nothing,
in real processes started from an empty directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from relayproc import RelayProcess

from authrelay.config import SYSTEM_FILE

pytestmark = pytest.mark.slow


@pytest.fixture
def bare(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An empty working directory and an environment without $AUTHRELAY_CONFIG."""
    if Path(SYSTEM_FILE).exists():
        pytest.fail(f"{SYSTEM_FILE} exists on this machine: these tests need it absent")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    return cwd, env


def _run(cwd: Path, env: dict[str, str], *args: str, stdin: str = ""
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authrelay", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ["sendmail", "root"],
    ["sendmail", "-t"],
    ["queue", "list"],
    ["queue"],
    ["queue", "flush"],
    ["user", "list"],
    ["user", "add", "alice", "--password-stdin"],
])
def test_no_config_is_tempfail_and_writes_nothing(bare, args: list[str]) -> None:
    cwd, env = bare
    r = _run(cwd, env, *args, stdin="To: root\nSubject: x\n\nbody\nsecret\n")
    assert r.returncode == 75, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "no config file found" in lines[0] and SYSTEM_FILE in lines[0]
    assert "Traceback" not in r.stderr
    assert list(cwd.iterdir()) == []  # no ./var/spool that no daemon reads


def test_import_sasldb_without_config_is_tempfail(bare, tmp_path: Path) -> None:
    cwd, env = bare
    dump = tmp_path / "dump.txt"
    dump.write_text("alice@example.org: userPassword secret\n")
    r = _run(cwd, env, "import", "sasldb", str(dump))
    assert r.returncode == 75, r.stderr
    assert list(cwd.iterdir()) == []


def test_local_file_then_env_then_option(bare, relay_factory) -> None:
    cwd, env = bare
    a: RelayProcess = relay_factory(start=False)
    b: RelayProcess = relay_factory(start=False)
    (cwd / "authrelay.toml").write_text(a.config.read_text())
    # ./authrelay.toml is found.
    r = _run(cwd, env, "sendmail", "bob@remote.example", stdin="Subject: one\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert len(a.queued()) == 1 and b.queued() == []
    # $AUTHRELAY_CONFIG wins over ./authrelay.toml.
    r = _run(cwd, {**env, "AUTHRELAY_CONFIG": str(b.config)}, "sendmail", "bob@remote.example",
             stdin="Subject: two\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert len(a.queued()) == 1 and len(b.queued()) == 1
    # -c wins over both; the queue command reads the same spool.
    r = _run(cwd, {**env, "AUTHRELAY_CONFIG": str(a.config)}, "-c", str(b.config),
             "queue", "list")
    assert r.returncode == 0, r.stderr
    assert b.queued()[0].name in r.stdout and a.queued()[0].name not in r.stdout


def test_bad_port_names_the_key(tmp_path: Path) -> None:
    """A non-numeric port anywhere is a config error naming the key, not a traceback."""
    cases = {
        'smart_host = ["mail.example:subm"]': "relay.smart_host[0]",
        'nameservers = ["127.0.0.1:dns"]': "delivery.nameservers[0]",
    }
    for line, key in cases.items():
        section = "relay" if "smart_host" in line else "delivery"
        f = tmp_path / "c.toml"
        f.write_text(f"[{section}]\n{line}\n")
        for cmd in (["check-config", str(f)], ["-c", str(f), "serve"],
                    ["-c", str(f), "queue", "list"]):
            r = subprocess.run([sys.executable, "-m", "authrelay", *cmd], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 1, (cmd, r.stderr)
            assert key in r.stderr and "is not a number" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
    f = tmp_path / "l.toml"
    f.write_text('[[listen]]\naddress = "127.0.0.1:smtp"\n\n[metrics]\naddress = "[::1]:x"\n')
    r = subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "listen[0].address" in r.stderr, r.stderr
    f.write_text('[metrics]\naddress = "[::1]:x"\n')
    r = subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "metrics.address" in r.stderr, r.stderr


def test_relative_paths_are_from_the_config_files_directory(tmp_path: Path) -> None:
    """A config file's relative paths (state_dir, aliases_file, a file: log target) are
    taken from the file's directory, not from each process's current directory: `serve`
    started from one directory, `sendmail` run from another (with a relative -c) and
    `queue list` run from / all use the same state, aliases and log."""
    etc = tmp_path / "etc"
    elsewhere = tmp_path / "elsewhere"
    for d in (etc, elsewhere, etc / "log"):
        d.mkdir()
    (etc / "aliases").write_text("root: admin@remote.example\n")
    r = RelayProcess(etc, {"state_dir": "state", "aliases_file": "aliases",
                           "log": {"target": "file:log/mail.log"}})
    assert r.state == etc / "state"
    r.start()
    try:
        env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
        sent = subprocess.run([sys.executable, "-m", "authrelay", "-c",
                               "../etc/authrelay.toml", "sendmail", "root"], cwd=elsewhere,
                              env=env, input="Subject: rel\n\nx\n", capture_output=True,
                              text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        r.wait_for(lambda: len(r.queued()) == 1)
        listed = _run(Path("/"), env, "-c", str(r.config), "queue", "list")
        assert listed.returncode == 0, listed.stderr
        assert r.queued()[0].name in listed.stdout and "admin@remote.example" in listed.stdout
        log = etc / "log" / "mail.log"
        r.wait_for(lambda: log.exists() and "from=<root@" in log.read_text())
        assert list(elsewhere.iterdir()) == []  # no ./state, no ./log there
    finally:
        r.stop()
