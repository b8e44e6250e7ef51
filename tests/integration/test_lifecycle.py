"""Signals and privileges against a real `authrelay serve` process with clients connected.

SIGHUP: config and certificate re-read (the next handshake presents the renewed cert),
open sessions survive. SIGTERM: a session in progress finishes, new ones are refused, the
process exits 0 with the queue consistent. `serve` refuses a world-readable key. Started
as root with `user = ...` it runs as that user; the state dir is 0700, keys 0600.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from privpython import python_for
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, client_ctx, plain
from support.certs import install_cert
from support.privileges import TEST_USER, unprivileged_user
from support.sessions import session_in_progress

pytestmark = pytest.mark.slow


def _peer_der(port: int, *, implicit: bool) -> bytes:
    with RawClient(port, tls=client_ctx() if implicit else None) as c:
        assert c.reply().code == 220
        if not implicit:
            assert c.cmd("EHLO t").code == 250
            assert c.cmd("STARTTLS").code == 220
            c.starttls(client_ctx())
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        c.cmd("QUIT")
        return der


def _count(r: RelayProcess, text: str) -> int:
    return r.maillog().count(text)


def _ready(r: RelayProcess, processes: int = 1) -> RelayProcess:
    """Signal handlers are in place once each process logged its start (the ports accept
    connections earlier: they are bound before the event loop runs)."""
    r.wait_for(lambda: _count(r, "daemon=started") >= processes)
    return r


def _hup(r: RelayProcess) -> None:
    before = _count(r, "daemon=reloaded") + _count(r, "daemon=reload failed")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: _count(r, "daemon=reloaded") + _count(r, "daemon=reload failed")
               > before)


@pytest.fixture
def tls_relay(relay_factory, tmp_path: Path):
    ca = trustme.CA()
    cert, key, der = install_cert(ca, tmp_path / "le")
    r = _ready(relay_factory(overrides={"tls": {"cert": str(cert), "key": str(key)}}))
    return r, ca, tmp_path / "le", der


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_new_cert_and_config_open_session_survives(relay_factory, tmp_path: Path,
                                                          workers: int) -> None:
    ca = trustme.CA()
    cert, key, der_old = install_cert(ca, tmp_path / "le")
    r = relay_factory(workers=workers,
                      overrides={"tls": {"cert": str(cert), "key": str(key)}})
    _ready(r, workers + 1 if workers > 1 else 1)
    assert _peer_der(r.ports["submissions"], implicit=True) == der_old
    held = session_in_progress(r)  # TLS with the old certificate, mid-transaction
    try:
        _, _, der_new = install_cert(trustme.CA(), tmp_path / "le")  # "renewed"
        assert der_new != der_old
        data = dict(r.config_data)
        data["limits"] = {"max_message_size": 123456}
        r.config.write_text(to_toml(data))
        _hup(r)
        if workers > 1:  # the workers got the signal from the master; give each its turn
            r.wait_for(lambda: _count(r, "daemon=reloaded") >= 1 + workers)
        # Every new handshake, on either listener kind and whichever worker, is the new cert.
        for _ in range(2 * workers):
            assert _peer_der(r.ports["submissions"], implicit=True) == der_new
            assert _peer_der(r.ports["submission"], implicit=False) == der_new
        with RawClient(r.ports["smtp"]) as c:
            c.reply()
            assert "SIZE 123456" in c.cmd("EHLO t").lines[-1] or any(
                "SIZE 123456" in ln for ln in c.cmd("EHLO t").lines)
        # The session opened before the reload carries on and its message is queued.
        assert held.cmd("DATA").code == 354
        held.send(b"Subject: survived\r\n\r\nstill here\r\n.\r\n")
        assert held.reply().code == 250
        assert held.cmd("QUIT").code == 221
    finally:
        held.close()
    r.wait_for(lambda: len(r.queued()) == 1)


def _ecdsa_first_der(port: int, *, implicit: bool, tls13: bool) -> bytes:
    """The certificate a client preferring ECDSA gets (it would also take RSA)."""
    ctx = client_ctx()
    ctx.maximum_version = ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls13
                                                 else ssl.TLSVersion.TLSv1_2)
    if not tls13:
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    with RawClient(port, tls=ctx if implicit else None) as c:
        assert c.reply().code == 220
        if not implicit:
            assert c.cmd("EHLO t").code == 250
            assert c.cmd("STARTTLS").code == 220
            c.starttls(ctx)
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        c.cmd("QUIT")
        return der


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_replaces_the_certificate_across_key_types(relay_factory, tmp_path: Path,
                                                          workers: int) -> None:
    """The first-start self-signed ECDSA certificate replaced by a real RSA one, then by
    an ECDSA one again: after each SIGHUP every client, whatever key type it prefers, on
    both listener kinds and TLS versions, gets the new certificate (loading a second key
    type into the old context kept serving the old certificate to ECDSA clients)."""
    r = relay_factory(workers=workers)  # no [tls]: self-signed ECDSA under state/tls
    _ready(r, workers + 1 if workers > 1 else 1)
    selfsigned = _ecdsa_first_der(r.ports["submissions"], implicit=True, tls13=True)
    for kt in (trustme.KeyType.RSA, trustme.KeyType.ECDSA):
        cert, key, der = install_cert(trustme.CA(), tmp_path / f"le-{kt.name}", key_type=kt)
        data = dict(r.config_data)
        data["tls"] = {"cert": str(cert), "key": str(key)}
        r.config.write_text(to_toml(data))
        before = _count(r, "daemon=reloaded")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGHUP)
        r.wait_for(lambda b=before: _count(r, "daemon=reloaded") >= b + (
            workers + 1 if workers > 1 else 1))
        for _ in range(2 * workers):
            for tls13 in (True, False):
                for port, implicit in ((r.ports["submissions"], True),
                                       (r.ports["submission"], False)):
                    got = _ecdsa_first_der(port, implicit=implicit, tls13=tls13)
                    assert got == der != selfsigned, (kt, tls13, implicit)


def test_sighup_bad_key_keeps_old_cert(tls_relay) -> None:
    r, ca, d, der_old = tls_relay
    _, key, _ = install_cert(trustme.CA(), d)
    os.chmod(key, 0o644)  # a renewal hook that got the mode wrong
    before = _count(r, "daemon=reload failed")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: _count(r, "daemon=reload failed") > before)
    assert "private key is accessible to group/others" in r.maillog()
    assert _peer_der(r.ports["submissions"], implicit=True) == der_old
    assert r.proc.poll() is None


def test_sighup_with_a_broken_certificate_names_both_keys_and_why(tls_relay) -> None:
    """A renewal that left no PEM in the certificate (an empty or truncated download): the
    reload failed with 'CERT//KEY: cannot load: [SSL] PEM lib (_ssl.c:NNNN)', a path
    glued to a path and OpenSSL's name for a function. It names each config key with its
    file and says what is wrong; the old certificate stays."""
    r, ca, d, der_old = tls_relay
    cert, key = d / "fullchain.pem", d / "privkey.pem"
    cert.write_text("<html>503 Service Unavailable</html>\n")
    before = _count(r, "daemon=reload failed")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: _count(r, "daemon=reload failed") > before)
    assert re.search(
        rf"daemon=reload failed, keeping the running config, error=tls\.cert {cert} and "
        rf"tls\.key {key}: cannot load: no certificate and key in PEM form found in them "
        r"\(\[SSL\] PEM lib \(_ssl\.c:\d+\)\), pid=\d+$", r.maillog(), re.M), r.maillog()
    assert _peer_der(r.ports["submissions"], implicit=True) == der_old


def test_sigterm_lets_session_finish_and_exits_0(relay_factory) -> None:
    r = _ready(relay_factory(overrides={"shutdown_timeout": "60s"}))
    c = session_in_progress(r)
    try:
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: during shutdown\r\n\r\nfirst half\r\n")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGTERM)
        r.wait_for(lambda: "daemon=stopping" in r.maillog())
        # No new sessions while draining.
        try:
            with RawClient(r.ports["submission"], timeout=5) as n:
                assert n.reply().code != 220
        except (ConnectionRefusedError, ConnectionResetError, ConnectionError):
            pass
        c.send(b"second half\r\n.\r\n")
        assert c.reply().code == 250
        c.cmd("QUIT")
    finally:
        c.close()
    assert r.proc.wait(timeout=30) == 0
    assert len(r.queued()) == 1
    assert r.unready() == []  # the one message is complete (ready mark), nothing half-made
    body = r.message_bytes(r.queued()[0])
    assert body.endswith(b"first half\r\nsecond half\r\n")
    # The queue is intact for the next start: the message is found and tried again.
    r.start()
    r.wait_for(lambda: "Deferred" in r.maillog())


def test_sigterm_idle_session_gets_421_after_timeout(relay_factory) -> None:
    r = _ready(relay_factory(overrides={"shutdown_timeout": "1s"}))
    c = session_in_progress(r)
    try:
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGTERM)
        rep = c.reply()  # nothing sent: the server speaks first when it gives up
        assert rep.code == 421
        assert c.closed()
    finally:
        c.close()
    assert r.proc.wait(timeout=30) == 0
    assert r.queued() == [] and r.unready() == []  # no DATA was sent: nothing stored


def test_serve_refuses_world_readable_key(relay_factory, tmp_path: Path) -> None:
    cert, key, _ = install_cert(trustme.CA(), tmp_path / "le")
    os.chmod(key, 0o644)
    r = relay_factory(start=False, overrides={"tls": {"cert": str(cert), "key": str(key)}})
    res = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(r.config), "serve"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "private key is accessible to group/others" in res.stderr
    assert "chmod 600" in res.stderr
    # Nothing was bound: the port is still free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", r.ports["submission"]))


def test_state_dir_and_self_signed_key_modes(relay: RelayProcess) -> None:
    # 0711: every local user reaches public/submit.sock (localsubmit.py); nothing else
    # under the state dir is open to group or others.
    assert relay.state.stat().st_mode & 0o777 == 0o711
    public = relay.state / "public"
    assert public.stat().st_mode & 0o777 == 0o711
    assert (public / "submit.sock").stat().st_mode & 0o777 == 0o666
    # A login makes the stores that are opened lazily (known_addresses.db).
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20) as s:
        s.starttls(context=relay.client_context())
        s.login("alice", PASSWORD)
    relay.wait_for(lambda: (relay.state / "known_addresses.db").exists(),
                   what="known_addresses.db")
    # Nothing beneath is reachable through an entry closed to group and others.
    for p in relay.state.iterdir():
        if p.name != "public":
            assert p.lstat().st_mode & 0o077 == 0, (p, oct(p.lstat().st_mode))
    assert (relay.state / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (relay.state / "spool").stat().st_mode & 0o077 == 0


# --------------------------------------------------------------------------- privileges



def _proc_ids(pid: int) -> tuple[int, int, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    uid = gid = -1
    groups = ""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[2])  # effective
        elif line.startswith("Gid:"):
            gid = int(line.split()[2])
        elif line.startswith("Groups:"):
            groups = line.split(":", 1)[1].strip()
    return uid, gid, groups


@pytest.mark.root
def test_drop_privileges_mechanics(reachable_dir: Path) -> None:
    """daemon._drop_privileges in a forked child: state chowned, uid/gid/groups dropped."""
    from authrelay import daemon
    from authrelay.config import from_dict

    pw = unprivileged_user()
    state = reachable_dir / "state"
    cfg = from_dict({"state_dir": str(state), "user": TEST_USER})
    daemon._prepare_state(cfg)
    assert (state / "spool" / "queue").is_dir()  # the spool exists before any port listens
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(rfd)
        try:
            daemon._drop_privileges(cfg)
            ok = os.getuid() == pw.pw_uid and os.geteuid() == pw.pw_uid and \
                os.getgid() == pw.pw_gid and os.getgroups() in ([], [pw.pw_gid])
            try:
                os.setuid(0)  # must be impossible now
                ok = False
            except PermissionError:
                pass
            os.write(wfd, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(wfd)
    out = os.read(rfd, 10)
    os.close(rfd)
    os.waitpid(pid, 0)
    assert out == b"ok"
    for p in (state, state / "spool"):
        assert p.stat().st_uid == pw.pw_uid
    assert state.stat().st_mode & 0o777 == 0o711


@pytest.mark.root
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_as_root_runs_as_user(reachable_dir: Path, workers: int) -> None:
    """Bind as root, then run as `user`, from an install the user can read (as under
    /opt in production: tests/privpython.py builds one when the tests' own Python is not
    readable, e.g. pyenv under /root). Runs in CI (root): never skipped there."""
    pw = unprivileged_user()
    py = python_for(TEST_USER)  # fails (CI=true) or skips (elsewhere) when impossible
    r = RelayProcess(reachable_dir, {"user": TEST_USER}, workers=workers)
    r.python = py
    os.chmod(r.config, 0o644)
    r.start()
    try:
        assert r.proc is not None
        r.wait_for(lambda: _proc_ids(r.proc.pid)[0] == pw.pw_uid)
        uid, gid, groups = _proc_ids(r.proc.pid)
        assert (uid, gid) == (pw.pw_uid, pw.pw_gid) and groups in ("", str(pw.pw_gid))
        st = r.state.stat()
        assert st.st_uid == pw.pw_uid and st.st_mode & 0o777 == 0o711
        key = r.state / "tls" / "key.pem"
        assert key.stat().st_uid == pw.pw_uid and key.stat().st_mode & 0o777 == 0o600
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            assert c.reply().code == 220
            c.cmd("EHLO t")
            assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
            assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
            assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
            assert c.reply().code == 250
        r.wait_for(lambda: len(r.queued()) == 1)
        assert r.queued()[0].stat().st_uid == pw.pw_uid
    finally:
        r.stop()

