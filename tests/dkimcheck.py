"""Independent DKIM verification for tests: dkimpy's verifier and OpenDKIM's
(`opendkim -t`) reading the public keys from a DNS server (the loopback FakeDNSServer),
not from our key store."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import dkim
import dns.nameserver
import dns.resolver
from support import ci


def txt_lookup(nameserver: str):  # noqa: ANN201
    """A dkimpy `dnsfunc` asking `nameserver` ("127.0.0.1:PORT")."""
    host, _, port = nameserver.rpartition(":")
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(host, int(port))]
    r.lifetime = 5

    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            ans = r.resolve(qname, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        for rr in ans:
            return b"".join(rr.strings)
        return None

    return get_txt


def verify_all(message: bytes, nameserver: str) -> list[tuple[bytes, bytes, bytes, bool]]:
    """(d, s, a, ok) for every DKIM-Signature of `message`, top first."""
    get_txt = txt_lookup(nameserver)
    d = dkim.DKIM(message, linesep=b"\r\n")
    n = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    out = []
    for i in range(n):
        v = dkim.DKIM(message, linesep=b"\r\n")
        try:
            ok = v.verify(idx=i, dnsfunc=get_txt)
        except dkim.DKIMException:  # e.g. body hash mismatch: a failed verification
            ok = False
        sig = v.signature_fields
        out.append((sig.get(b"d", b""), sig.get(b"s", b""), sig.get(b"a", b""), bool(ok)))
    return out


def dkim_zones(keys) -> dict:  # noqa: ANN001
    """FakeDNSServer zones publishing the public half of each DkimKey."""
    return {k.record_name: {"TXT": [k.txt_strings()]} for k in keys}


def opendkim_results(message: bytes, nameserver: str) -> list[tuple[bytes, bytes, bytes, bool]]:
    """(d, s, a, ok) for every DKIM-Signature of `message` as OpenDKIM 2.11's verifier
    (`opendkim -t`, the C library receivers run) reads it, sorted; keys from `nameserver`
    through libunbound (OpenDKIM's `ResolverConfiguration`)."""
    opendkim = ci.require_tool("opendkim", "opendkim")
    host, _, port = nameserver.rpartition(":")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "unbound.conf").write_text(
            # unbound answers the special-use test. (RFC 6761) itself unless told not to
            'server:\n  do-not-query-localhost: no\n  local-zone: "test." nodefault\n'
            f'forward-zone:\n  name: "."\n  forward-addr: {host}@{port}\n')
        (tmp / "opendkim.conf").write_text(
            f"ResolverConfiguration {tmp / 'unbound.conf'}\nMode v\n")
        (tmp / "msg").write_bytes(message.replace(b"\r\n", b"\n"))
        r = subprocess.run([opendkim, "-x", str(tmp / "opendkim.conf"), "-vvv", "-t",
                            str(tmp / "msg")], capture_output=True, timeout=60)
    out = r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, out
    found = []
    # one Authentication-Results entry per line: "dkim=pass (2048-bit key; ...) header.d=..."
    for m in re.finditer(r"\bdkim=(\w+).*?header\.d=(\S+).*?header\.a=(\S+)"
                         r".*?header\.s=([^\s;]+)", out):
        result, dom, alg, sel = m.groups()
        found.append((dom.encode(), sel.encode(), alg.encode(), result == "pass"))
    return sorted(found)
