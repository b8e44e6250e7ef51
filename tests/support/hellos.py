"""ClientHellos for tests: the first bytes a real client (Python's ssl) sends.

Owns: `client_hello(ctx)`, the records a client context's handshake starts with, made in
memory (no socket), for tests that hand them to a server or parse them.
"""

from __future__ import annotations

import ssl


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The ClientHello records `ctx` sends (SNI relay.test)."""
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="relay.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return out.read()
    raise AssertionError("a client handshake ended without an answer")
