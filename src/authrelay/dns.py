"""DNS facade over dnspython's asyncio resolver: MX, A/AAAA, PTR, DNSBL lookups.

Owns: which nameservers are asked (`[delivery] nameservers`, "host:port" so tests can run a
DNS server on loopback; empty: the system's resolver from /etc/resolv.conf), the overall
deadline per lookup, and the mapping of DNS outcomes onto three exceptions every caller
understands:

- `DnsPermanent` -- NXDOMAIN (RFC 1035 RCODE 3): the name does not exist. Callers treat it
  as permanent (RFC 5321 5.1: a domain without address is an error). Its `DnsBadName`:
  the name cannot be asked at all (a label too long, a U-label IDNA refuses).
- `DnsNoData`    -- the name exists but has no record of the asked type (RFC 2308 NODATA).
  Distinct from NXDOMAIN because "no MX" means implicit MX (RFC 5321 5.1), not failure.
- `DnsTemporary` -- SERVFAIL, REFUSED, timeouts, unreachable servers: try again later.

With `dnssec=True` every query asks for the AD bit (RFC 6840 5.7) and the `*_ad` methods
say whether the answer was DNSSEC-validated. Only a validating resolver on this host or on a
trusted path may be named so (RFC 7672 1.3, `[delivery] dnssec`): the AD bit is believed
as it arrives, never checked here. A bogus answer is SERVFAIL from such a resolver, hence
`DnsTemporary`.

Names are always looked up absolute (a trailing dot is added; no search list), so a
recipient domain "example" never turns into "example.corp.local".

An answer to an MX, A, AAAA or TLSA query larger than MAX_ANSWER is refused before it is
parsed (that server's answer is unusable: the next one is asked, else `DnsTemporary`
saying so): dnspython parses on the event loop, and a hostile zone's 64 KiB answer took
it ~0.5 s, stalling every other delivery once per lookup wave. Only a reply to the
question asked is read (`_answers`: another name's or type's records are never ours).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename

log = logging.getLogger(__name__)

# Bytes of one answer read for the delivery lookups (RFC 1035 allows 65,535 over TCP). A
# real MX or address answer is a few hundred bytes, a TLSA one with whole certificates a
# few KiB; 8 KiB of records parse in ~60 ms where 64 KiB took ~0.5 s of the loop.
MAX_ANSWER = 8 * 1024
_BOUNDED = frozenset({dns.rdatatype.MX, dns.rdatatype.A, dns.rdatatype.AAAA,
                      dns.rdatatype.TLSA})


class AnswerTooBig(dns.exception.FormError):
    """An answer over MAX_ANSWER, refused unparsed (dnspython drops that server)."""

    def __init__(self, size: int) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            f"a DNS answer of {size} bytes (at most {MAX_ANSWER})")


class _BoundedNameserver(dns.nameserver.Do53Nameserver):
    """A Do53 server whose answers to MX, A, AAAA and TLSA queries are read here (UDP,
    then TCP when truncated) and refused over MAX_ANSWER before dnspython parses them;
    other queries (PTR, TXT for DNSBLs and MTA-STS) as dnspython sends them."""

    async def async_query(self, request: dns.message.QueryMessage, timeout: float,
                          source: str | None, source_port: int, max_size: bool,
                          backend: Any,  # dns.asyncbackend.Backend (no re-export for mypy)
                          one_rr_per_rrset: bool = False,
                          ignore_trailing: bool = False) -> dns.message.Message:
        if not request.question or request.question[0].rdtype not in _BOUNDED:
            return await super().async_query(request, timeout, source, source_port,
                                             max_size, backend, one_rr_per_rrset,
                                             ignore_trailing)
        try:
            async with asyncio.timeout(timeout):
                wire = await _exchange(request, self.address, self.port)
        except TimeoutError:
            raise dns.exception.Timeout(  # type: ignore[no-untyped-call]
                timeout=timeout) from None
        return dns.message.from_wire(wire, one_rr_per_rrset=one_rr_per_rrset,
                                     ignore_trailing=ignore_trailing)


class DnsError(Exception):
    """Base of every DNS outcome other than an answer."""


class DnsPermanent(DnsError):
    """NXDOMAIN: the name does not exist."""


class DnsBadName(DnsPermanent):
    """Not a domain name any lookup can find (a label over 63 octets, an
    internationalized label IDNA refuses): nothing was asked."""


class DnsNoData(DnsError):
    """The name exists but has no record of the requested type."""


class DnsTemporary(DnsError):
    """SERVFAIL, timeout or no reachable nameserver: retry later."""


@dataclass(frozen=True)
class TlsaAnswer:
    """`Resolver.tlsa_answer`: the well-formed records, the AD bit, and how many records
    of the answer could not be read (RFC 6698 2.1 RDATA dnspython refuses)."""

    records: list[tuple[int, int, int, bytes]]
    secure: bool
    malformed: int = 0


def _parse_nameserver(spec: str) -> tuple[str, int]:
    """'127.0.0.1:5353', '[::1]:53' or a bare address (port 53)."""
    s = spec.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
        return host, port
    if s.count(":") == 1:
        host, _, port_text = s.partition(":")
        return host, int(port_text)
    return s, 53  # bare IPv4 or bare IPv6 without port


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def ascii_name(domain: str) -> str:
    """`domain` as the lookups here ask for it: lower case, no trailing dot, and an
    internationalized name as its A-label (dnspython's IDNA codec, the one `_absolute`
    uses), so "bücher.example" and "xn--bcher-kva.example" are one destination for the
    outbound TLS policy too. A leading dot (a policy map's "any subdomain") is kept; a
    name no codec accepts is returned lower-cased (no lookup can succeed for it)."""
    name = domain.rstrip(".").lower()
    if name.isascii():
        return name
    dot = "." if name.startswith(".") else ""
    try:
        ace = dns.name.from_text(name.removeprefix(".") + ".").to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return name
    return dot + ace.lower()


class Resolver:
    """Async lookups with one overall deadline (`timeout` seconds) per query."""

    def __init__(self, nameservers: list[str] | tuple[str, ...] = (),
                 timeout: float = 10.0, *, dnssec: bool = False,
                 resolv_conf: str = "/etc/resolv.conf") -> None:
        """`resolv_conf`: the file read when `nameservers` is empty."""
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [
                _BoundedNameserver(h, p)
                for h, p in (_parse_nameserver(ns) for ns in nameservers)
            ]
        else:
            try:
                r = dns.asyncresolver.Resolver(filename=resolv_conf)
            except dns.resolver.NoResolverConfiguration:
                # No resolv.conf (minimal container): a local resolver is the only guess;
                # lookups then fail as temporary, so mail waits instead of bouncing.
                log.warning("no system resolver configuration; using 127.0.0.1:53")
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = ["127.0.0.1"]
            # resolv.conf's addresses, on its port: answers bounded as above
            r.nameservers = [_BoundedNameserver(ns, int(r.port)) if isinstance(ns, str)
                             else ns for ns in r.nameservers]
        r.lifetime = timeout
        # Per-try timeout: leave room for a retry (and TCP fallback on truncation).
        r.timeout = max(0.5, timeout / 3)
        if dnssec:
            r.flags = dns.flags.RD | dns.flags.AD
            r.use_edns(0, 0, 1232)  # TLSA with full certificates outgrow 512 bytes
        self.dnssec = dnssec
        self._r = r
        # Lookups under way, by (name, type): see _query.
        self._inflight: dict[tuple[str, str], asyncio.Task[dns.resolver.Answer]] = {}
        self.timeout = timeout
        # Whom `tlsa_answer` asks itself (it reads the raw reply).
        # dnspython keeps /etc/resolv.conf's entries as address strings (port `r.port`).
        self._servers = [(ns, int(r.port)) if isinstance(ns, str) else (ns.address, ns.port)
                         for ns in r.nameservers
                         if isinstance(ns, str | dns.nameserver.Do53Nameserver)]

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """One lookup; callers asking the same question while it is under way share it
        (its answer or its error): twenty deliveries to one domain started together cost
        one MX query and one parse, not twenty (a hostile 64 KiB answer takes dnspython
        ~0.5 s of the event loop to read). Nothing is kept once it is answered."""
        loop = asyncio.get_running_loop()
        key = (name, rdtype)
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._ask(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        # shield: a caller cancelled (its delivery given up) leaves it to the others
        return await asyncio.shield(task)

    def _landed(self, key: tuple[str, str], task: asyncio.Task[dns.resolver.Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved (asyncio warns of an error no caller awaited)

    async def _ask(self, name: str, rdtype: str) -> dns.resolver.Answer:
        try:
            return await self._r.resolve(_absolute(name), rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise DnsPermanent(f"{name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise DnsNoData(f"{name}: no {rdtype} record") from None
        except dns.resolver.NoNameservers as e:
            # Every server answered SERVFAIL/REFUSED or was unusable.
            why = _unusable([err[3] for err in e.kwargs.get("errors", [])])
            raise DnsTemporary(f"{name}/{rdtype}: {why}") from None
        except dns.exception.Timeout:
            raise DnsTemporary(f"{name}/{rdtype}: DNS lookup timed out") from None
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
                dns.name.BadEscape, dns.name.IDNAException) as e:
            # A syntactically impossible name can never resolve (a U-label IDNA refuses,
            # "☃.test", too: no DNS name stands for it).
            raise DnsBadName(f"{name}: invalid domain name ({e})") from None
        except dns.exception.DNSException as e:
            raise DnsTemporary(f"{name}/{rdtype}: DNS error: {e}") from None
        except OSError as e:  # network unreachable etc.
            raise DnsTemporary(f"{name}/{rdtype}: DNS error: {e.strerror or e}") from None

    def _ad(self, ans: dns.resolver.Answer) -> bool:
        return self.dnssec and bool(ans.response.flags & dns.flags.AD)

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX records as (preference, host) with the trailing dot removed (host "" = root,
        as in a null MX). Raises DnsPermanent / DnsNoData / DnsTemporary."""
        return (await self.mx_ad(domain))[0]

    async def mx_ad(self, domain: str) -> tuple[list[tuple[int, str]], bool]:
        """mx() and whether the answer was DNSSEC-validated (always False unless dnssec)."""
        ans = await self._query(domain, "MX")
        out: list[tuple[int, str]] = []
        for rr in ans:
            host = rr.exchange.to_text(omit_final_dot=True)
            out.append((int(rr.preference), "" if host in ("", "@", ".") else host.lower()))
        return out, self._ad(ans)

    async def tlsa(self, name: str) -> tuple[list[tuple[int, int, int, bytes]], bool]:
        """TLSA records (usage, selector, matching type, data) of `name` (RFC 6698 2.1)
        and whether they were DNSSEC-validated. Raises DnsPermanent / DnsNoData /
        DnsTemporary (a bogus answer is SERVFAIL from a validating resolver)."""
        a = await self.tlsa_answer(name)
        return a.records, a.secure

    async def tlsa_answer(self, name: str) -> TlsaAnswer:
        """tlsa() and the number of records that could not be read. dnspython's parser
        refuses a whole message for one malformed record (a `3 1 1` digest not 32 bytes,
        RDATA under 3 octets), and its resolver then ignores the reply and times out;
        RFC 7672 2.2 / RFC 6698 want such a record ignored as unusable. So the query is
        sent here (UDP, TCP when truncated; each nameserver in turn, a few tries, within
        `timeout`) and the reply read with `from_wire(continue_on_error=True)`: the
        well-formed records kept, the bad ones counted, CNAME chains followed
        (`resolve_chaining`). Raises as tlsa(); an answer whose records are all malformed
        is not NODATA: it returns `records=[]`, `malformed>0`."""
        q = dns.message.make_query(_absolute(name), dns.rdatatype.TLSA, use_edns=0,
                                   payload=1232)
        if self.dnssec:
            q.flags |= dns.flags.AD  # RFC 6840 5.7: ask for the AD bit
        last: DnsError = DnsTemporary(f"{name}/TLSA: no nameserver to ask")
        servers = self._servers
        if not servers:  # only DNS-over-HTTPS/TLS servers configured: nothing to ask here
            raise last
        per_try = float(self._r.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                for attempt in range(max(3, len(servers))):
                    host, port = servers[attempt % len(servers)]
                    try:
                        async with asyncio.timeout(per_try):
                            wire = await _exchange(q, host, port)
                        m = dns.message.from_wire(wire, continue_on_error=True)
                    except TimeoutError:
                        last = DnsTemporary(f"{name}/TLSA: DNS lookup timed out")
                        continue
                    except (OSError, EOFError, asyncio.IncompleteReadError,
                            dns.exception.DNSException) as e:
                        last = DnsTemporary(f"{name}/TLSA: DNS error: "
                                            f"{e or type(e).__name__}")
                        continue
                    answer = self._tlsa_reply(name, q, m)
                    if isinstance(answer, TlsaAnswer):
                        return answer
                    last = answer
        except TimeoutError:
            raise DnsTemporary(f"{name}/TLSA: DNS lookup timed out") from None
        raise last

    def _tlsa_reply(self, name: str, q: dns.message.Message, m: dns.message.Message) -> \
            TlsaAnswer | DnsTemporary:
        """The reply `m` to `q` read; a DnsTemporary to try the next server with.
        Raises DnsPermanent (NXDOMAIN) / DnsNoData."""
        if not q.is_response(m) or not isinstance(m, dns.message.QueryMessage):
            return DnsTemporary(f"{name}/TLSA: unrelated DNS answer")
        rcode = m.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise DnsPermanent(f"{name}: no such domain (NXDOMAIN)")
        if rcode != dns.rcode.NOERROR:
            return DnsTemporary(f"{name}/TLSA: DNS server failure "
                                f"({dns.rcode.to_text(rcode)})")
        try:
            rrset = m.resolve_chaining().answer
        except dns.exception.DNSException as e:
            return DnsTemporary(f"{name}/TLSA: DNS error: {e}")
        records = [(int(rr.usage), int(rr.selector), int(rr.mtype), bytes(rr.cert))
                   for rr in rrset or ()]
        bad = len(m.errors)
        if not records and not bad:
            raise DnsNoData(f"{name}: no TLSA record")
        if bad:
            log.info("%s/TLSA: %d malformed record(s) ignored", name, bad)
        return TlsaAnswer(records, self.dnssec and bool(m.flags & dns.flags.AD), bad)

    async def addresses(self, host: str) -> list[str]:
        """AAAA then A addresses of `host`. Both are asked at once; an answer for either
        family wins over a temporary failure of the other. Raises DnsPermanent when the
        name does not exist, DnsNoData when it has neither record, DnsTemporary else."""
        return (await self.addresses_ad(host))[0]

    async def addresses_ad(self, host: str) -> tuple[list[str], bool]:
        """addresses() and whether every answer that had records was DNSSEC-validated."""
        addrs, secure, _ = await self.addresses_cname(host)
        return addrs, secure

    async def addresses_cname(self, host: str) -> tuple[list[str], bool, str]:
        """addresses_ad() and the CNAME-expanded name of `host` (lower case, no trailing
        dot; `host` itself when no CNAME was followed), from the first answer that had
        records (RFC 7672 2.2.2: TLSA records are looked for there first)."""
        res = await asyncio.gather(self._query(host, "AAAA"), self._query(host, "A"),
                                   return_exceptions=True)
        out: list[str] = []
        errors: list[BaseException] = []
        secure = True
        canonical = ""
        for r in res:
            if isinstance(r, BaseException):
                if not isinstance(r, DnsError):
                    raise r
                errors.append(r)
            else:
                out.extend(rr.address for rr in r)
                secure = secure and self._ad(r)
                canonical = canonical or r.canonical_name.to_text(omit_final_dot=True).lower()
        if out:
            return out, secure, canonical or host.rstrip(".").lower()
        if any(isinstance(e, DnsTemporary) for e in errors):
            raise next(e for e in errors if isinstance(e, DnsTemporary))
        if any(isinstance(e, DnsPermanent) for e in errors):
            raise DnsPermanent(f"{host}: no such domain (NXDOMAIN)")
        raise DnsNoData(f"{host}: no AAAA or A record")

    async def ptr(self, ip: str) -> str | None:
        """The first PTR name of `ip` (no trailing dot), None when there is none.
        Raises DnsTemporary on SERVFAIL/timeout."""
        try:
            rev = dns.reversename.from_address(str(ipaddress.ip_address(ip)))
        except ValueError:
            return None
        try:
            ans = await self._query(rev.to_text(), "PTR")
        except (DnsPermanent, DnsNoData):
            return None
        for rr in ans:
            name: str = rr.target.to_text(omit_final_dot=True)
            return name
        return None

    async def txt(self, name: str) -> list[str]:
        """Every TXT record of `name`, each one's character-strings joined (RFC 7208 3.3,
        RFC 6376 3.6.2.2), decoded as UTF-8 (undecodable bytes replaced). Raises
        DnsPermanent / DnsNoData / DnsTemporary. (Used by `authrelay doctor`.)"""
        ans = await self._query(name, "TXT")
        return [b"".join(rr.strings).decode("utf-8", "replace") for rr in ans]

    async def a_exists(self, name: str) -> bool:
        """DNSBL-style test: does `name` have an A record? Raises DnsTemporary on failure."""
        try:
            ans = await self._query(name, "A")
        except (DnsPermanent, DnsNoData):
            return False
        return len(ans) > 0


def _unusable(errors: list[Any]) -> str:
    """Why no server's answer could be used, from dnspython's NoNameservers errors (each an
    rcode's text, or what reading that server's reply raised): the refusals of ours first,
    then an rcode (SERVFAIL, REFUSED...), then the first error."""
    for err in errors:
        if isinstance(err, AnswerTooBig):
            return f"DNS answer refused: larger than {MAX_ANSWER} bytes"
        if isinstance(err, dns.query.BadResponse):
            return "DNS answer refused: it answers another question"
        if isinstance(err, dns.message.ChainTooLong):
            return (f"DNS answer refused: a CNAME chain of more than {dns.message.MAX_CHAIN}"
                    " names, or a loop")
    codes = [err for err in errors if isinstance(err, str)]
    if codes or not errors:
        return f"DNS server failure ({codes[0] if codes else 'SERVFAIL'})"
    return f"DNS error: {errors[0] or type(errors[0]).__name__}"


def _answers(q: dns.message.Message, reply: bytes) -> bool:
    """Whether `reply` is a response to `q` (its id, QR, opcode and question: dnspython's
    `Message.is_response`), read up to its question section only (whatever its size)."""
    try:
        m = dns.message.from_wire(reply, question_only=True)
    except dns.exception.DNSException:
        return False
    return q.is_response(m)


def _truncated(query: bytes, reply: bytes) -> bool:
    """Whether `reply` is a truncated response (QR, TC) with the id of `query`."""
    flags = int.from_bytes(reply[2:4], "big")
    return len(reply) >= 12 and reply[:2] == query[:2] and \
        flags & (dns.flags.QR | dns.flags.TC) == dns.flags.QR | dns.flags.TC


async def _exchange(q: dns.message.Message, host: str, port: int) -> bytes:
    """One query to one server, UDP then TCP when truncated (RFC 7766); the raw reply.
    A datagram that is no response to `q` (another id, or another question: a broken
    server's, a spoofer's) is ignored, as dnspython's own exchange does: the lookup's
    timeout bounds the wait. A truncated one with the query's id need not repeat the
    question (dnslib's does not): nothing of it is used, the TCP reply is checked.
    Raises AnswerTooBig for one over MAX_ANSWER (over TCP, before it is read);
    dns.query.BadResponse for a TCP reply that is no response."""
    wire = q.to_wire()
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect((host, port))  # connected: datagrams from other sources are dropped
        await loop.sock_sendall(s, wire)
        while True:
            reply = await loop.sock_recv(s, 65535)
            if reply[:2] == wire[:2] and (_answers(q, reply) or _truncated(wire, reply)):
                break  # (the id first: another is dropped unparsed, as before)
    if len(reply) > MAX_ANSWER:
        raise AnswerTooBig(len(reply))
    if not int.from_bytes(reply[2:4], "big") & dns.flags.TC:
        return reply
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        if size > MAX_ANSWER:
            raise AnswerTooBig(size)
        reply = await reader.readexactly(size)
    finally:
        writer.close()
    if not _answers(q, reply):
        raise dns.query.BadResponse  # a FormError: dnspython drops that server
    return reply
