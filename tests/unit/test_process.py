"""process.py with real processes, locks, sockets and pipes: the instance lock, the free
address check, the parent-death arming (the fork/prctl race included) and the channels."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authrelay import process
from authrelay.process import Channel, InstanceBusy


def _wait_readable(fd: int, timeout: float = 10.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_instance_lock_names_the_live_holder(tmp_path: Path) -> None:
    fd = process.acquire_instance_lock(tmp_path)
    try:
        assert (tmp_path / "authrelay.lock").read_text() == f"{os.getpid()}\n"
        # Another process (flock is per open file: a new open in a child conflicts).
        code = ("import sys; from pathlib import Path; from authrelay import process\n"
                "try:\n process.acquire_instance_lock(Path(sys.argv[1]))\n"
                "except process.InstanceBusy as e:\n print(e)\n")
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
        assert f"another authrelay (pid {os.getpid()}) is running on state dir" in res.stdout
        assert "authrelay.lock" in res.stdout
    finally:
        os.close(fd)
    os.close(process.acquire_instance_lock(tmp_path))  # free again


@pytest.mark.slow
def test_instance_lock_held_by_leftovers_of_a_dead_master(tmp_path: Path) -> None:
    """The recorded master is dead but a child still holds the lock: wait (bounded) for it,
    then take the lock; if it never goes, say so."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: lock, then record a dead pid as the holder
        os.close(r)
        try:
            fd = process.acquire_instance_lock(tmp_path)
            os.pwrite(fd, b"999999999\n", 0)
            os.write(w, b"x")
            time.sleep(1.0)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    t0 = time.monotonic()
    fd = process.acquire_instance_lock(tmp_path, wait_dead=30)  # waits for the child
    os.close(fd)
    assert time.monotonic() - t0 < 30
    os.waitpid(pid, 0)
    # A leftover that never goes: refused after the bounded wait, naming no live pid.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os.close(r)
        try:
            fd = process.acquire_instance_lock(tmp_path)
            os.pwrite(fd, b"999999999\n", 0)
            os.write(w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    try:
        with pytest.raises(InstanceBusy, match="an exiting instance"):
            process.acquire_instance_lock(tmp_path, wait_dead=0.3)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_address_in_use_even_with_reuseport() -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        with pytest.raises(InstanceBusy, match=f"127.0.0.1:{port}: address already in use"):
            process.check_address_free(socket.AF_INET, "127.0.0.1", port, f"127.0.0.1:{port}")
    finally:
        s.close()
    process.check_address_free(socket.AF_INET, "127.0.0.1", port, "free now")


def test_arm_child_exits_when_the_master_died_before_prctl() -> None:
    """The race: the master dies between fork and prctl (the parent-death signal would
    never come): arm_child sees another parent and exits; the child never lives on."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - the "master"
        os.close(r)
        master = os.getpid()
        gate_r, gate_w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(gate_w)
            os.read(gate_r, 1)  # EOF: the master is gone
            deadline = time.monotonic() + 10
            while os.getppid() == master and time.monotonic() < deadline:
                time.sleep(0.01)
            process.arm_child(master)  # must exit here
            os.write(w, b"survived")
            os._exit(0)
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    assert _wait_readable(r, 15)
    assert os.read(r, 100) == b""  # EOF: the child exited without writing
    os.close(r)


def test_parent_death_signal_kills_the_child() -> None:
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - the "master"
        os.close(r)
        master = os.getpid()
        armed_r, armed_w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(armed_r)
            process.arm_child(master)
            os.write(w, b"armed")
            os.write(armed_w, b"x")  # the master dies only once the signal is armed
            time.sleep(30)  # only the parent-death signal ends this early
            os.write(w, b"survived")
            os._exit(0)
        os.close(armed_w)
        os.read(armed_r, 1)
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    os.waitpid(middle, 0)
    got, eof = b"", False
    while _wait_readable(r, 15):
        chunk = os.read(r, 100)
        if not chunk:
            eof = True  # the child is gone (well before its 30 s sleep ended)
            break
        got += chunk
    os.close(r)
    assert got == b"armed" and eof


def test_channel_messages_and_end_of_file() -> None:
    ch = Channel()
    pem = ((b"-----CERT-----\n" * 300, b"-----KEY-----\n"),
           (b"-----RSA CERT-----\n" * 20, b"-----RSA KEY-----\n" * 3))
    process.send(ch.master, b"R", process.pack_pem(pem))
    kind, payload = process.recv(ch.child)
    assert kind == b"R" and process.unpack_pem(payload) == pem
    rfd, wfd = os.pipe()
    process.send_fd(ch.master, b"L", wfd)
    kind, payload, fds = process.recv_with_fds(ch.child)
    assert kind == b"L" and len(fds) == 1
    os.write(fds[0], b"through the passed fd")
    assert os.read(rfd, 100) == b"through the passed fd"
    for fd in (rfd, wfd, *fds):
        os.close(fd)
    ch.master.close()
    assert process.recv(ch.child) == (b"", b"")  # the master is gone
    ch.close()


def test_bind_lock_held_by_our_own_uid_past_the_wait_is_instance_busy() -> None:
    """Past its wait, a lock another instance of our uid keeps holding (a start wedged
    between its check and its binds) is one InstanceBusy line, not a hang nor a bind
    without it; once released it is ours at once. A private name: no real serve meets it."""
    name = f"\0authrelay-test/bind-lock-{os.getpid()}".encode()
    busy = r"another authrelay is binding its listen addresses \(held for over 0.3 s\)"
    with process.bind_lock(name=name), pytest.raises(InstanceBusy, match=busy), \
            process.bind_lock(wait=0.3, name=name):
        pass
    with process.bind_lock(wait=0.3, name=name):
        pass  # free again
