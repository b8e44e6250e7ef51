"""`authrelay user ...` as a real subprocess, and a running Authenticator seeing its edits."""

from __future__ import annotations

import fcntl
import json
import os
import select
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from authrelay.auth import passwords
from authrelay.auth.authenticator import AuthResult, UserDBAuthenticator
from authrelay.auth.userdb import UserDB

pytestmark = pytest.mark.slow


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    p = tmp_path / "authrelay.toml"
    p.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    return p


def run(conf: Path, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "authrelay"]
    if conf is not None:
        cmd += ["-c", str(conf)]
    return subprocess.run(cmd + ["user", *args], input=stdin if stdin is not None else "",
                          capture_output=True, text=True, timeout=60,
                          env=env or dict(os.environ))


def db_of(conf: Path) -> UserDB:
    return UserDB(conf.parent / "state" / "users.db")


def test_add_list_del(conf: Path) -> None:
    r = run(conf, "add", "alice", "--password-stdin", "--address", "Alice@Example.org",
            "--address", "a2@example.org", stdin="s3cret\n")
    assert r.returncode == 0, r.stderr
    state = conf.parent / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "users.db").stat().st_mode) == 0o600
    assert passwords.verify_password(db_of(conf).get_hash("alice"), "s3cret")

    r = run(conf, "add", "bob@example.org", "--password-stdin", stdin="pw")  # no newline
    assert r.returncode == 0, r.stderr

    r = run(conf, "list")
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["alice\ta2@example.org,alice@example.org",
                                     "bob@example.org"]
    r = run(conf, "list", "--json")
    data = json.loads(r.stdout)
    assert [(u["name"], u["addresses"]) for u in data] == [
        ("alice", ["a2@example.org", "alice@example.org"]), ("bob@example.org", [])]
    assert data[0]["created"].endswith("Z")
    assert "s3cret" not in r.stdout and "argon2" not in r.stdout

    r = run(conf, "del", "alice")
    assert r.returncode == 0, r.stderr
    assert [u.name for u in db_of(conf).list()] == ["bob@example.org"]


def test_errors_exit_1_with_a_message(conf: Path) -> None:
    assert run(conf, "add", "alice", "--password-stdin", stdin="pw\n").returncode == 0
    cases = [
        (("add", "alice", "--password-stdin"), "pw\n", "exists"),
        (("del", "nobody"), "", "no user nobody"),
        (("passwd", "nobody", "--password-stdin"), "pw\n", "no user nobody"),
        (("add", "carol", "--password-stdin"), "", "no password"),
        (("add", "carol", "--password-stdin"), "\n", "no password"),
        (("add", "bad name", "--password-stdin"), "pw\n", "spaces"),
        (("add", "dave", "--password-stdin", "--address", "not-an-address"), "pw\n",
         "not an address"),
        (("address", "add", "nobody", "n@example.org"), "", "no user nobody"),
        (("address", "del", "alice", "x@example.org"), "", "does not have"),
    ]
    for args, stdin, message in cases:
        r = run(conf, *args, stdin=stdin)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert [u.name for u in db_of(conf).list()] == ["alice"]


def test_nfc_and_nfd_spellings_are_never_two_users(conf: Path) -> None:
    # "café" precomposed (NFC) and decomposed (NFD: e + U+0301) print the same; the old
    # code stored both as two users, each with its own password.
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert run(conf, "add", nfc, "--password-stdin", stdin="pw1\n").returncode == 0
    r = run(conf, "add", nfd, "--password-stdin", stdin="pw2\n")
    assert r.returncode == 1 and "not in Unicode NFC form" in r.stderr, r.stderr
    assert repr(nfc) in r.stderr and "Traceback" not in r.stderr
    assert run(conf, "add", "n\u0303o", "--password-stdin", stdin="pw\n").returncode == 1
    assert [u.name for u in db_of(conf).list()] == [nfc]
    h = db_of(conf).get_hash(nfc)
    assert h is not None and passwords.verify_password(h, "pw1")


def test_a_new_name_never_twins_a_decomposed_user_of_an_earlier_release(conf: Path) -> None:
    # A users.db from before the NFC rule may hold "café" decomposed (NFD); adding the
    # NFC spelling beside it made the look-alike pair the rule exists to prevent (each
    # with its own password). The stored user keeps working: it is never locked out.
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert run(conf, "add", "seed", "--password-stdin", stdin="pw0\n").returncode == 0
    db = db_of(conf)
    db._insert(nfd, passwords.hash_password("old"), [])  # as an earlier release stored it
    db.close()
    r = run(conf, "add", nfc, "--password-stdin", stdin="pw1\n")
    assert r.returncode == 1 and "looks the same as the existing user" in r.stderr, r.stderr
    assert repr(nfd) in r.stderr and "Traceback" not in r.stderr
    assert sorted(u.name for u in db_of(conf).list()) == sorted(["seed", nfd])
    assert run(conf, "passwd", nfd, "--password-stdin", stdin="new\n").returncode == 0
    h = db_of(conf).get_hash(nfd)
    assert h is not None and passwords.verify_password(h, "new")


@pytest.mark.parametrize(("first", "second"), [
    ("alice", "\uff41\uff4c\uff49\uff43\uff45"),  # fullwidth: not NFKC-stable
    ("caf\u00e9", "xn--caf-dma"),  # its A-label
    ("xn--caf-dma", "caf\u00e9"),
    ("bob@b\u00fccher.example", "bob@xn--bcher-kva.example"),
])
def test_a_compatibility_or_a_label_spelling_is_never_a_second_user(
        conf: Path, first: str, second: str) -> None:
    # AUTH compares names as code points; the old code checked NFC only, so each of these
    # pairs made two users that read as one, each with its own password.
    assert run(conf, "add", first, "--password-stdin", stdin="pw1\n").returncode == 0
    r = run(conf, "add", second, "--password-stdin", stdin="pw2\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("not in Unicode NFKC form" in r.stderr and repr(first) in r.stderr
            or f"looks the same as the existing user {first!r}" in r.stderr), r.stderr
    assert [u.name for u in db_of(conf).list()] == [first]


def test_a_new_name_never_twins_a_fullwidth_user_of_an_earlier_release(conf: Path) -> None:
    # A users.db from before the NFKC rule may hold "ａｌｉｃｅ"; adding "alice" beside it
    # would make the pair. The stored user keeps working, and `user list` names the pair.
    wide = "\uff41\uff4c\uff49\uff43\uff45"
    assert run(conf, "add", "seed", "--password-stdin", stdin="pw0\n").returncode == 0
    db = db_of(conf)
    db._insert(wide, passwords.hash_password("old"), [])  # as an earlier release stored it
    db.close()
    r = run(conf, "add", "alice", "--password-stdin", stdin="pw1\n")
    assert r.returncode == 1 and f"looks the same as the existing user {wide!r}" in r.stderr
    assert run(conf, "passwd", wide, "--password-stdin", stdin="new\n").returncode == 0
    h = db_of(conf).get_hash(wide)
    assert h is not None and passwords.verify_password(h, "new")
    db = db_of(conf)
    db._insert("alice", passwords.hash_password("pw1"), [])  # both stored by that release
    db.close()
    r = run(conf, "list")
    assert r.returncode == 0 and r.stdout.split() == ["alice", "seed", wide], r.stdout
    assert f"warning: users 'alice' and {wide!r} look the same" in r.stderr, r.stderr


def test_an_external_backend_is_named_when_the_user_db_is_edited(tmp_path: Path) -> None:
    # With saslauthd (or Dovecot) as backend, `user add` wrote a users.db no server reads
    # and said only "user zed added": every login of zed then got 535.
    conf = tmp_path / "authrelay.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n'
                    '[auth]\nbackend = "saslauthd:/run/saslauthd/mux"\n')
    r = run(conf, "add", "zed", "--password-stdin", stdin="pw\n")
    assert r.returncode == 0 and r.stdout == "user zed added\n", r.stderr
    assert r.stderr == ("authrelay user: note: [auth] backend is saslauthd:/run/saslauthd/"
                        f"mux: logins are checked there, not in {tmp_path / 'state' / 'users.db'}"
                        ' (used once backend = "userdb")\n')
    assert run(conf, "list").stdout == "zed\n"


def test_database_down_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """PostgreSQL unreachable: `user suspended` printed a Python traceback (the other
    commands one line); now every one says so in one line and exits 1."""
    from support.ports import free_port

    conf = tmp_path / "authrelay.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n[auth]\nbackend = "postgresql"\n'
                    f'dsn = "postgresql://u:s3cretpw@127.0.0.1:{free_port()}/db"\n')
    for args in (("suspended",), ("list",), ("resume", "alice")):
        r = run(conf, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "s3cretpw" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "127.0.0.1" in r.stderr or "cannot resume" in r.stderr, r.stderr


def test_bad_config_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("nosuchkey = 1\n")
    r = run(bad, "list")
    assert r.returncode == 1
    assert "nosuchkey" in r.stderr


def test_config_from_environment(conf: Path) -> None:
    env = dict(os.environ, AUTHRELAY_CONFIG=str(conf))
    r = run(None, "add", "envuser", "--password-stdin", stdin="pw\n", env=env)
    assert r.returncode == 0, r.stderr
    assert db_of(conf).get_hash("envuser") is not None


def test_password_stdin_strips_the_newline_only(conf: Path) -> None:
    assert run(conf, "add", "alice", "--password-stdin",
               stdin="  two  spaces  \nsecond line\n").returncode == 0
    h = db_of(conf).get_hash("alice")
    assert passwords.verify_password(h, "  two  spaces  ")
    assert not passwords.verify_password(h, "two  spaces")


def test_passwd_and_addresses(conf: Path) -> None:
    assert run(conf, "add", "alice", "--password-stdin", stdin="old\n").returncode == 0
    r = run(conf, "passwd", "alice", "--password-stdin", stdin="new\n")
    assert r.returncode == 0 and r.stderr == ""
    h = db_of(conf).get_hash("alice")
    assert passwords.verify_password(h, "new") and not passwords.verify_password(h, "old")
    assert run(conf, "address", "add", "alice", "Sales@Example.org").returncode == 0
    assert db_of(conf).addresses("alice") == {"sales@example.org"}
    assert run(conf, "address", "del", "alice", "SALES@example.org").returncode == 0
    assert db_of(conf).addresses("alice") == set()


def test_passwd_names_the_app_passwords_that_still_work(conf: Path) -> None:
    """`user passwd` is what an admin runs for a compromised account; the account's app
    passwords keep working after it, which it now says (with the command to revoke)."""
    assert run(conf, "add", "alice", "--password-stdin", stdin="old\n").returncode == 0
    for name in ("phone", "laptop"):
        assert run(conf, "app-password", "add", "alice", "--name", name).returncode == 0
    r = run(conf, "passwd", "alice", "--password-stdin", stdin="new\n")
    assert r.returncode == 0 and "password of alice changed" in r.stdout
    assert "alice's 2 app passwords (laptop, phone) still work" in r.stderr, r.stderr
    assert "authrelay user app-password revoke alice --name NAME" in r.stderr


async def test_running_authenticator_sees_cli_changes(conf: Path) -> None:
    assert run(conf, "add", "alice", "--password-stdin", stdin="old\n").returncode == 0
    # A "server" holding the DB open with a long cache, as `authrelay serve` would.
    auth = UserDBAuthenticator(db_of(conf), cache_ttl=3600)
    try:
        assert await auth.verify("alice", "old") is AuthResult.OK
        assert run(conf, "passwd", "alice", "--password-stdin", stdin="new\n").returncode == 0
        assert await auth.verify("alice", "old") is AuthResult.BAD
        assert await auth.verify("alice", "new") is AuthResult.OK
        assert run(conf, "address", "add", "alice", "a@example.org").returncode == 0
        assert auth.addresses("alice") == {"a@example.org"}
        assert run(conf, "del", "alice").returncode == 0
        assert await auth.verify("alice", "new") is AuthResult.BAD
        assert auth.addresses("alice") == set()
    finally:
        auth.close()


# ----------------------------------------------------------------------------- prompts

def _run_on_tty(conf: Path, args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run with a pseudo-terminal as controlling tty, so getpass prompts really happen."""
    master, slave = os.openpty()

    def make_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "authrelay", "-c", str(conf), "user",
                             *args], stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=make_tty, close_fds=True)
    os.close(slave)
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                # Answer each "Password...: " prompt once it is shown.
                if pending and out.count(b"assword") > len(answers) - len(pending):
                    os.write(master, pending.pop(0).encode() + b"\n")
            elif proc.poll() is not None:
                break
        return proc.wait(30), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_prompts_twice(conf: Path) -> None:
    rc, out = _run_on_tty(conf, ["add", "alice"], ["tty-pw", "tty-pw"])
    assert rc == 0, out
    assert "Password (again):" in out
    assert "tty-pw" not in out  # no echo
    assert passwords.verify_password(db_of(conf).get_hash("alice"), "tty-pw")


def test_prompt_mismatch_is_an_error(conf: Path) -> None:
    rc, out = _run_on_tty(conf, ["add", "alice"], ["one", "two"])
    assert rc == 1
    assert "do not match" in out
    assert db_of(conf).get_hash("alice") is None


def test_without_a_terminal_the_prompt_names_password_stdin(conf: Path) -> None:
    """`user add bob` from cron, ssh without -t or a script (no controlling terminal):
    getpass fell back to standard input with a Python warning (its file, line and source:
    `GetPassWarning: Can not control echo on the terminal.`), `Warning: Password input
    may be echoed.`, and ended on `no password given`. Now one line naming the way that
    works; and a name refused is said before any password is asked for."""
    def user(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(conf), "user",
                               *args], input=stdin,
                              stdin=subprocess.DEVNULL if stdin is None else None,
                              capture_output=True, text=True, timeout=60,
                              start_new_session=True)  # no tty

    for args in (["add", "bob"], ["passwd", "alice"]):
        if args[0] == "passwd":
            assert run(conf, "add", "alice", "--password-stdin", stdin="pw\n").returncode == 0
        for given in (None, "only-once\n"):
            r = user(*args, stdin=given)
            assert (r.returncode, r.stdout, r.stderr) == (
                1, "", "authrelay user: no terminal to ask for the password on (cron, ssh "
                "without -t, a script): give it on standard input with --password-stdin "
                "(or twice, a line each)\n"), (args, given)
    assert db_of(conf).get_hash("bob") is None
    r = user("add", "a b")
    assert (r.returncode, r.stderr) == (
        1, "authrelay user: user name must not contain spaces or control characters\n")


def test_without_a_terminal_a_password_piped_twice_is_taken(conf: Path) -> None:
    """A script piping the password and its confirmation (`printf 'pw\\npw\\n' | authrelay
    user add alice`, as getpass's fallback read them before 301d526 refused any input
    without a terminal) keeps working, with no Python warning; a mismatch is refused."""
    def user(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(conf), "user",
                               *args], input=stdin, capture_output=True, text=True,
                              timeout=60, start_new_session=True)  # no tty

    r = user("add", "carol", "--address", "carol@example.org", stdin="s3cret\ns3cret\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "user carol added\n", "")
    added = db_of(conf).get_hash("carol")
    r = user("passwd", "carol", stdin="n3w\nother\n")
    assert (r.returncode, r.stderr) == (1, "authrelay user: passwords do not match\n")
    r = user("passwd", "carol", stdin="n3w\r\nn3w\r\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert db_of(conf).get_hash("carol") not in (None, added)
