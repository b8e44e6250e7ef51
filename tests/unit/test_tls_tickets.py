"""Session-ticket keys rotate: real TLS handshakes (memory BIOs) against CertStore's
context, with an injected clock."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

from authrelay import tls
from authrelay.config import from_dict


def client_context() -> ssl.SSLContext:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the ticket arrives in the handshake
    return cctx


CLIENT = client_context()  # one client: a session resumes only with the context it came from


def handshake(server_ctx: ssl.SSLContext, session: ssl.SSLSession | None
              ) -> ssl.SSLObject:
    """One TLS 1.2 handshake in memory; the client's SSLObject (its session resumable)."""
    cctx = CLIENT
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_hostname="relay.test", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    while len(done) < 2:
        for name, obj in (("c", client), ("s", server)):
            if name not in done:
                try:
                    obj.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return client


def test_the_ticket_key_is_renewed_every_lifetime(tmp_path: Path) -> None:
    """A worker's context (and with it OpenSSL's session-ticket key) was built once and
    kept until a reload: one key for months. Now it is rebuilt from the same certificate
    every TICKET_KEY_LIFETIME: a ticket resumes before, not after."""
    cert, key = tls.make_self_signed("relay.test", tmp_path)
    cfg = from_dict({"tls": {"cert": str(cert), "key": str(key)}})
    now = [1000.0]
    store = tls.CertStore(cfg, clock=lambda: now[0])
    first = handshake(store.context, None)
    assert first.session is not None and not first.session_reused
    now[0] += tls.TICKET_KEY_LIFETIME - 1
    assert handshake(store.context, first.session).session_reused
    ctx = store.context
    now[0] += 1
    assert store.context is not ctx  # a new context, the same certificate
    assert not handshake(store.context, first.session).session_reused
    again = handshake(store.context, None)
    assert handshake(store.context, again.session).session_reused


SRC = Path(__file__).resolve().parents[2] / "src"


def test_the_server_context_builds_under_each_python_here(tmp_path: Path) -> None:
    """The X25519 twin (94568f4) was made with set_ecdh_curve("X25519"), which some
    Pythons refuse, 'unknown group' (their set_ecdh_curve takes EC curves only: 3.11.2,
    Debian 12's python3): every worker of `serve` died at start. Each interpreter of our
    minor version on this machine (the tests' own, the distribution's) builds the
    context and completes a handshake; where X25519 cannot be set it is P-256 alone."""
    cert, key = tls.make_self_signed("relay.test", tmp_path)
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    pythons = [sys.executable] + [p for p in (f"/usr/bin/python{ver}",
                                              f"/usr/local/bin/python{ver}")
                                  if os.path.exists(p)]
    code = (
        "import ssl, sys\n"
        "from authrelay import tls\n"
        "from authrelay.config import from_dict\n"
        "cfg = from_dict({'tls': {'cert': sys.argv[1], 'key': sys.argv[2]}})\n"
        "ctx = tls.server_context(cfg)\n"
        "c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
        "c.check_hostname = False\n"
        "c.verify_mode = ssl.CERT_NONE\n"
        "bios = [ssl.MemoryBIO() for _ in range(4)]\n"
        "cl = c.wrap_bio(bios[0], bios[1], server_hostname='relay.test')\n"
        "sv = ctx.x25519.wrap_bio(bios[2], bios[3], server_side=True)\n"
        "done = set()\n"
        "while len(done) < 2:\n"
        "    for n, o in (('c', cl), ('s', sv)):\n"
        "        if n not in done:\n"
        "            try:\n"
        "                o.do_handshake()\n"
        "                done.add(n)\n"
        "            except ssl.SSLWantReadError:\n"
        "                pass\n"
        "    bios[2].write(bios[1].read())\n"
        "    bios[0].write(bios[3].read())\n"
        "print('handshake', cl.version())\n")
    for py in pythons:
        r = subprocess.run([py, "-c", code, str(cert), str(key)], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(SRC)})
        assert r.returncode == 0 and "handshake TLSv1.3" in r.stdout, \
            (py, r.stdout, r.stderr[-800:])
