"""What the outbound TLS policy costs per delivery: the policy lookup (cached and not)
and the certificate judgement per TLS connection.

    sudo .venv/bin/python bench/tlspolicy.py [N]      (root: the MTA-STS server binds :443)

Starts the test rig's parts (tests/fakes): a dnslib DNS server, an HTTPS MTA-STS policy
server on 127.0.19.1:443 with a trustme certificate, and BIND 9 + unbound with a signed
zone (tests/fakes/dnssecrig.py) for DANE. Each figure is the median wall time of one
`Planner.plan()` (what the courier does per delivery before connecting, after the MX
lookup) or of one certificate check, over N runs, plus process CPU per run. The MX
lookup itself is outside every figure except "dane" (its AD flags are part of the
decision), where it is given separately.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import trustme  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import (  # noqa: E402
    Encoding,
    PublicFormat,
)
from fakes.dnssecrig import DnssecRig  # noqa: E402
from fakes.dnsserver import FakeDNSServer  # noqa: E402
from fakes.policyserver import PolicyServer  # noqa: E402

from authrelay.config import from_dict  # noqa: E402
from authrelay.delivery import dane, mx, peercert, tlsplan  # noqa: E402
from authrelay.delivery.mtasts import HttpsStsSource  # noqa: E402
from authrelay.dns import Resolver  # noqa: E402

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.sts.test\r\nmax_age: 86400\r\n"


async def measure(n: int, fn: Callable[[], Awaitable[object]]) -> dict[str, float]:
    await fn()  # warm-up (imports, first connections)
    walls = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / n
    return {"median_ms": round(statistics.median(walls) * 1000, 3),
            "p90_ms": round(sorted(walls)[int(n * 0.9) - 1] * 1000, 3),
            "cpu_ms": round(cpu * 1000, 3)}


async def main(n: int) -> None:
    ca = trustme.CA()
    tmp = Path(tempfile.mkdtemp(prefix="tlspolicy-bench-"))
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    dns_srv = FakeDNSServer({
        "sts.test": {"MX": [(10, "mx1.sts.test")]}, "mx1.sts.test": {"A": ["127.0.0.2"]},
        "_mta-sts.sts.test": {"TXT": ["v=STSv1; id=1"]},
        "mta-sts.sts.test": {"A": ["127.0.19.1"]},
        "none.test": {"MX": [(10, "mx1.sts.test")]},
    }).start()
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mta-sts.sts.test").configure_cert(sctx)
    https = PolicyServer(sctx).start()
    https.policies["mta-sts.sts.test"] = POLICY
    leaf = ca.issue_cert("mx1.dane.test")
    leaf_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = leaf_cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    rig = DnssecRig(tmp / "dnssec", "dane.test", [
        "d IN MX 10 mx1", "mx1 IN A 127.0.0.2",
        f"_25._tcp.mx1 IN TLSA 3 1 1 {hashlib.sha256(spki).hexdigest()}"])
    (tmp / "dnssec").mkdir()
    rig.start()
    out: dict[str, object] = {}
    try:
        def cfg(state: Path, ns: str, **d: object) -> object:
            return from_dict({"hostname": "bench.test", "state_dir": str(state),
                              "delivery": {"nameservers": [ns], "tls_ca_file": str(ca_file),
                                           **d}})

        base = cfg(tmp / "s0", dns_srv.nameserver)
        r = Resolver([dns_srv.nameserver], 5)
        route = mx.Route([("mx1.sts.test", "127.0.0.2")])

        static = tlsplan.Planner(cfg(tmp / "s0", dns_srv.nameserver, tls_policy="verify"), r,
                                 None)
        out["verify (static, no lookup)"] = await measure(n, lambda: static.plan("sts.test",
                                                                                route))
        # dane level, dnssec off, the domain publishes nothing: one TXT query the first
        # time, then "no policy" from memory for 5 minutes.
        src = HttpsStsSource(base, r)
        p = tlsplan.Planner(base, r, src)
        out["no MTA-STS, cached"] = await measure(n, lambda: p.plan("none.test", route))

        async def none_uncached() -> object:
            return await tlsplan.Planner(base, r, HttpsStsSource(base, r)).plan("none.test",
                                                                                 route)
        out["no MTA-STS, uncached (TXT lookup)"] = await measure(n, none_uncached)

        src2 = HttpsStsSource(base, r)
        p2 = tlsplan.Planner(base, r, src2)
        out["MTA-STS, cached in memory"] = await measure(n, lambda: p2.plan("sts.test", route))

        async def sts_disk() -> object:  # a restart: the policy file, no fetch
            return await tlsplan.Planner(base, r, HttpsStsSource(base, r)).plan("sts.test",
                                                                                 route)
        out["MTA-STS, cached on disk (after restart)"] = await measure(n, sts_disk)

        counter = [0]

        async def sts_uncached() -> object:  # TXT + HTTPS fetch + fsync'd cache file
            counter[0] += 1
            c = cfg(tmp / f"u{counter[0]}", dns_srv.nameserver)
            return await tlsplan.Planner(c, r, HttpsStsSource(c, r)).plan("sts.test", route)
        out["MTA-STS, uncached (TXT + HTTPS fetch)"] = await measure(max(5, n // 10),
                                                                     sts_uncached)

        dcfg = cfg(tmp / "s1", rig.resolver, dnssec=True, port=25)
        dr = Resolver([rig.resolver], 5, dnssec=True)
        dp = tlsplan.Planner(dcfg, dr, None)
        out["MX lookup alone (unbound, DNSSEC)"] = await measure(
            n, lambda: mx.resolve_route(dr, "d.dane.test"))

        async def dane_plan() -> object:
            rt = await mx.resolve_route(dr, "d.dane.test")
            return await dp.plan("d.dane.test", rt)
        out["DANE: MX lookup + TLSA lookup + plan"] = await measure(n, dane_plan)

        # Per TLS connection: judging the certificate the server sent.
        chain = [leaf_cert.public_bytes(Encoding.DER)]
        store = peercert.CaStore(str(ca_file))

        async def pkix() -> object:
            return store.verify(chain, ("mx1.dane.test",))
        out["certificate check, PKIX (verify / MTA-STS)"] = await measure(n, pkix)
        system = peercert.CaStore("")
        t0 = time.perf_counter()
        system.store()
        out["system CA bundle load (once per courier)"] = {
            "median_ms": round((time.perf_counter() - t0) * 1000, 3)}

        async def untrusted() -> object:
            return system.verify(chain, ("mx1.dane.test",))
        out["certificate check, may level (system store)"] = await measure(n, untrusted)
        recs = ((3, 1, 1, hashlib.sha256(spki).digest()),)

        async def dane_ee() -> object:
            return dane.match(chain, recs, ("mx1.dane.test",))
        out["certificate check, DANE-EE"] = await measure(n, dane_ee)
    finally:
        rig.stop()
        https.stop()
        dns_srv.stop()
    print(json.dumps({"n": n, "results": out}, indent=1))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
