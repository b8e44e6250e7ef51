"""PROXY protocol v1/v2 parser (smtpd/proxy.py): spec examples, strictness, any chunking."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authrelay.smtpd.proxy import (
    MAX_V1,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    build_v1,
    build_v2,
)


def parse(data: bytes) -> ProxyHeader | None:
    return ProxyParser().feed(data)


def test_v1_tcp4_and_rest() -> None:
    h = parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 587\r\nEHLO x\r\n")
    assert h == ProxyHeader(1, ("192.0.2.7", 56324), ("198.51.100.1", 587), b"EHLO x\r\n")
    assert not h.local


def test_v1_tcp6_and_mapped() -> None:
    h = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    assert h is not None and h.source == ("2001:db8::1", 1) and h.dest == ("2001:db8::2", 65535)
    h = parse(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1000 25\r\n")
    assert h is not None and h.source == ("192.0.2.9", 1000)


def test_v1_unknown_means_local() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        h = parse(line)
        assert h is not None and h.local and h.dest is None


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",         # 5 fields
    b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",          # double space
    b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",          # leading zero in IPv4
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",         # wrong family
    b"PROXY TCP6 192.0.2.7 2001:db8::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",          # leading zero in port
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",       # port out of range
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n",
    b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",             # bare LF
    b"PROXY TCP6 ::1%eth0 2001:db8::2 1 2\r\n",              # IPv6 zone
    b"PROXY TCP6 ::ffff:192.0.2.7%1 2001:db8::2 1 2\r\n",
    b"PROXY TCP6 2001:db8::1 fe80::2%25 1 2\r\n",
    b"PROXY TCP4 h\xc3\xa9 198.51.100.1 1 2\r\n",           # not ASCII
    b"PROXY TCP4 192.0.2.7 198.51.100.1 \xd9\xa1 2\r\n",    # Arabic-Indic digit
])
def test_v1_strict(bad: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(bad)


def test_v1_too_long_without_crlf() -> None:
    p = ProxyParser()
    assert p.feed(b"PROXY TCP6 " + b"1" * 50) is None
    with pytest.raises(ProxyError, match="107"):
        p.feed(b"1" * (MAX_V1 - 61))


def test_not_a_header_fails_early() -> None:
    # An SMTP client speaking first, a TLS ClientHello, an HTTP request: refused at once.
    for data in (b"EHLO x\r\n", b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.0\r\n", b"PROX!",
                 b"\r\n\r\n\x00\r\nQUIX"):
        with pytest.raises(ProxyError, match="no PROXY header"):
            parse(data)
    assert parse(b"PRO") is None  # could still be one
    assert parse(b"\r\n\r\n\x00") is None


def test_v2_inet_inet6_local_unspec() -> None:
    h = parse(build_v2(("192.0.2.7", 40000), ("198.51.100.1", 465)) + b"\x16\x03\x01")
    assert h == ProxyHeader(2, ("192.0.2.7", 40000), ("198.51.100.1", 465), b"\x16\x03\x01")
    h = parse(build_v2(("2001:db8::7", 1), ("2001:db8::1", 587)))
    assert h is not None and h.source == ("2001:db8::7", 1)
    h = parse(build_v2(None))
    assert h is not None and h.local and h.version == 2
    unspec = V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    h = parse(unspec)
    assert h is not None and h.local


def test_v2_tlvs_skipped() -> None:
    tlv = bytes([0x05]) + struct.pack("!H", 4) + b"uniq"  # PP2_TYPE_UNIQUE_ID
    h = parse(build_v2(("192.0.2.7", 1), ("192.0.2.1", 2), tlv) + b"rest")
    assert h is not None and h.source == ("192.0.2.7", 1) and h.rest == b"rest"


@pytest.mark.parametrize("bad,why", [
    (V2_SIGNATURE + bytes([0x11, 0x11]) + struct.pack("!H", 12) + bytes(12), "version"),
    (V2_SIGNATURE + bytes([0x22, 0x11]) + struct.pack("!H", 12) + bytes(12), "command"),
    (V2_SIGNATURE + bytes([0x21, 0x12]) + struct.pack("!H", 12) + bytes(12), "STREAM"),
    (V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 8) + bytes(8), "too short"),
    (V2_SIGNATURE + bytes([0x21, 0x21]) + struct.pack("!H", 12) + bytes(12), "too short"),
    (V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216), "AF_UNIX"),
    (V2_SIGNATURE + bytes([0x21, 0x41]) + struct.pack("!H", 0), "family"),
    (V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 60000), "too long"),
])
def test_v2_strict(bad: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        parse(bad)


def test_feed_after_done() -> None:
    p = ProxyParser()
    assert p.feed(build_v1(("192.0.2.1", 1), ("192.0.2.2", 2))) is not None
    with pytest.raises(ProxyError):
        p.feed(b"x")


@given(st.data())
def test_any_chunking_gives_the_same_header(data: st.DataObject) -> None:
    src = data.draw(st.ip_addresses(v=4).map(str))
    dst = data.draw(st.ip_addresses(v=4).map(str))
    v2 = data.draw(st.booleans())
    header = build_v2((src, 1234), (dst, 587)) if v2 else build_v1((src, 1234), (dst, 587))
    raw = header + data.draw(st.binary(max_size=40))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    p = ProxyParser()
    got = None
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    rest = b""
    for piece in pieces:
        if got is None:
            got = p.feed(piece)
        else:
            rest += piece
    assert got is not None
    assert got.source == (src, 1234) and got.dest == (dst, 587)
    assert got.rest + rest == raw[len(header):]


@given(st.binary(max_size=200))
def test_garbage_never_crashes(blob: bytes) -> None:
    p = ProxyParser()
    try:
        for i in range(0, len(blob), 7):
            if p.feed(blob[i:i + 7]) is not None:
                break
    except ProxyError:
        pass
    assert len(p._buf) <= 16 + 4096


@given(st.binary(max_size=120))
def test_v1_prefixed_garbage(blob: bytes) -> None:
    try:
        h = parse(b"PROXY " + blob)
    except ProxyError:
        return
    if h is not None and not h.local:
        assert h.source is not None and 0 <= h.source[1] <= 65535


# --------------------------------------------------------------------------- read_header

import asyncio  # noqa: E402
import socket  # noqa: E402

from authrelay.smtpd.proxy import ProxyClosed, read_header  # noqa: E402


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    return a, b


@pytest.mark.parametrize("v2", [False, True])
async def test_read_header_takes_exactly_the_header(v2: bool) -> None:
    header = (build_v2 if v2 else build_v1)(("192.0.2.7", 40000), ("192.0.2.1", 465))
    client, server = _pair()
    try:
        client.sendall(header + b"\x16\x03\x01CLIENTHELLO")  # one segment: header + TLS
        h = await read_header(server, 5)
        assert h.source == ("192.0.2.7", 40000) and h.rest == b""
        assert server.recv(100) == b"\x16\x03\x01CLIENTHELLO"  # left for the TLS layer
    finally:
        client.close()
        server.close()


async def test_read_header_in_dribbles() -> None:
    header = build_v1(("192.0.2.7", 40000), ("192.0.2.1", 587))
    client, server = _pair()
    try:
        task = asyncio.create_task(read_header(server, 5))
        for i in range(0, len(header), 5):
            client.sendall(header[i:i + 5])
            await asyncio.sleep(0.01)
        client.sendall(b"EHLO x\r\n")
        h = await task
        assert h.source == ("192.0.2.7", 40000)
        assert server.recv(100) == b"EHLO x\r\n"
    finally:
        client.close()
        server.close()


async def test_read_header_failures() -> None:
    client, server = _pair()
    client.close()
    with pytest.raises(ProxyClosed):
        await read_header(server, 5)  # a plain TCP health check: connect, close
    server.close()

    client, server = _pair()
    client.sendall(b"PROXY TCP4 192.0.2.7")
    client.close()
    with pytest.raises(ProxyError, match="middle"):
        await read_header(server, 5)
    server.close()

    client, server = _pair()
    client.sendall(b"EHLO x\r\n")
    with pytest.raises(ProxyError, match="no PROXY header"):
        await read_header(server, 5)
    client.close()
    server.close()

    client, server = _pair()
    client.sendall(b"PROXY TCP4 ")  # then silence
    with pytest.raises(TimeoutError):
        await read_header(server, 0.2)
    client.close()
    server.close()
