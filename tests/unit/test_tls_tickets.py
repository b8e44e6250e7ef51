"""Session-ticket keys rotate: real TLS handshakes (memory BIOs) against CertStore's
context, with an injected clock."""

from __future__ import annotations

import ssl
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
