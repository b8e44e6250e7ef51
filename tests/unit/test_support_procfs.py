"""support.procfs: what the flood tests count is the process's TCP sockets."""

from __future__ import annotations

import os
import socket

from support.procfs import sockets_of


def test_sockets_of_counts_tcp_sockets_not_unix_ones() -> None:
    """A unix socket a process opens for itself (the relay's notify, control and submit
    sockets, opened after its ports answer) is no client connection: counted, a baseline
    read before it was made stayed below the count for good (the flaky 465 flood test).
    A TCP socket, listening or connected, is counted."""
    me = os.getpid()
    base = sockets_of(me)
    a, b = socket.socketpair()
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert sockets_of(me) == base
        with socket.socket() as ls:
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            with socket.create_connection(ls.getsockname()) as c:
                s, _ = ls.accept()
                with s:
                    assert sockets_of(me) == base + 3
                    assert c.fileno() >= 0
    finally:
        for x in (a, b, d):
            x.close()
    assert sockets_of(me) == base
