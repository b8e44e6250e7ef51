"""A real DNSSEC rig for tests: BIND 9 serving a zone signed at test time, unbound
validating it with that zone's key as trust anchor.

    rig = DnssecRig(tmp_path, "dane.test", records, insecure={"plain.test": records2},
                    tamper=["_25._tcp.mx-bogus.dane.test."]).start()
    rig.resolver  # "127.0.0.1:PORT": unbound, for [delivery] nameservers (dnssec = true)
    rig.stop()

`records` are zone-file lines relative to the zone ("mx1 A 127.0.0.2", "@ MX 10 mx1").
The zone is signed with one ECDSA P-256 key (dnssec-keygen, dnssec-signzone -z); the
`insecure` zones are served unsigned (unbound has no anchor for them: answers without
AD). Each owner name in `tamper` gets the data of its TLSA record (or the preference
of its MX record) changed *after* signing, so unbound finds the signature wrong:
SERVFAIL, as for a forged answer (bogus).
Both daemons listen on 127.0.0.1 on free ports, run in the foreground as children of the
test, and are stopped by PID. A missing tool skips (fails under CI=true).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
from support import ci
from support.ports import free_udp_tcp_port


def need(tool: str) -> str:
    """`tool`'s path; fails under CI, skips elsewhere (support.ci)."""
    return ci.require_tool(tool, "bind9, bind9-utils, unbound")


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {out.stderr or out.stdout}")
    return out.stdout


def _zone_text(zone: str, records: list[str]) -> str:
    head = [f"$ORIGIN {zone}.", "$TTL 60",
            f"@ IN SOA ns.{zone}. admin.{zone}. 1 3600 600 86400 60",
            f"@ IN NS ns.{zone}.", "ns IN A 127.0.0.1"]
    return "\n".join(head + records) + "\n"


class DnssecRig:
    def __init__(self, workdir: Path, zone: str, records: list[str], *,
                 insecure: dict[str, list[str]] | None = None,
                 tamper: list[str] | None = None) -> None:
        self.dir = workdir
        self.zone = zone
        self.records = records
        self.insecure = insecure or {}
        self.tamper = tamper or []
        self.named_port = 0
        self.unbound_port = 0
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.unbound_port}"

    # ------------------------------------------------------------------ setup
    def _sign(self) -> Path:
        keygen, signer = need("dnssec-keygen"), need("dnssec-signzone")
        d = self.dir
        zfile = d / f"{self.zone}.zone"
        zfile.write_text(_zone_text(self.zone, self.records))
        key = _run(keygen, "-q", "-a", "ECDSAP256SHA256", "-f", "KSK", "-K", str(d),
                   self.zone, cwd=d).strip()
        _run(signer, "-q", "-S", "-z", "-K", str(d), "-O", "full", "-o", self.zone,
             "-f", str(d / f"{self.zone}.signed"), str(zfile), cwd=d)
        signed = d / f"{self.zone}.signed"
        text = signed.read_text()
        for owner in self.tamper:
            # The TLSA data zeroed, or an MX preference changed: the RRSIG no longer fits.
            tlsa = re.compile(rf"^({re.escape(owner)}\s+\d+\s+IN\s+TLSA\s+\d+\s+\d+\s+\d+\s+)"
                              r"([0-9A-Fa-f ]+)$", re.M)
            mx = re.compile(rf"^({re.escape(owner)}\s+\d+\s+IN\s+MX\s+)(\d+)(\s+\S+)$", re.M)
            text, n = tlsa.subn(lambda m: m.group(1) + "00" * 32, text)
            if n == 0:
                text, n = mx.subn(lambda m: m.group(1) + str(int(m.group(2)) + 1) + m.group(3),
                                  text)
            if n != 1:
                raise RuntimeError(f"no TLSA or MX record at {owner} to tamper with")
        signed.write_text(text)
        anchor = (d / f"{key}.key").read_text()
        (d / "anchor.key").write_text("\n".join(
            ln for ln in anchor.splitlines() if ln and not ln.startswith(";")) + "\n")
        return signed

    def _named_conf(self, signed: Path) -> Path:
        zones = [f'zone "{self.zone}" {{ type primary; file "{signed}"; }};']
        for name, recs in self.insecure.items():
            f = self.dir / f"{name}.zone"
            f.write_text(_zone_text(name, recs))
            zones.append(f'zone "{name}" {{ type primary; file "{f}"; }};')
        conf = self.dir / "named.conf"
        conf.write_text(f"""
options {{
    directory "{self.dir}";
    listen-on port {self.named_port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file "{self.dir}/named.pid";
    session-keyfile "{self.dir}/session.key";
    recursion no;
    dnssec-validation no;
    allow-query {{ any; }};
}};
controls {{ }};
{chr(10).join(zones)}
""")
        return conf

    def _unbound_conf(self) -> Path:
        stubs = "".join(f"""
stub-zone:
    name: "{z}"
    stub-addr: 127.0.0.1@{self.named_port}
""" for z in [self.zone, *self.insecure])
        conf = self.dir / "unbound.conf"
        conf.write_text(f"""
server:
    interface: 127.0.0.1
    port: {self.unbound_port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{self.dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{self.dir}/anchor.key"
    val-log-level: 2
    qname-minimisation: no
    harden-dnssec-stripped: yes
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
    # RFC 6761 names ("test.", "invalid."...) are answered NXDOMAIN locally by default
    local-zone: "test." nodefault
    domain-insecure: "test."
remote-control:
    control-enable: no
{stubs}""")
        return conf

    def start(self) -> DnssecRig:
        named, unbound = need("named"), need("unbound")
        signed = self._sign()
        self.named_port = free_udp_tcp_port()
        self._procs.append(subprocess.Popen(
            [named, "-g", "-n", "1", "-c", str(self._named_conf(signed))],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "named.log", "wb")))  # noqa: SIM115
        self._wait(self.named_port, self.zone, "SOA", "named")
        self.unbound_port = free_udp_tcp_port()
        self._procs.append(subprocess.Popen(
            [unbound, "-d", "-c", str(self._unbound_conf())],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "unbound.log", "wb")))  # noqa: SIM115
        self._wait(self.unbound_port, self.zone, "SOA", "unbound", want_ad=True)
        return self

    def _wait(self, port: int, name: str, rdtype: str, what: str,
              want_ad: bool = False) -> None:
        deadline = time.monotonic() + 20
        last = ""
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    self.stop()
                    log = (self.dir / f"{what}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{what} exited ({p.returncode}): {log}")
            q = dns.message.make_query(name, rdtype, want_dnssec=want_ad)
            q.flags |= dns.flags.AD
            try:
                r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.5)
                if r.rcode() == dns.rcode.NOERROR and r.answer and \
                        (not want_ad or r.flags & dns.flags.AD):
                    return
                last = f"rcode {dns.rcode.to_text(r.rcode())}, flags {dns.flags.to_text(r.flags)}"
            except (dns.exception.Timeout, OSError) as e:
                last = str(e)
            time.sleep(0.1)  # polling a daemon that is starting: no event to wait on
        self.stop()
        raise RuntimeError(f"{what} not answering for {name} {rdtype} on {port}: {last}")

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
        self._procs.clear()
