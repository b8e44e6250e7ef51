"""A minimal raw SMTP client for tests: exact bytes out, whole replies in, TLS on demand."""

from __future__ import annotations

import base64
import socket
import ssl


class Reply:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.code = int(lines[-1][:3])
        self.text = lines[-1][4:]

    def __repr__(self) -> str:
        return "\n".join(self.lines)


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
                 timeout: float = 15.0, source: str | None = None) -> None:
        # `source`: a loopback address (127.0.0.2...) to appear as another client; the
        # host itself (127.0.0.1, ::1) is exempt from per-IP connection limits.
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line: str) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return Reply(lines)

    def closed(self, timeout: float = 10.0) -> bool:
        """True when the server closes (after any pending bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def proxied(port: int, header: bytes, *, tls: ssl.SSLContext | None = None,
            source: str = "127.0.0.1", tls_same_segment: bool = False) -> RawClient:
    """A RawClient whose connection starts with `header` (a PROXY protocol header, as a
    load balancer sends it; then TLS if `tls`)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15,
                                    source_address=(source, 0))
    if tls is not None and tls_same_segment:
        # Header and ClientHello in one segment, as a balancer may send them.
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = tls.wrap_bio(inc, out)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass  # (the ClientHello is written: the server's answer is wanted)
        else:
            raise AssertionError("a handshake done without the server")
        sock.sendall(header + out.read())
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out.pending:
                    sock.sendall(out.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                inc.write(data)
        if out.pending:
            sock.sendall(out.read())
        return _BioClient(sock, obj, inc, out)
    if header:
        sock.sendall(header)
    c = RawClient.__new__(RawClient)
    c.buf = b""
    c.sock = tls.wrap_socket(sock) if tls is not None else sock
    return c


class _BioClient(RawClient):
    """RawClient over an SSLObject driven by hand (for the one-segment case)."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO,
                 out: ssl.MemoryBIO) -> None:
        self.raw, self.obj, self.inc, self.out = sock, obj, inc, out
        self.buf = b""
        self.sock = self  # type: ignore[assignment]

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self.raw.sendall(self.out.read())

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                data = self.raw.recv(65536)
                if not data:
                    return b""
                self.inc.write(data)

    def close(self) -> None:
        self.raw.close()
