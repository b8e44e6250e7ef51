"""The process model against real `authrelay serve` processes and real sockets (issue 10
items 1, 2, 7, 8).

- kill -9 of the master: every other process of the instance is gone soon after (parent
  death signal; and, with that signal disabled, the socketpair the workers watch), and
  the ports refuse connections. Polled against a generous deadline: no timed assertion.
- A second `serve` on the same state dir, or on an address another process listens on:
  exit 1, one line on stderr naming the lock holder or the address, nothing left running.
  A process of another user cannot join our ports with SO_REUSEPORT.
- SIGTERM: the listening sockets close at once (connections refused, never left hanging
  in a backlog) while a session in progress completes.
- Started as root with `user = ...`: a root-only key (0600 root in a 0700 root directory,
  as certbot makes) works, and is reloaded on SIGHUP after a renewal; the maillog file
  belongs to the user; a SIGHUP with a bad config is logged and the old config kept.
- Warnings and errors (a worker's death, Python logging records) are maillog lines,
  without tracebacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from relayproc import (
    PASSWORD,
    RelayProcess,
    alive,
    children,
    processes_running,
    refuses,
    to_toml,
)
from smtpclient import RawClient, client_ctx
from support.certs import install_cert
from support.privileges import TEST_USER, unprivileged_user
from support.procfs import connected_to, socket_inodes
from support.sessions import session_in_progress
from support.wait import wait_until

from authrelay import process

pytestmark = pytest.mark.slow


def _started(r: RelayProcess, processes: int) -> None:
    wait_until(lambda: r.maillog().count("daemon=started") >= processes, what="started")


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(config), "serve"],
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- item 1

@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "pipe-only"])
def test_kill9_master_leaves_no_process_and_ports_refuse(relay_factory, monkeypatch,
                                                         pdeathsig: bool) -> None:
    if not pdeathsig:
        # The second mechanism alone: workers watch the master's end of a socketpair.
        monkeypatch.setenv("AUTHRELAY_NO_PDEATHSIG", "1")
    r = relay_factory(workers=2)
    _started(r, 3)
    assert r.proc is not None
    master = r.proc.pid
    kids = children(master)
    assert len(kids) == 2
    held = session_in_progress(r)  # a worker busy with a client changes nothing
    try:
        os.kill(master, signal.SIGKILL)
        r.proc.wait(timeout=30)
        wait_until(lambda: not any(alive(k) for k in kids), what="workers gone")
        assert processes_running(r.config) == []
        # A killed worker's leader thread shows as a zombie while its other threads still
        # tear down (and hold the fd table): wait, briefly, for the sockets to go too.
        for port in r.ports.values():
            wait_until(lambda port=port: refuses(port), what=f"port {port} refused")
        assert held.closed()
    finally:
        held.close()
    if not pdeathsig:  # the pipe path says why the worker went away
        assert r.maillog().count("warning=master process is gone; worker exiting") == 2
    # A restart right away (systemd Restart=) gets the lock and every port.
    r.start()
    _started(r, 6)
    with RawClient(r.ports["submission"]) as c:
        assert c.reply().code == 220


# --------------------------------------------------------------------------- item 2

def test_second_serve_same_state_dir_exits_1_with_one_line(relay_factory) -> None:
    r = relay_factory(workers=2)
    _started(r, 3)
    assert r.proc is not None
    before = sorted([r.proc.pid, *children(r.proc.pid)])
    res = _serve(r.config)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert f"pid {r.proc.pid}" in lines[0] and "authrelay.lock" in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    # Nothing of the second serve is left; the first instance is intact and serves.
    assert sorted(processes_running(r.config)) == before
    with RawClient(r.ports["submission"]) as c:
        assert c.reply().code == 220
    assert "daemon=started" not in r.maillog().split("daemon=started (master)")[-1]


def test_a_master_whose_start_fails_stops_its_workers_at_once(relay_factory) -> None:
    """The master's start failing once its workers were forked (here: another process
    holds the spool's scheduler.lock, as a stale offline `queue` command or a second
    instance on the same spool does) left the workers taking mail for their whole stop's
    time (shutdown_timeout + 10 s: mail no scheduler of that run delivers; seen: 15
    messages accepted in the 17 s after the master's fatal line), and then killed them
    mid-session. Now they get a stop's SIGTERM at once: each says stopped; exit 1."""
    r = relay_factory({"shutdown_timeout": "30s"}, workers=2, start=False)
    spool = r.state / "spool"
    spool.mkdir(parents=True, mode=0o700)
    with open(spool / "scheduler.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r.start()  # the workers listen; the master waits for the lock, then fails
        assert r.proc is not None
        assert r.proc.wait(timeout=60) == 1
    log = r.maillog()
    assert "uncaught exception: RuntimeError: another scheduler holds" in log
    assert len(re.findall(r"authrelay\[\d+\]: NOQUEUE: daemon=stopped, pid=", log)) == 2, log
    assert processes_running(r.config) == []


def test_second_serve_on_used_address_exits_1_with_one_line(relay_factory) -> None:
    r = relay_factory(workers=2)
    _started(r, 3)
    other = relay_factory(workers=2, start=False)  # its own state dir ...
    data = dict(other.config_data)
    data["listen"] = [{"address": f"127.0.0.1:{other.ports['smtp']}", "mode": "smtp"},
                      {"address": f"127.0.0.1:{r.ports['submission']}",  # ... one port taken
                       "mode": "submission"}]
    other.config.write_text(to_toml(data))
    res = _serve(other.config)
    assert res.returncode == 1
    assert r.proc is not None  # the holder named: the first instance's master
    assert res.stderr.splitlines() == [
        f"authrelay: cannot listen on 127.0.0.1:{r.ports['submission']}: address already "
        f"in use by pid {r.proc.pid} (authrelay)"]
    assert processes_running(other.config) == []
    assert refuses(other.ports["smtp"])  # nothing was left bound either
    # Its state dir lock was released: a serve on it now starts.
    other.config.write_text(to_toml(other.config_data))
    other.start()
    _started(other, 3)


def _this_process() -> str:
    """How a refused serve names the test process holding its port."""
    return f"pid {os.getpid()} ({Path('/proc/self/comm').read_text().strip()})"


def test_foreign_reuseport_socket_blocks_start(relay_factory) -> None:
    """An address held by another program with SO_REUSEPORT: we do not join its group."""
    r = relay_factory(workers=2, start=False)
    foreign = socket.socket()
    foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    foreign.bind(("127.0.0.1", r.ports["smtp"]))
    foreign.listen(5)
    try:
        res = _serve(r.config)
        assert res.returncode == 1
        assert res.stderr.strip().endswith(f"127.0.0.1:{r.ports['smtp']}: address already in "
                                           f"use by {_this_process()}")
        assert processes_running(r.config) == []
    finally:
        foreign.close()


def test_serve_started_while_another_binds_the_same_port_exits_1(relay_factory) -> None:
    """Two instances on different state dirs started at the same instant must not both pass
    the free check and then both bind into one SO_REUSEPORT group. This process plays the
    other instance caught between its check and its binds: it holds the bind lock, lets the
    serve reach its binding step (past its instance lock), then binds the port with
    SO_REUSEPORT as an instance does, and releases the lock: the serve must find the
    address in use and exit 1, not join the group and run beside it."""
    r = relay_factory(workers=2)
    _started(r, 3)
    r.stop()  # its state and certificate made: from its lock to its binds takes a moment
    lock_file = r.state / "authrelay.lock"
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        with process.bind_lock():
            proc = subprocess.Popen([sys.executable, "-m", "authrelay", "-c", str(r.config),
                                     "serve"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            try:
                wait_until(lambda: lock_file.exists()
                           and lock_file.read_text().strip() == str(proc.pid),
                           what="the serve past its instance lock")
                # Time to reach its binds (ms once state and certificate exist); no
                # deadline rides on it: the serve, if correct, waits for the lock.
                time.sleep(2.0)
                other.bind(("127.0.0.1", r.ports["smtp"]))
                other.listen(5)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the serve bound a port another instance had just taken, and ran")
        assert proc.returncode == 1
        assert err.splitlines() == [f"authrelay: cannot listen on 127.0.0.1:{r.ports['smtp']}: "
                                    f"address already in use by {_this_process()}"]
        assert processes_running(r.config) == []
    finally:
        other.close()


@pytest.mark.root
def test_another_users_program_on_the_bind_lock_holds_no_start(relay_factory) -> None:
    """The bind lock is an abstract unix socket name, which has no permissions: any local
    user (www-data through a web application's hole) can bind it. Held so, listening or
    not, it made every start and restart of the relay wait 30 s and exit 1 (a local
    denial of service on the mail system). Another user's program can never join our
    SO_REUSEPORT group (the kernel's same-uid rule), so it is no instance to wait for:
    the serve starts and serves."""
    unprivileged_user()
    r = relay_factory(start=False)
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    for listening in (False, True):
        code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                f"s.bind({process.BIND_LOCK!r})\n" + ("s.listen(1)\n" if listening else "")
                + "print('held', flush=True)\nsys.stdin.read()\n")
        squatter = subprocess.Popen(["runuser", "-u", TEST_USER, "--", python, "-c", code],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert squatter.stdout is not None and squatter.stdout.readline() == "held\n"
            r.start()
            with RawClient(r.ports["smtp"]) as c:
                assert c.reply().code == 220
            r.stop()
        finally:
            assert squatter.stdin is not None
            squatter.stdin.close()
            squatter.wait(timeout=30)


@pytest.mark.root
def test_other_user_cannot_join_our_ports(relay_factory) -> None:
    """The kernel admits a SO_REUSEPORT socket into a group only for the same effective uid
    as its creator: our sockets, made by root, are closed to the dropped user's programs."""
    unprivileged_user()
    r = relay_factory(workers=2)
    _started(r, 3)
    code = ("import socket,sys\ns=socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"try:\n s.bind(('127.0.0.1', {r.ports['submission']}))\n"
            "except OSError as e:\n print(e.errno)\nelse:\n print('joined')\n")
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    res = subprocess.run(["runuser", "-u", TEST_USER, "--", python, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "98", res.stdout + res.stderr  # EADDRINUSE


# --------------------------------------------------------------------------- item 7

@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_refuses_new_connections_while_session_finishes(relay_factory,
                                                                workers: int) -> None:
    r = relay_factory(workers=workers, overrides={"shutdown_timeout": "60s"})
    _started(r, workers + 1 if workers > 1 else 1)
    c = session_in_progress(r)
    try:
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: during shutdown\r\n\r\nfirst half\r\n")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGTERM)
        # Every listener refuses (not: accepts and hangs) while the session still runs.
        for port in r.ports.values():
            wait_until(lambda port=port: refuses(port), what=f"port {port} refused")
        for port in r.ports.values():
            assert refuses(port)
        c.send(b"second half\r\n.\r\n")
        assert c.reply().code == 250
        assert c.cmd("QUIT").code == 221
    finally:
        c.close()
    assert r.proc.wait(timeout=60) == 0
    assert len(r.queued()) == 1


# --------------------------------------------------------------------------- privileges

def _peer_der(port: int) -> bytes:
    with RawClient(port, tls=client_ctx()) as c:
        assert c.reply().code == 220
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        c.cmd("QUIT")
        return der


@pytest.fixture(params=[2, 1], ids=["2-workers", "single"])
def dropped(reachable_dir: Path, request: pytest.FixtureRequest
            ) -> Iterator[tuple[RelayProcess, Path, bytes, Path]]:
    """serve started as root with `user = authrelay-test` (two workers, or one process
    receiving and delivering), a root-only key and a maillog file in a root-owned
    directory. `r.nprocs`: the processes that log (master and workers)."""
    workers = request.param
    pw = unprivileged_user()
    le = reachable_dir / "letsencrypt"
    cert, key, der = install_cert(trustme.CA(), le, dir_mode=0o700)
    logdir = reachable_dir / "log"
    logdir.mkdir(mode=0o755)
    logfile = logdir / "mail.log"
    r = RelayProcess(reachable_dir, {"user": TEST_USER,
                                     "tls": {"cert": str(cert), "key": str(key)},
                                     "log": {"target": f"file:{logfile}"}}, workers=workers)
    r.nprocs = workers + 1 if workers > 1 else 1  # type: ignore[attr-defined]
    os.chmod(r.config, 0o644)
    r.log = logfile  # the maillog; stdout/stderr go to reachable_dir/maillog.txt
    r.start()
    try:
        _started(r, r.nprocs)  # type: ignore[attr-defined]
        assert r.proc is not None
        wait_until(lambda: all(Path(f"/proc/{p}/status").read_text().split("Uid:")[1].split()[1]
                          == str(pw.pw_uid) for p in [r.proc.pid, *children(r.proc.pid)]
                          if p != _helper(r)), what="privileges dropped")
        yield r, le, der, logfile
    finally:
        r.stop()


def _helper(r: RelayProcess) -> int | None:
    """The key helper: the master's child that stays root."""
    assert r.proc is not None
    for p in children(r.proc.pid):
        if Path(f"/proc/{p}/status").read_text().split("Uid:")[1].split()[1] == "0":
            return p
    return None


@pytest.mark.root
def test_kill9_dropped_master_takes_the_root_helper_too(dropped) -> None:
    """The key helper stays root for the instance's life: kill -9 of the (dropped) master
    must end it with the workers, not leave a root process answering on a socket."""
    r = dropped[0]
    assert r.proc is not None
    kids = children(r.proc.pid)
    helper = _helper(r)
    assert helper is not None and helper in kids
    os.kill(r.proc.pid, signal.SIGKILL)
    r.proc.wait(timeout=30)
    wait_until(lambda: not any(alive(k) for k in kids), what="helper and workers gone")
    assert processes_running(r.config) == []


@pytest.mark.root
def test_a_dead_key_helper_is_said_when_it_dies_and_at_each_reload(dropped) -> None:
    """The key helper killed (kill -9, the OOM killer): nothing was said; every reload
    then failed with 'key helper: [Errno 32] Broken pipe' and the log file after
    logrotate 'cannot reopen ... BrokenPipeError', naming neither what died nor what to
    do. Its death is one error line at once, and each failure names it."""
    r = dropped[0]
    helper = _helper(r)
    assert r.proc is not None and helper is not None
    os.kill(helper, signal.SIGKILL)
    wait_until(lambda: f"error=key helper {helper} died (killed by SIGKILL): until authrelay "
               "is restarted, reloads fail and root-only files (certificate key, config, "
               "smart host secrets, the log file after logrotate) cannot be read"
               in r.maillog(), what="the helper's death")
    os.kill(r.proc.pid, signal.SIGHUP)
    gone = f"key helper {helper} is gone (it died; see the maillog): restart authrelay to " \
           "read root-only files again"
    wait_until(lambda: f"daemon=reload failed, keeping the running config, error={gone}"
               in r.maillog(), what="the reload's failure")
    assert f"error=cannot reopen the maillog, still writing the old file: HelperGone: {gone}" \
        in r.maillog()
    assert r.maillog().count(f"key helper {helper} died") == 1
    assert "Broken pipe" not in r.maillog()


@pytest.mark.root
def test_root_only_key_reloaded_on_sighup_after_renewal(dropped) -> None:
    r, le, der_old, logfile = dropped
    assert r.proc is not None
    pw = pwd.getpwnam(TEST_USER)
    # The privilege split: the master and both workers run as the user; one helper,
    # holding no listening socket, stays root to read the key.
    helper = _helper(r)
    workers = r.nprocs - 1 if r.nprocs > 1 else 0
    assert helper is not None and len(children(r.proc.pid)) == workers + 1
    assert not any("socket:" in os.readlink(f"/proc/{helper}/fd/{fd}") and
                   _is_listening(helper, fd) for fd in os.listdir(f"/proc/{helper}/fd"))
    # The key is in the workers' memory; they are not dumpable (the kernel cleared the flag
    # at the uid change, so /proc/PID files stay root's): same-user ptrace cannot read it.
    for pid in children(r.proc.pid):
        assert Path(f"/proc/{pid}/environ").stat().st_uid == 0
    assert (le / "privkey.pem").stat().st_uid == 0
    assert (le / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert _peer_der(r.ports["submissions"]) == der_old
    _, _, der_new = install_cert(trustme.CA(), le, dir_mode=0o700)  # the renewal
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: r.maillog().count("daemon=reloaded") >= r.nprocs, what="all reloaded")
    for _ in range(4):  # whichever worker answers
        assert _peer_der(r.ports["submissions"]) == der_new
    # The maillog file belongs to the user (it is reopened as that user on SIGHUP).
    st = logfile.stat()
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
    assert "NOQUEUE: error=" not in r.maillog() and "Traceback" not in r.maillog()
    # The instance lock and the state belong to the user too.
    assert (r.state / "authrelay.lock").stat().st_uid == pw.pw_uid
    # kill -9 of the (unprivileged) master: the root helper goes with the workers.
    kids = children(r.proc.pid)
    os.kill(r.proc.pid, signal.SIGKILL)
    r.proc.wait(timeout=30)
    wait_until(lambda: not any(alive(k) for k in kids), what="helper and workers gone")
    for port in r.ports.values():  # (a zombie leader's threads may still hold the fds)
        wait_until(lambda port=port: refuses(port), what=f"port {port} refused")


def _is_listening(pid: int, fd: str) -> bool:
    inode = os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:["):-1]
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[9] == inode and parts[3] == "0A":  # TCP_LISTEN
                return True
    return False


@pytest.mark.root
def test_sighup_after_logrotate_and_bad_config(dropped) -> None:
    r, le, der_old, logfile = dropped
    assert r.proc is not None
    # A bad config: the failure is logged, the running config and certificate stay.
    good = r.config.read_text()
    r.config.write_text(good + "\n[limits]\nmax_recipients = 'many'\n")
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: "daemon=reload failed" in r.maillog(), what="reload failed logged")
    line = next(ln for ln in r.maillog().splitlines() if "daemon=reload failed" in ln)
    assert "not valid TOML" in line or "limits" in line
    assert r.proc.poll() is None
    assert _peer_der(r.ports["submissions"]) == der_old
    c = session_in_progress(r)  # still serving with the old config
    c.close()
    # logrotate renames the file (no `create`): the user could not create the new one in
    # a root directory; the key helper does, for the user, and every process moves over.
    r.config.write_text(good)
    pw = pwd.getpwnam(TEST_USER)
    rotated = logfile.with_suffix(".log.1")
    os.replace(logfile, rotated)
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: logfile.exists() and r.maillog().count("daemon=reloaded") >= r.nprocs,
          what="reloaded, in the new file")
    st = logfile.stat()
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
    assert "daemon=reloaded" not in rotated.read_text()
    assert "NOQUEUE: error=" not in rotated.read_text()  # no "cannot reopen"
    with RawClient(r.ports["submission"]) as c:  # a session's lines land there too
        c.reply()
        c.cmd("QUIT")
    wait_until(lambda: "disconnect=" in r.maillog(), what="session logged in the new file")
    # logrotate's `create 0640 root adm`: a root file; it is handed to the user.
    os.replace(logfile, rotated)
    logfile.touch(mode=0o640)
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: r.maillog().count("daemon=reloaded") >= r.nprocs, what="reloaded again")
    assert logfile.stat().st_uid == pw.pw_uid


def test_sighup_reopens_the_log_file_in_every_process(relay_factory) -> None:
    """Without a privilege drop every process reopens the path itself, whatever the
    reload's outcome (the master tells the workers)."""
    r = relay_factory(workers=2, start=False)
    logfile = r.tmp / "mail.log"
    data = dict(r.config_data)
    data["log"] = {"target": f"file:{logfile}"}
    r.config.write_text(to_toml(data))
    r.log = logfile
    r.start()
    _started(r, 3)
    assert r.proc is not None
    good = r.config.read_text()
    r.config.write_text(good + "\nbogus = 1\n")  # the reload fails ...
    os.replace(logfile, r.tmp / "mail.log.1")
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: logfile.exists() and "daemon=reload failed" in r.maillog(),
          what="reload failed, in the new file")
    workers = children(r.proc.pid)

    def both_workers_logged() -> bool:  # ... but both workers write the new file
        with RawClient(r.ports["smtp"]) as c:  # (the kernel picks the worker: try again)
            c.reply()
            c.cmd("QUIT")
        return all(f"[{w}]: NOQUEUE: connect=" in r.maillog() for w in workers)

    wait_until(both_workers_logged, what="both workers log into the new file")


# --------------------------------------------------------------------------- item 8

def test_worker_death_is_one_maillog_line_and_replaced(relay_factory) -> None:
    r = relay_factory(workers=2)
    _started(r, 3)
    assert r.proc is not None
    kids = children(r.proc.pid)
    victim = kids[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: f"error=worker {victim} died (killed by SIGKILL); restarting in 0.2 s"
          in r.maillog())
    _started(r, 4)
    assert len(children(r.proc.pid)) == 2
    # The replacement dies at once as well: the next start waits (crash-loop throttle).
    (new,) = [p for p in children(r.proc.pid) if p not in kids]
    os.kill(new, signal.SIGKILL)
    wait_until(lambda: f"error=worker {new} died (killed by SIGKILL); restarting in 1 s"
          in r.maillog())
    _started(r, 5)
    text = r.maillog()
    assert "Traceback" not in text
    for port in r.ports.values():
        with RawClient(port, tls=client_ctx() if port == r.ports["submissions"] else None) as c:
            assert c.reply().code == 220


def test_a_worker_stopped_alone_is_replaced_at_once_not_throttled(relay_factory) -> None:
    """A worker ended by an admin's SIGTERM to it (exit 0) counted as a crash: `error=
    worker PID died (exit status 0); restarting in 0.2 s`, then 1 s, 2 s ... when it was
    stopped again within 10 s of its start, so repeated stops left fewer workers running.
    It is replaced at once now, one `daemon=` line, and a crash after such stops still
    starts the crash-loop throttle at its first step."""
    r = relay_factory(workers=2)
    _started(r, 3)
    assert r.proc is not None
    master = r.proc.pid
    kids = children(master)
    victim = kids[0]
    for n in range(3):  # the same worker's place each time, each within 10 s of its start
        os.kill(victim, signal.SIGTERM)
        line = f"daemon=worker {victim} stopped; replaced at once"
        wait_until(lambda line=line: line in r.maillog(), what=lambda: r.maillog()[-1500:])
        _started(r, 4 + n)
        (victim,) = [p for p in children(master) if p not in kids]
        kids = children(master)
    assert " died " not in r.maillog()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: f"error=worker {victim} died (killed by SIGKILL); restarting in 0.2 s"
               in r.maillog(), what=lambda: r.maillog()[-1500:])
    _started(r, 7)
    assert len(children(master)) == 2


def test_a_worker_that_does_not_stop_is_killed_with_a_line(relay_factory) -> None:
    """SIGTERM while a worker cannot stop (here: SIGSTOP, as one hung in the kernel): the
    master said `daemon=stopped` with the worker still there, waited as long again, and
    killed it without a word. It is killed shutdown_timeout + 10 s after SIGTERM, with a
    line, before the master's `stopped`; nothing of the instance is left."""
    r = relay_factory({"shutdown_timeout": "1s"}, workers=2)
    _started(r, 3)
    assert r.proc is not None
    master = r.proc.pid
    hung = children(master)[0]
    os.kill(hung, signal.SIGSTOP)
    os.kill(master, signal.SIGTERM)
    assert r.proc.wait(timeout=60) == 0
    assert not alive(hung)
    text = r.maillog()
    killed = (f"NOQUEUE: error=worker {hung} had not stopped 11 s after SIGTERM "
              "(shutdown_timeout = 1 s + 10 s); killed (SIGKILL)")
    assert text.count(killed) == 1, text
    assert text.index(killed) < text.index(f"NOQUEUE: daemon=stopped, pid={master}")
    assert processes_running(r.config) == []


def test_connections_of_a_killed_worker_leave_the_pools(relay_factory) -> None:
    """The connections a worker held when it died are given back by the master: they
    stayed counted in the shared pools until a restart, so workers killed under load
    (OOM killer, a crash) left the listener full and every new client got 421."""
    r = relay_factory({"limits": {"max_connections": 10, "pool_eviction": False}},
                      workers=2)
    _started(r, 3)
    assert r.proc is not None
    port = r.ports["submission"]
    cap = 8  # max_connections minus pool_reserve_percent (20)
    held = [RawClient(port) for _ in range(cap)]
    try:
        assert [c.reply().code for c in held] == [220] * cap
        kids = children(r.proc.pid)
        for k in kids:
            os.kill(k, signal.SIGKILL)
        wait_until(lambda: not any(alive(k) for k in kids), what="workers gone")
        _started(r, 5)
    finally:
        for c in held:
            c.close()
    again = [RawClient(port) for _ in range(cap)]
    try:
        assert [c.reply().code for c in again] == [220] * cap
    finally:
        for c in again:
            c.close()


class _NextHop:
    """A scripted next hop on loopback: 250 to every command of one connection at a time,
    221 to QUIT without closing, so it sees the relay's own close (`closed`): the
    end-of-file a copy of the relay's socket in another process holds back."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.delivered = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn, conn.makefile("rb") as f:
                conn.sendall(b"220 hop.test ESMTP\r\n")
                while line := f.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-hop.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        while f.readline() not in (b".\r\n", b""):
                            pass
                        conn.sendall(b"250 2.0.0 queued\r\n")
                        self.delivered.set()
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 bye\r\n")
                    else:
                        conn.sendall(b"250 2.0.0 ok\r\n")
            self.closed.set()  # the relay closed its end: end of file

    def stop(self) -> None:
        self.listener.close()


def test_a_worker_forked_again_holds_none_of_the_masters_sockets(relay_factory) -> None:
    """A worker the master forks again (the first died) inherited every descriptor the
    master had opened since its start: its cached outbound connection, its control socket
    and that socket's clients, its DNS and database sockets, the scheduler's lock. So the
    next hop saw no close when the master closed its connection, nor a control client
    when the master closed it, for as long as that worker lived. Now the new worker holds
    of the master's sockets only those the worker it replaces held (its listeners)."""
    hop = _NextHop()
    try:
        r = relay_factory({"relay": {"smart_host": [f"127.0.0.1:{hop.port}"],
                                     "smart_host_tls": "none"},
                           "delivery": {"idle_timeout": 600}}, workers=2)
        _started(r, 3)
        assert r.proc is not None
        master = r.proc.pid
        with smtplib.SMTP("127.0.0.1", r.ports["submission"], timeout=30) as c:
            c.starttls(context=r.client_context())
            c.login("alice", PASSWORD)
            c.sendmail("alice@local.test", ["bob@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        assert hop.delivered.wait(60), "the message reached the next hop"
        wait_until(lambda: connected_to(master, "127.0.0.1", hop.port),
                   what="the master's connection to the next hop, cached")
        (outbound,) = connected_to(master, "127.0.0.1", hop.port)
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.settimeout(60)  # a bound against a hang, not a measure
        with control:
            control.connect(str(r.state / "spool" / "control.sock"))
            control.sendall(b'{"op": "status"}\n')
            assert b'"ok": true' in control.recv(65536)
            kids = children(master)
            dead = socket_inodes(kids[0])
            os.kill(kids[0], signal.SIGKILL)
            _started(r, 4)
            (new,) = [p for p in children(master) if p not in kids]
            masters = socket_inodes(master)
            assert outbound in masters
            held = socket_inodes(new) & masters
            assert outbound not in held
            assert held <= dead, "only the listeners of the worker it replaces"
            # The master closes the control client (a request over its limit): the client
            # sees the end of the connection although the new worker lives.
            control.sendall(b"x" * (70 * 1024))
            while control.recv(65536):
                pass
        # A reload with new [delivery] settings closes the old courier's idle connection.
        r.config.write_text(r.config.read_text().replace("idle_timeout = 600",
                                                         "idle_timeout = 500"))
        os.kill(master, signal.SIGHUP)
        assert hop.closed.wait(60), "the next hop sees the relay's close"
        assert alive(new)
    finally:
        hop.stop()


def _maillog_of(tmp_path: Path, body: str) -> list[str]:
    """The maillog lines of a child process (the handlers are process-wide) that logs to
    a file as serve sets it up (daemon._setup_logging), runs `body` (tmp_path's modules
    importable), and says nothing on stderr."""
    out = tmp_path / "log"
    code = f"""
from authrelay import maillog, daemon
from authrelay.config import from_dict
cfg = from_dict({{"log": {{"target": "file:{out}"}}}})
maillog.configure(cfg.log.target)
daemon._setup_logging(cfg)
{body}
maillog.get().flush()
"""
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": path})  # tmp_path's modules
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # nothing beside the maillog at info level
    return out.read_text().splitlines()


def test_logging_records_become_maillog_lines(tmp_path: Path) -> None:
    """A warning, an error with an exception, warnings.warn, and an uncaught thread
    exception, each one line."""
    lines = _maillog_of(tmp_path, """
import logging, threading, warnings
logging.getLogger("authrelay.x").info("not shown")
logging.getLogger("authrelay.x").warning("disk %s", "slow")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("authrelay.y").exception("boom")
warnings.warn("old thing", DeprecationWarning)
t = threading.Thread(target=lambda: [][1]); t.start(); t.join()
""")
    assert len(lines) == 4, lines
    assert lines[0].endswith("NOQUEUE: warning=authrelay.x: disk slow")
    assert lines[1].endswith("NOQUEUE: error=authrelay.y: boom: ZeroDivisionError: "
                             "division by zero")
    assert "warning=py.warnings: " in lines[2] and "old thing" in lines[2]
    assert "error=authrelay: uncaught exception in thread" in lines[3]
    assert "IndexError: list index out of range" in lines[3]


def test_a_python_warning_is_one_maillog_line_without_its_source(tmp_path: Path) -> None:
    """A library's warning (warnings.warn in a module whose source Python finds) was
    logged as warnings.formatwarning() wrote it: a newline and the source line escaped
    into the maillog line (`...: old thing\\x0a  warnings.warn(...)\\x0a`). One line,
    `warning=py.warnings: FILE:LINE: CATEGORY: MESSAGE`."""
    lib = tmp_path / "oldlib.py"
    lib.write_text("import warnings\n\ndef call():\n"
                   "    warnings.warn('old thing', DeprecationWarning, stacklevel=1)\n")
    lines = _maillog_of(tmp_path, """
import warnings
warnings.simplefilter("default")
import oldlib
oldlib.call()
""")
    assert len(lines) == 1, lines
    assert lines[0].endswith(f"NOQUEUE: warning=py.warnings: {lib}:4: DeprecationWarning: "
                             "old thing"), lines


def test_an_unraisable_exception_is_one_maillog_line(tmp_path: Path) -> None:
    """An exception raised where Python cannot raise it (a __del__, a finalizer: here an
    object collected with an error in its __del__) was Python's multi-line traceback on
    stderr, beside the maillog file; it is one error line there, nothing on stderr."""
    lines = _maillog_of(tmp_path, """
import gc
class Leaky:
    def __repr__(self):
        return "<Leaky>"
    def __del__(self):
        raise OSError(9, "Bad file descriptor")
Leaky()
gc.collect()
""")
    assert len(lines) == 1, lines
    assert re.fullmatch(r".* NOQUEUE: error=authrelay: Exception ignored in: <function "
                        r"Leaky\.__del__ at 0x[0-9a-f]+>: OSError: \[Errno 9\] Bad file "
                        r"descriptor", lines[0]), lines


@pytest.mark.root
def test_root_only_smart_host_password_read_by_the_helper(reachable_dir: Path, fake_mx,
                                                          trustme_ca) -> None:  # noqa: ANN001
    """relay.smart_host_password_file 0600 root (as Postfix's sasl_passwd): the dropped
    master delivers with it, through the key helper."""
    unprivileged_user()
    from support.certs import server_tls_context
    from test_e2e_delivery import submit

    secret_dir = reachable_dir / "secret"
    secret_dir.mkdir(mode=0o700)
    pw = secret_dir / "smarthost.pw"
    pw.write_text("s3cret pass\n")
    pw.chmod(0o600)
    ca = reachable_dir / "ca.pem"
    trustme_ca.cert_pem.write_to_path(str(ca))
    os.chmod(ca, 0o644)
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 require_starttls=True, users={"relayuser": "s3cret pass"})
    r = RelayProcess(reachable_dir, {
        "user": TEST_USER,
        "relay": {"smart_host": [sh.address], "smart_host_tls": "starttls",
                  "smart_host_user": "relayuser", "smart_host_password_file": str(pw),
                  "smart_host_ca_file": str(ca)},
        "delivery": {"retry": ["1s"]}}, workers=2)
    os.chmod(r.config, 0o644)
    r.start()
    try:
        _started(r, 3)
        submit(r, ["bob@example.test"])
        wait_until(lambda: len(sh.messages) == 1, timeout=30, what="delivered to the smart host")
        assert sh.messages[0].auth_user == "relayuser"
        assert "s3cret" not in r.maillog()
    finally:
        r.stop()


def test_sighup_says_what_needs_a_restart(relay_factory) -> None:
    r = relay_factory()
    _started(r, 1)
    assert r.proc is not None
    data = dict(r.config_data)
    data["listen"] = data["listen"][:2]  # a listener removed: only a restart does that
    data["limits"] = {"max_recipients": 7}
    r.config.write_text(to_toml(data))
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: "daemon=reloaded" in r.maillog(), what="reloaded")
    assert "warning=reload: listen needs a restart" in r.maillog()
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:  # still there
        assert c.reply().code == 220


@pytest.mark.root
def test_check_config_accepts_root_only_secrets_for_the_helper(reachable_dir: Path) -> None:
    """check-config (ExecStartPre) agrees with serve: with `user`, a root-only smart host
    password file is fine when the config is root's and not group/other-writable."""
    unprivileged_user()
    secret = reachable_dir / "secret"
    secret.mkdir(mode=0o700)
    pw = secret / "smarthost.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = reachable_dir / "authrelay.toml"
    cfg.write_text(to_toml({
        "hostname": "relay.test", "state_dir": str(reachable_dir / "state"), "user": TEST_USER,
        "listen": [{"address": "127.0.0.1:0", "mode": "submission"}],
        "relay": {"smart_host": ["127.0.0.1:2"], "smart_host_user": "u",
                  "smart_host_password_file": str(pw)}}))

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    cfg.chmod(0o644)
    res = check()
    assert "smart_host_password_file" not in res.stdout + res.stderr, res.stdout + res.stderr
    cfg.chmod(0o664)  # group-writable: the root helper will not read what it names
    res = check()
    assert res.returncode != 0
    assert "the root helper will not read it" in res.stdout + res.stderr


def test_worker_crash_is_one_line_and_crash_loop_throttled(relay_factory) -> None:
    """A worker that fails at start (a damaged users.db): each failure is one maillog line
    with the exception (no traceback anywhere: stdout and stderr are this file), and the
    restarts slow down."""
    r = relay_factory(workers=2, users={}, start=False)
    r.state.mkdir(parents=True)
    (r.state / "users.db").write_bytes(b"this is not a database" * 100)
    r.start()
    wait_until(lambda: "restarting in 2 s" in r.maillog(), timeout=30, what="throttled restarts")
    text = r.maillog()
    assert "error=authrelay.worker: worker " in text
    assert "failed: DatabaseError: file is not a database" in text
    assert "restarting in 0.2 s" in text and "restarting in 1 s" in text
    assert "Traceback" not in text
    assert r.proc is not None and r.proc.poll() is None  # the master carries on


@pytest.mark.root
def test_root_never_chowns_through_a_link_the_dropped_user_left(dropped) -> None:
    """Attack (a compromised daemon user going for root): root opened the maillog file
    through a link (log reopen on SIGHUP, start) and walked the state dir with chown()
    at start, following links, so a link the user left to a root file (/etc/shadow) got
    that file chowned to it. Now: O_NOFOLLOW and lchown; the root files stay root's."""
    r, _le, _der, logfile = dropped
    pw = pwd.getpwnam(TEST_USER)
    secrets = []
    for name in ("shadow-a", "shadow-b"):
        p = r.tmp / name
        p.write_text("root:secret\n")
        os.chmod(p, 0o600)
        secrets.append(p)
    # A careless admin made the log directory the daemon user's; the user swaps the log
    # file for a link and asks for a reopen (SIGHUP, as logrotate's postrotate does).
    os.chown(logfile.parent, pw.pw_uid, pw.pw_gid)
    rotated = logfile.with_suffix(".log.1")
    os.replace(logfile, rotated)
    os.symlink(secrets[0], logfile)
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    # ... and leaves a link in the state dir it owns, for the next start's walk.
    os.symlink(secrets[1], r.state / "spool" / "evil")
    # The processes keep writing where they were (the rotated file) and say why.
    wait_until(lambda: "daemon=reload" in rotated.read_text(), what="reload seen")
    r.stop()
    os.unlink(logfile)
    r.start()
    _started(r, r.nprocs)  # type: ignore[attr-defined]
    for p in secrets:
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (0, 0), p
        assert p.read_text() == "root:secret\n"
    assert r.proc.poll() is None
