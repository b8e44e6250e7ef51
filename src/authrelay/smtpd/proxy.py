"""PROXY protocol v1 and v2 (HAProxy's "The PROXY protocol", versions 1 and 2): sans-I/O.

Owns reading the header a load balancer sends first on each connection it relays, so the
client's real address (not the balancer's) is the one used for limits, AUTH lockouts, logs
and `Received:`. Contract: `ProxyParser().feed(bytes)` returns None while more input is
needed, a `ProxyHeader` once the header is complete (with `rest`: the bytes that followed
it in the same reads, e.g. a TLS ClientHello on port 465, which the caller must process
next), or raises `ProxyError(reason)`. It never reads more than `MAX_V1` (v1) or
`16 + MAX_V2_BODY` (v2) bytes looking for a header, and it fails as soon as the first bytes
can no longer begin one (no waiting for a timeout on an SMTP client talking directly).

Strictness (section numbers of the spec):
- v1 (2.1): "PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF, at most 107
  bytes, single spaces, addresses of the announced family in canonical text (no IPv4
  leading zeros), ports 0..65535 in decimal without leading zeros. "PROXY UNKNOWN ..." is
  accepted and means "use the connection's own addresses" (the proxy's health checks).
- v2 (2.2): the 12-byte signature, version 2, command LOCAL (health check: the connection's
  own addresses) or PROXY; family AF_INET/AF_INET6 with STREAM transport; AF_UNSPEC means
  the connection's own addresses; AF_UNIX and DGRAM are refused (we relay TCP only). The
  length must cover the address block; TLVs after it are skipped (2.2.x: a receiver may
  ignore them), but the whole header is bounded.
Failure policy: anything else is a ProxyError; the listener closes the connection and
logs the reason. The header is only honoured from `[relay] proxy_trusted` peers.

`read_header(sock, timeout)` is the thin I/O edge for the accept path: it takes exactly the
header's bytes off a freshly accepted socket (peeking first), so whatever follows (a TLS
ClientHello on port 465) stays in the kernel for the TLS layer that reads next.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1 = 107  # spec 2.1: the longest v1 line, CRLF included
MAX_V2_BODY = 4096  # our bound on address block + TLVs (HAProxy sends far less)


class ProxyError(Exception):
    """A missing or malformed PROXY header; the message says which (for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    # The client's address and port as the proxy saw them; None for LOCAL / UNKNOWN /
    # AF_UNSPEC (then the connection's own addresses apply).
    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    rest: bytes = b""  # input that followed the header

    @property
    def local(self) -> bool:
        return self.source is None


def _ip(text: str, version: int) -> str:
    # An IPv6 zone (`fe80::1%eth0`, which `ipaddress` accepts since Python 3.9) is no
    # address a proxy reports (inet_ntop writes none): refused, so no zoned spelling of an
    # address (`::1%x` is in ::1/128) reaches the trusted-network check, limits and logs.
    if "%" in text:
        raise ProxyError(f"bad address {text[:50]!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad address {text[:50]!r}") from None
    if addr.version != version:
        raise ProxyError(f"address {text!r} is not IPv{version}")
    return _norm(addr)


def _norm(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4 client seen through an IPv6 socket of the proxy: one spelling per client.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") \
            or len(text) > 5 or int(text) > 65535:
        raise ProxyError(f"bad port {text[:10]!r}")
    return int(text)


def _parse_v1(line: bytes) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """`line` without CRLF."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None, None  # spec 2.1: the rest of the line is to be ignored
    if len(parts) != 6:
        raise ProxyError("v1 header has not 6 fields")
    _, proto, src, dst, sport, dport = parts
    if proto not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 protocol {proto[:10]!r} unsupported")
    version = 4 if proto == "TCP4" else 6
    return (_ip(src, version), _port(sport)), (_ip(dst, version), _port(dport))


def _parse_v2(head: bytes, body: bytes
              ) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    ver_cmd, fam = head[12], head[13]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2 version {ver_cmd >> 4} unsupported")
    cmd = ver_cmd & 0x0F
    if cmd == 0x0:  # LOCAL: the proxy's own connection (health check)
        return None, None
    if cmd != 0x1:
        raise ProxyError(f"v2 command {cmd} unknown")
    family, transport = fam >> 4, fam & 0x0F
    if family == 0x0:  # AF_UNSPEC: unknown origin, use the connection's addresses
        return None, None
    if transport != 0x1:
        raise ProxyError("v2 transport is not STREAM")
    if family == 0x1:
        if len(body) < 12:
            raise ProxyError("v2 address block too short for IPv4")
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[0:4])
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 0x2:
        if len(body) < 36:
            raise ProxyError("v2 address block too short for IPv6")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    elif family == 0x3:
        raise ProxyError("v2 AF_UNIX addresses unsupported")
    else:
        raise ProxyError(f"v2 address family {family} unknown")
    return (_norm(src), sport), (_norm(dst), dport)


class ProxyParser:
    """Collects input until one PROXY header (v1 or v2) is complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self.done:
            raise ProxyError("header already parsed")
        self._buf += data
        total = header_length(bytes(self._buf))
        if total is None or len(self._buf) < total:
            return None
        head = bytes(self._buf[:total])
        if head[0:1] == b"P":
            src, dst = _parse_v1(head[:-2])
            return self._finish(1, src, dst, total)
        src, dst = _parse_v2(head[:16], head[16:])
        return self._finish(2, src, dst, total)

    def _finish(self, version: int, src: tuple[str, int] | None,
                dst: tuple[str, int] | None, used: int) -> ProxyHeader:
        self.done = True
        rest = bytes(self._buf[used:])
        self._buf.clear()
        return ProxyHeader(version, src, dst, rest)


class Networks:
    """`[relay] proxy_trusted`: is this peer address one of the load balancers?"""

    def __init__(self, cidrs: tuple[str, ...] | list[str]) -> None:
        self.nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def __contains__(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in n for n in self.nets if n.version == addr.version)


def header_length(buf: bytes) -> int | None:
    """The length of the header `buf` begins with, or None if more bytes are needed to
    know; ProxyError if `buf` cannot begin a header. Any byte before that length belongs to
    the header, so a reader may consume `min(len(buf), header_length)` without ever taking
    a byte of what follows."""
    n = len(buf)
    if not n:
        return None
    if buf[0:1] == b"P":
        if buf[:min(n, 6)] != V1_PREFIX[:min(n, 6)]:
            raise ProxyError("no PROXY header")
        end = buf.find(b"\r\n", 0, MAX_V1)
        if end >= 0:
            return end + 2
        if n >= MAX_V1 or b"\n" in buf:
            raise ProxyError("v1 header without CRLF within 107 bytes")
        return None
    if buf[:min(n, 12)] != V2_SIGNATURE[:min(n, 12)]:
        raise ProxyError("no PROXY header")
    if n < 16:
        return None
    length: int = struct.unpack("!H", buf[14:16])[0]
    if length > MAX_V2_BODY:
        raise ProxyError(f"v2 header of {length} bytes is too long")
    return 16 + length


class ProxyClosed(ProxyError):
    """The peer closed before sending anything (a plain TCP health check)."""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def header_if_complete(sock: socket.socket) -> ProxyHeader | None:
    """The PROXY header on the non-blocking `sock` if all of it has arrived: taken off
    the socket, nothing past it. None, and nothing taken, if it has not (read_header
    waits for the rest). Raises ProxyError and ProxyClosed as read_header does. A
    balancer sends its header at once, so at accept it is usually there whole: no task,
    no wait, and no place among the reads in flight a flood could fill."""
    try:
        peek = sock.recv(16 + MAX_V2_BODY, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        if e.errno == errno.ECONNRESET:  # a health check's RST
            raise ProxyClosed("reset before sending a PROXY header") from None
        raise ProxyError(f"read error before the PROXY header: {e.strerror}") from None
    if not peek:
        raise ProxyClosed("closed before sending a PROXY header")
    total = header_length(peek)
    if total is None or len(peek) < total:
        return None
    header = ProxyParser().feed(sock.recv(total))  # peeked: all there, and no more
    assert header is not None and not header.rest
    return header


async def read_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Read one PROXY header off the non-blocking socket `sock` (nothing past it).

    Raises ProxyError (malformed, or closed part-way), ProxyClosed (closed before the
    first byte), TimeoutError (nothing complete within `timeout`)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                peek = sock.recv(16 + MAX_V2_BODY, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(sock.fileno(), _wake, fut)
                try:
                    await fut
                finally:
                    loop.remove_reader(sock.fileno())
                continue
            except OSError as e:
                if not got and e.errno == errno.ECONNRESET:  # a health check's RST
                    raise ProxyClosed("reset before sending a PROXY header") from None
                raise ProxyError(f"read error before the PROXY header: {e.strerror}") \
                    from None
            if not peek:
                if not got:
                    raise ProxyClosed("closed before sending a PROXY header")
                raise ProxyError("closed in the middle of the PROXY header")
            total = header_length(bytes(got) + peek)
            take = len(peek) if total is None else min(len(peek), total - len(got))
            got += sock.recv(take)  # peeked: there, and no more than the header
            if total is not None and len(got) >= total:
                header = ProxyParser().feed(bytes(got))
                assert header is not None and not header.rest
                return header


def build_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A v1 header (tests, tools)."""
    fam = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")


def build_v2(src: tuple[str, int] | None, dst: tuple[str, int] | None = None,
             tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY over TCP for (src, dst), LOCAL when src is None (tests, tools)."""
    if src is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    assert dst is not None
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1]) + tlvs
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body
