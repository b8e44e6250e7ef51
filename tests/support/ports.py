"""Free loopback ports for servers a test starts (its own or the fakes).

Owns: picking a port the kernel says is free now. Prefer binding to port 0 and reading
the port back; these are for what must know its port before it starts (a config file for
a subprocess, aiosmtpd's Controller, every fake MX on one shared port).
"""

from __future__ import annotations

import socket

TEST_HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 10))  # the fake MX / smart hosts


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def common_free_port(hosts: tuple[str, ...] = TEST_HOSTS, tries: int = 100) -> int:
    """A TCP port free on every one of `hosts` at this moment (0 if none was found)."""
    for _ in range(tries):
        socks: list[socket.socket] = []
        try:
            first = socket.socket()
            socks.append(first)
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            for h in hosts[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return 0

