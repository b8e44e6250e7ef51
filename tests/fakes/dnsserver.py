"""A real DNS server for tests: dnslib on 127.0.0.1, one random port for UDP and TCP.

Zones are a plain dict, mutable while the server runs (a test can turn SERVFAIL into an
answer between two delivery attempts):

    zones = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": "SERVFAIL",      # every query for the name: SERVFAIL
        "slow.test": "TIMEOUT",         # never answered (the client times out)
        "dnsbl.test": {"A": ["127.0.0.2"], "TXT": ["listed"]},
        "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test"]},
    }

"TLSA" values are raw RDATA bytes (usage, selector, matching type, data: served as given,
malformed or not). `FakeDNSServer(ad=True)` sets the AD bit on every answer, as a
validating resolver does for a signed zone (the courier believes it with `dnssec = true`).
A name absent from the dict is NXDOMAIN; a present name without the asked type is NODATA
(NOERROR, empty answer); a name with a "CNAME" answers any other type with the CNAME and
the target's records (chains followed). Names are case-insensitive, trailing dots optional. Use
`server.nameserver` ("127.0.0.1:PORT") for `[delivery] nameservers`. `server.queries`
records every (name, type) asked, for tests that want to see what was looked up.
`udp_limit=N` truncates UDP answers over N bytes (TC set), as a server does past the
client's EDNS size: the client must ask again over TCP. `server.hold[name] = Event()`:
queries for `name` are answered once the event is set (at most 60 s later).
`server.misanswer[name] = ("other.test", "MX")`: a query for `name` is answered as if it
had asked that question (the question section too), as a broken or spoofing server does.
"""

from __future__ import annotations

import socketserver
import threading
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RD, RR, TXT, A, DNSError, DNSRecord
from dnslib.server import DNSHandler

_RDATA = {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME, "TXT": TXT}


def _norm(name: str) -> str:
    return str(name).rstrip(".").lower()


class _Resolver:
    def __init__(self, owner: FakeDNSServer) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        q = request.q
        qname, qtype = _norm(str(q.qname)), QTYPE[q.qtype]
        self.owner.queries.append((qname, qtype))
        other = self.owner.misanswer.get(qname)
        if other is not None:  # answer another question, as asked (same id)
            asked = request.header.id
            request = DNSRecord.question(other[0], other[1])
            request.header.id = asked
            q = request.q
            qname, qtype = _norm(str(q.qname)), QTYPE[q.qtype]
        gate = self.owner.hold.get(qname)
        if gate is not None:
            gate.wait(60)
        reply = request.reply()
        reply.header.ad = int(self.owner.ad)
        zone = self.owner.zones.get(qname)
        if zone is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if zone == "SERVFAIL":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if zone == "TIMEOUT":
            raise DNSError("test zone: drop the query")  # dnslib sends nothing
        owner = q.qname
        for _ in range(8):  # a CNAME is followed (as a recursive resolver does) for any
            # other type, its records then the target's in the answer
            target = zone.get("CNAME") if isinstance(zone, dict) and qtype != "CNAME" \
                else None
            if not target:
                break
            reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target[0]), ttl=60))
            owner, zone = target[0], self.owner.zones.get(_norm(target[0]))
            if not isinstance(zone, dict):
                return reply
        for value in zone.get(qtype, ()):
            if qtype == "TLSA":
                rdata = RD(value)
            elif qtype == "MX":
                pref, host = value
                rdata: Any = MX(host if host != "." else ".", pref)
            else:
                rdata = _RDATA[qtype](value)
            reply.add_answer(RR(owner, q.qtype, rdata=rdata, ttl=60))
        return reply


class _SilentLogger:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _UDP(socketserver.ThreadingMixIn, socketserver.UDPServer):
    allow_reuse_address = False
    daemon_threads = True


class _TCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def _handler(udp_limit: int) -> type[DNSHandler]:
    """dnslib's handler, truncating UDP answers past `udp_limit` (0: never)."""
    return type("LimitedHandler", (DNSHandler,), {"udplen": udp_limit}) if udp_limit \
        else DNSHandler


class FakeDNSServer:
    """Start with `start()`, stop with `stop()`; or use as a context manager."""

    def __init__(self, zones: dict[str, Any] | None = None, host: str = "127.0.0.1", *,
                 ad: bool = False, port: int = 0, udp_limit: int = 0) -> None:
        self.want_port = port  # 0: any free one
        self.udp_limit = udp_limit  # UDP answers longer than this: truncated, TC set
        self.ad = ad
        self.zones: dict[str, Any] = {}
        self.set_zones(zones or {})
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self.hold: dict[str, threading.Event] = {}  # name -> answered once it is set
        self.misanswer: dict[str, tuple[str, str]] = {}  # name -> the question answered
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    def set_zones(self, zones: dict[str, Any]) -> None:
        """Replace the zones (names normalised)."""
        self.zones.clear()
        self.zones.update({_norm(k): v for k, v in zones.items()})

    def update(self, zones: dict[str, Any]) -> None:
        self.zones.update({_norm(k): v for k, v in zones.items()})

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> FakeDNSServer:
        resolver = _Resolver(self)
        logger = _SilentLogger()
        for _ in range(50):  # the UDP port's TCP twin may be taken: pick another
            udp = _UDP((self.host, self.want_port), _handler(self.udp_limit))
            port = udp.server_address[1]
            try:
                tcp = _TCP((self.host, port), DNSHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free UDP+TCP port pair on loopback")
        for srv in (udp, tcp):
            srv.resolver = resolver  # type: ignore[attr-defined]
            srv.logger = logger  # type: ignore[attr-defined]
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True, name=f"fakedns-{port}")
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        self.port = port
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeDNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def query(server: FakeDNSServer, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    """Ask the fake directly (for the fixture's own tests)."""
    pkt = DNSRecord.question(name, qtype).send(server.host, server.port, tcp=tcp, timeout=2)
    return DNSRecord.parse(pkt)


__all__ = ["FakeDNSServer", "query"]
