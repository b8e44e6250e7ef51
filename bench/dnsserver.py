#!/usr/bin/env python3
"""A loopback DNS server that answers at once, for the bench's MTA peers (chasquid, OpenSMTPD).

Owns: the answers the peers' per-message lookups get (chasquid: SPF TXT of the sender domain,
the MX and A of the next hop, MTA-STS TXT; OpenSMTPD: the client's reverse lookup), so the
bench measures the servers, not a resolver. Every name under `--domain` and every
in-addr.arpa name is answered from memory: MX -> `mx.<domain>`, A -> 127.0.0.1, anything else
NODATA; other names NXDOMAIN. Nothing is forwarded.

Contract: `dnsserver.py --address 127.0.53.53 --port 53 --domain example.test --pidfile F`
serves UDP and TCP until SIGTERM; the pid file is written once both sockets listen.
Failure policy: a query it cannot parse is dropped (dnslib); only loopback addresses.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading

from dnslib import MX, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import DNSServer


class Resolver:
    def __init__(self, domains: list[str]) -> None:
        self.domains = [d.rstrip(".").lower() for d in domains]

    def _ours(self, name: str) -> bool:
        return any(name == d or name.endswith("." + d) for d in self.domains)

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if qname.endswith(".in-addr.arpa") or qname.endswith(".ip6.arpa"):
            return reply  # NODATA: no PTR, answered at once
        if not self._ours(qname):
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if qtype == "MX" and not qname.startswith("mx."):
            reply.add_answer(RR(qname, QTYPE.MX, rdata=MX(f"mx.{qname}", 10), ttl=3600))
        elif qtype == "A":
            reply.add_answer(RR(qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=3600))
        return reply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.53.53")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--domain", action="append", required=True)
    ap.add_argument("--pidfile")
    a = ap.parse_args()
    if not ipaddress.ip_address(a.address).is_loopback:
        sys.exit("dnsserver.py: loopback addresses only")
    res = Resolver(a.domain)
    servers = [DNSServer(res, address=a.address, port=a.port, tcp=tcp) for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    if a.pidfile:
        with open(a.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    for s in servers:
        s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
