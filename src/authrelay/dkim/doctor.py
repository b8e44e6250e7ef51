"""`authrelay doctor`: check, live, what receivers will check about mail from this relay.

One line per check, `✔` or `✗`, what was found, and for a failure what to fix:
- hostname      `hostname` has an A/AAAA record.
- fcrdns IP     each public address has a PTR naming `hostname`, and `hostname` resolves
                back to that address (forward-confirmed reverse DNS, RFC 8601 2.7.3).
- spf DOMAIN    the domain's SPF record, evaluated includes and all by pyspf (RFC 7208),
                gives `pass` for every public address (or the smart host's addresses).
- spf helo HOST `hostname`'s own SPF record passes for every public address: bounces go
                with a null sender, so receivers check the HELO identity (RFC 7208 2.3,
                as postmaster@HOST). Not checked with a smart host (its HELO is seen).
- dkim SEL._domainkey.DOMAIN   the published key equals the local key, algorithm too
                (RFC 6376 3.6.1, RFC 8463).
- dmarc DOMAIN  `_dmarc.DOMAIN` (else the parent domain's, as an approximation of the
                organizational domain of RFC 7489 3.2) is one valid DMARC1 record, and
                alignment can be met: a published DKIM key of DOMAIN (d= is the From:
                domain, so strict or relaxed adkim holds) or an SPF pass for DOMAIN.
- tls           the certificate covers `hostname` (RFC 6125 6.4: DNS-ID, one wildcard
                label) and does not expire within 30 days; not self-signed.
- smarthost H   each smart host answers, TLS as configured, and accepts our AUTH (its
                name resolved through `[delivery] nameservers` when set, as delivery does).

DNS goes through `[delivery] nameservers` when set (the system resolver otherwise), for
our own lookups and for pyspf's (pyspf asks dnspython's default resolver: it is pointed
at the same servers for the duration of the run). A temporary DNS failure fails the check
and says so. Exit status 0 only when every check passes; `--json` prints a list of
`{"check", "ok", "detail", "fix"}` objects instead of lines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import socket
import ssl
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiosmtplib
import dns.nameserver
import dns.resolver
from cryptography import x509
from cryptography.x509.oid import NameOID

from authrelay.config import Config, SmartHostOAuth, parse_hostport
from authrelay.delivery.bearer import redact
from authrelay.delivery.tlspolicy import smart_host_level
from authrelay.dkim import records
from authrelay.dkim.keys import DkimKey, KeyStore, key_domain
from authrelay.dns import DnsError, DnsNoData, DnsPermanent, Resolver, _parse_nameserver

EXPIRY_MARGIN = dt.timedelta(days=30)
OK, FAIL = "\u2714", "\u2717"  # ✔ ✗


@dataclass
class Check:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        s = f"{OK if self.ok else FAIL} {self.check}: {self.detail}"
        return s if self.ok or not self.fix else f"{s} -- fix: {self.fix}"


def _tags(value: str) -> dict[str, str]:
    """RFC 6376 3.2 / RFC 7489 6.4 tag=value lists (whitespace-insensitive)."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = "".join(v.split())
    return out


def _dns_problem(e: DnsError) -> str:
    if isinstance(e, DnsPermanent):
        return "the name does not exist (NXDOMAIN)"
    if isinstance(e, DnsNoData):
        return "no record of that type"
    return f"DNS lookup failed ({e}); try again"


class Doctor:
    def __init__(self, cfg: Config, domains: list[str] | None = None,
                 resolver: Resolver | None = None) -> None:
        self.cfg = cfg
        self.host = cfg.hostname.rstrip(".").lower()
        self.store = KeyStore(cfg.dkim_dir).load()
        self.domains = ([key_domain(d) or d.lower().rstrip(".") for d in domains] if domains
                        else records.sending_domains(cfg, self.store))
        self.resolver = resolver or Resolver(cfg.delivery.nameservers,
                                             timeout=cfg.delivery.dns_timeout)
        self.results: list[Check] = []
        self.dkim_ok: dict[str, bool] = {}  # domain -> some published key matches
        self.spf_ok: dict[str, bool] = {}

    def add(self, check: str, ok: bool, detail: str, fix: str = "") -> None:
        self.results.append(Check(check, ok, detail, fix))

    async def run(self) -> list[Check]:
        addrs = await self.check_hostname()
        await self.check_fcrdns(addrs)
        if not self.domains:
            self.add("domains", False, "no sending domain (no DKIM key, no [dkim] domains)",
                     "make keys: authrelay dkim keygen DOMAIN")
        for d in self.domains:
            await self.check_dkim(d)
            await self.check_spf(d, addrs)
            await self.check_dmarc(d)
        if not self.cfg.relay.smart_host:
            await self.check_spf_helo(addrs)
        self.check_tls()
        await self.check_smart_hosts()
        return self.results

    # ------------------------------------------------------------- host

    async def check_hostname(self) -> list[str]:
        try:
            found = await self.resolver.addresses(self.host)
        except DnsError as e:
            self.add("hostname", False, f"{self.host}: {_dns_problem(e)}",
                     f"publish an A (and AAAA) record for {self.host} with the relay's "
                     "public address (see authrelay dns)")
            found = []
        else:
            if "." not in self.host:
                self.add("hostname", False, f"{self.host} is not a fully qualified name",
                         "set hostname in the config to the relay's public DNS name")
            else:
                self.add("hostname", True, f"{self.host} resolves to {', '.join(found)}")
        if self.cfg.public_addresses:
            return list(self.cfg.public_addresses)
        return await records.public_addresses(self.cfg, self.resolver) or found

    async def check_fcrdns(self, addrs: list[str]) -> None:
        if not addrs:
            self.add("fcrdns", False, "the relay's public address is unknown",
                     "set public_addresses in the config (or an A record for hostname)")
            return
        for ip in addrs:
            name = f"fcrdns {ip}"
            try:
                ptr = await self.resolver.ptr(ip)
            except DnsError as e:
                self.add(name, False, f"PTR lookup: {_dns_problem(e)}", "try again later")
                continue
            want = f"ask the owner of {ip} (your hosting provider) to set its PTR to {self.host}"
            if ptr is None:
                self.add(name, False, f"{ip} has no PTR record", want)
                continue
            if ptr.rstrip(".").lower() != self.host:
                self.add(name, False, f"PTR of {ip} is {ptr}, not {self.host}",
                         f"{want} (or set hostname = \"{ptr}\" if that is the relay's name)")
                continue
            try:
                back = await self.resolver.addresses(ptr)
            except DnsError as e:
                back, why = [], _dns_problem(e)
            else:
                why = ""
            norm = {str(ipaddress.ip_address(a)) for a in back}
            if str(ipaddress.ip_address(ip)) not in norm:
                self.add(name, False, f"PTR of {ip} is {ptr}, but {ptr} resolves to "
                         f"{', '.join(back) or why or 'nothing'}",
                         f"publish {ptr}. IN {'AAAA' if ':' in ip else 'A'} {ip}")
                continue
            self.add(name, True, f"{ip} -> {ptr} -> {ip}")

    # ------------------------------------------------------------- DKIM

    async def check_dkim(self, domain: str) -> None:
        keys = self.store.for_domain(domain)
        if not keys:
            self.add(f"dkim {domain}", False, f"no local DKIM key for {domain}: its mail "
                     "goes out unsigned", f"authrelay dkim keygen {domain}, then publish")
            self.dkim_ok[domain] = False
            return
        any_ok = False
        for k in keys:
            ok = await self._check_key(k)
            any_ok = any_ok or ok
        self.dkim_ok[domain] = any_ok

    async def _check_key(self, k: DkimKey) -> bool:
        name = f"dkim {k.record_name}"
        publish = f"publish {k.zone_line()}"
        try:
            txts = await self.resolver.txt(k.record_name)
        except DnsError as e:
            self.add(name, False, f"no key published: {_dns_problem(e)}", publish)
            return False
        recs = [t for t in txts if "p=" in t]
        if len(recs) != 1:
            self.add(name, False, f"{len(recs)} DKIM key records at {k.record_name} "
                     "(exactly one expected)", publish)
            return False
        tags = _tags(recs[0])
        if tags.get("v", "DKIM1") != "DKIM1":
            self.add(name, False, f"v={tags['v']} (must be DKIM1)", publish)
            return False
        pub_alg = tags.get("k", "rsa")
        if pub_alg != k.algorithm:
            self.add(name, False, f"published k={pub_alg}, the local key is {k.algorithm}",
                     publish)
            return False
        p = tags.get("p", "")
        if not p:
            self.add(name, False, "the published key is revoked (empty p=)", publish)
            return False
        if p != k.public_b64:
            self.add(name, False, f"the published key differs from the local one ({k.path})",
                     publish)
            return False
        self.add(name, True, f"{k.algorithm} key published and matches {k.path.name}")
        return True

    # ------------------------------------------------------------- SPF

    async def check_spf(self, domain: str, addrs: list[str]) -> None:
        name = f"spf {domain}"
        senders = list(addrs)
        via = ""
        if self.cfg.relay.smart_host:
            # The smart host sends our mail on: it is the address receivers see. Its
            # submission address approximates its outbound one.
            via = " (smart host)"
            senders = []
            for h in records.smart_host_names(self.cfg):
                try:
                    senders.append(str(ipaddress.ip_address(h)))
                    continue
                except ValueError:
                    pass
                try:
                    senders += await self.resolver.addresses(h)
                except DnsError:
                    pass
        if not senders:
            self.add(name, False, f"no sending address known{via} to evaluate SPF for",
                     "check relay.smart_host resolves" if via
                     else "set public_addresses in the config")
            self.spf_ok[domain] = False
            return
        try:
            txts = await self.resolver.txt(domain)
        except (DnsPermanent, DnsNoData):
            txts = []
        except DnsError as e:
            self.add(name, False, f"TXT lookup: {_dns_problem(e)}", "try again later")
            self.spf_ok[domain] = False
            return
        spf_recs = [t for t in txts if t.lower().startswith("v=spf1")]
        suggested = records.Record(domain, "TXT", records.spf_value(self.cfg, addrs)).zone_line()
        if not spf_recs:
            self.add(name, False, f"{domain} has no SPF record", f"publish {suggested}")
            self.spf_ok[domain] = False
            return
        results = await asyncio.to_thread(self._evaluate_spf, domain, senders)
        bad = [(ip, r, why) for ip, r, why in results if r != "pass"]
        self.spf_ok[domain] = not bad
        if bad:
            detail = "; ".join(f"{r} for {ip}" + (f" ({why})" if why else "")
                               for ip, r, why in bad)
            self.add(name, False, f"\"{spf_recs[0]}\": {detail}",
                     f"authorise {', '.join(ip for ip, *_ in bad)}{via} in the SPF record "
                     f"(e.g. {suggested})")
        else:
            self.add(name, True, f"pass for {', '.join(senders)}{via}")

    async def check_spf_helo(self, addrs: list[str]) -> None:
        """RFC 7208 2.3: our bounces have a null MAIL FROM, so SPF checks the HELO name
        (as postmaster@HOSTNAME); its record must pass for every public address."""
        name = f"spf helo {self.host}"
        suggested = records.helo_spf_record(self.cfg, addrs).zone_line()
        if not addrs:
            self.add(name, False, "no sending address known to evaluate SPF for",
                     "set public_addresses in the config")
            return
        try:
            txts = await self.resolver.txt(self.host)
        except (DnsPermanent, DnsNoData):
            txts = []
        except DnsError as e:
            self.add(name, False, f"TXT lookup: {_dns_problem(e)}", "try again later")
            return
        spf_recs = [t for t in txts if t.lower().startswith("v=spf1")]
        if not spf_recs:
            self.add(name, False, f"{self.host} has no SPF record (bounces, sent with a "
                     "null sender, are checked against the HELO name)",
                     f"publish {suggested}")
            return
        results = await asyncio.to_thread(self._evaluate_spf, self.host, addrs)
        bad = [(ip, r, why) for ip, r, why in results if r != "pass"]
        if bad:
            detail = "; ".join(f"{r} for {ip}" + (f" ({why})" if why else "")
                               for ip, r, why in bad)
            self.add(name, False, f"\"{spf_recs[0]}\": {detail}", f"publish {suggested}")
        else:
            self.add(name, True, f"pass for {', '.join(addrs)}")

    def _evaluate_spf(self, domain: str, ips: list[str]) -> list[tuple[str, str, str]]:
        import spf  # pyspf: RFC 7208 evaluation, includes, macros, limits

        out = []
        with _default_resolver(self.cfg):
            for ip in ips:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        q = spf.query(i=ip, s=f"postmaster@{domain}", h=self.host,
                                      timeout=self.cfg.delivery.dns_timeout)
                        res, _code, expl = q.check()
                except Exception as e:  # the library's own failure: report, never crash
                    res, expl = "temperror", f"{type(e).__name__}: {e}"
                why = "" if res == "pass" else (expl if res in ("permerror", "temperror")
                                                else "")
                out.append((ip, res, why))
        return out

    # ------------------------------------------------------------- DMARC

    async def check_dmarc(self, domain: str) -> None:
        name = f"dmarc {domain}"
        starter = records.Record(f"_dmarc.{domain}", "TXT",
                                 f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}").zone_line()
        candidates = [domain]
        labels = domain.split(".")
        if len(labels) > 2:
            candidates.append(".".join(labels[-2:]))
        found: list[str] = []
        where = ""
        for cand in candidates:
            try:
                txts = await self.resolver.txt(f"_dmarc.{cand}")
            except (DnsPermanent, DnsNoData):
                continue
            except DnsError as e:
                self.add(name, False, f"_dmarc.{cand}: {_dns_problem(e)}", "try again later")
                return
            found = [t for t in txts if t.replace(" ", "").upper().startswith("V=DMARC1")]
            if found:
                where = cand
                break
        if not found:
            self.add(name, False, f"no DMARC record at _dmarc.{domain}", f"publish {starter}")
            return
        if len(found) > 1:
            self.add(name, False, f"{len(found)} DMARC records at _dmarc.{where} (RFC 7489 "
                     "6.6.3: then none applies)", "keep exactly one")
            return
        tags = _tags(found[0])
        policy = tags.get("sp" if where != domain and "sp" in tags else "p", "")
        if policy not in ("none", "quarantine", "reject"):
            self.add(name, False, f"\"{found[0]}\": p= missing or invalid", f"publish {starter}")
            return
        dkim_align = self.dkim_ok.get(domain, False)
        spf_align = self.spf_ok.get(domain, False)
        if not (dkim_align or spf_align):
            self.add(name, False, f"p={policy}, but neither DKIM nor SPF can align for "
                     f"{domain}", "publish the DKIM key (or authorise the relay in SPF) "
                     "as the lines above say")
            return
        how = " and ".join(x for x, ok in (("DKIM", dkim_align), ("SPF", spf_align)) if ok)
        at = f" (at _dmarc.{where})" if where != domain else ""
        self.add(name, True, f"p={policy}{at}; alignment by {how}")

    # ------------------------------------------------------------- TLS

    def check_tls(self) -> None:
        """Each served certificate ([tls] cert, and second_cert when set: "tls second_cert")."""
        for i, names in enumerate(self.cfg.cert_pairs):
            if i:
                self._check_cert(names.cert, f"tls {names.cert_key.removeprefix('tls.')}",
                                 "[tls] second_cert/second_key", "authrelay cert make --rsa")
            else:
                self._check_cert(names.cert, "tls", "[tls] cert/key", "or let serve make one")

    def _check_cert(self, path: Path, check: str, keys: str, make: str) -> None:
        """`keys`: the config keys naming this pair, as the fix says them; `make`: how
        to get one at all."""
        try:
            pem = path.read_bytes()
            cert = x509.load_pem_x509_certificates(pem)[0]
        except (OSError, ValueError, IndexError) as e:
            self.add(check, False, f"cannot read the certificate {path}: {e}",
                     f"set {keys} ({make})")
            return
        names = _cert_names(cert)
        now = dt.datetime.now(dt.UTC)
        left = cert.not_valid_after_utc - now
        problems = []
        if not any(_name_matches(n, self.host) for n in names):
            problems.append(f"does not cover {self.host} (names: {', '.join(names) or 'none'})")
        if left < dt.timedelta(0):
            problems.append(f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif left < EXPIRY_MARGIN:
            problems.append(f"expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d})")
        if cert.issuer == cert.subject:
            problems.append("is self-signed (mail clients will refuse or warn)")
        if problems:
            self.add(check, False, f"{path}: " + "; ".join(problems),
                     f"get a certificate for {self.host} from a CA (e.g. Let's Encrypt), "
                     f"set {keys}, renew before expiry, reload (SIGHUP)")
        else:
            self.add(check, True, f"{path.name} covers {self.host}, valid until "
                     f"{cert.not_valid_after_utc:%Y-%m-%d} ({left.days} days)")

    # ------------------------------------------------------------- smart host

    async def check_smart_hosts(self) -> None:
        r = self.cfg.relay
        _, implicit = smart_host_level(self.cfg)
        for i, hp in enumerate(r.smart_host):
            host, port = parse_hostport(hp, f"relay.smart_host[{i}]",
                                        default_port=465 if implicit else 25)
            ok, detail, fix = await self._try_smart_host(host, port, r.oauth_for(hp))
            self.add(f"smarthost {host}:{port}", ok, detail, fix)

    async def _oauth_auth(self, smtp: aiosmtplib.SMTP, host: str, port: int,
                          s: SmartHostOAuth) -> tuple[bool, str, str]:
        """Obtain a token as delivery does (delivery/oauth.py) and AUTH with it."""
        from authrelay.delivery import oauth

        mech = "XOAUTH2" if s.auth == "xoauth2" else "OAUTHBEARER"
        offered = smtp.esmtp_extensions.get("auth", "").upper().split()
        if mech not in offered:
            return False, f"does not offer AUTH {mech} (offers: {' '.join(offered) or 'none'})", \
                f"set {s.key('auth')} to a mechanism the smart host offers"
        source = oauth.TokenSource(s, timeout=min(30.0, self.cfg.delivery.connect_timeout))
        try:
            token = await source.get()
        except oauth.TokenError as e:
            return False, f"no OAuth token: {e}", f"check {s.key('token_url')}, " \
                "_client_id, _secret_file or _key_file, and _scope"
        resp = oauth.xoauth2(s.user, token) if mech == "XOAUTH2" else \
            oauth.oauthbearer(s.user, token, host, port)
        try:
            reply = await smtp.execute_command(b"AUTH", mech.encode(), resp)
            if reply.code == 334:  # the error as a challenge (RFC 7628 3.2.2)
                reply = await smtp.execute_command(b"AQ==" if mech == "OAUTHBEARER" else b"")
            # A hostile or broken server may echo what we sent: never into the report.
            text = redact(" ".join(reply.message.split()), token, resp.decode("ascii"))
        finally:
            del token, resp
        if reply.code == 235:
            return True, f"token obtained; AUTH {mech} accepted as {s.user}", ""
        return False, f"token obtained, but AUTH {mech} refused: {reply.code} {text}", \
            f"check that the app may send as {s.key('user')} (Microsoft 365: " \
            "SMTP.SendAsApp and the mailbox permission; Google: domain-wide delegation " \
            "of the scope)"

    async def _try_smart_host(self, host: str, port: int, oauth: SmartHostOAuth | None
                              ) -> tuple[bool, str, str]:
        r = self.cfg.relay
        level, implicit = smart_host_level(self.cfg)  # the courier's reading of smart_host_tls
        ctx = ssl.create_default_context(cafile=r.smart_host_ca_file or None)
        if level != "verify":  # as delivery does: a token or a password as the level says
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        timeout = min(30.0, self.cfg.delivery.connect_timeout)
        sock: socket.socket | None = None
        if self.cfg.delivery.nameservers and not _is_ip(host):
            # As delivery does: the name through [delivery] nameservers, TLS for the name.
            try:
                addrs = await self.resolver.addresses(host)
            except DnsError as e:
                return False, f"{host} through [delivery] nameservers: {_dns_problem(e)}", \
                    f"publish an A/AAAA record for {host}, or fix relay.smart_host"
            try:
                sock = await _connect_first(addrs, port, timeout)
            except (OSError, TimeoutError) as e:
                return False, f"connect failed: {e}", \
                    "check relay.smart_host and the network path"
        smtp = aiosmtplib.SMTP(hostname=host, port=None if sock else port, sock=sock,
                               use_tls=implicit, start_tls=False, tls_context=ctx,
                               timeout=timeout, local_hostname=self.host)
        step = "connect"
        try:
            await smtp.connect()
            step = "EHLO"
            await smtp.ehlo()
            if not implicit and level != "none" and (
                    level != "may" or smtp.supports_extension("starttls")):
                step = "STARTTLS"
                if not smtp.supports_extension("starttls"):
                    return False, "does not offer STARTTLS", "set relay.smart_host_tls " \
                        "to the smart host's mode (tls for port 465)"
                await smtp.starttls(tls_context=ctx, server_hostname=host)
                await smtp.ehlo()
            if oauth is not None:
                step = "AUTH"
                return await self._oauth_auth(smtp, host, port, oauth)
            if not r.smart_host_user:
                return True, "answers (no smart_host_user: AUTH not tried)", ""
            step = "AUTH"
            try:
                with open(r.smart_host_password_file, encoding="utf-8") as f:
                    password = f.read().rstrip("\r\n")
            except OSError as e:
                return False, f"cannot read relay.smart_host_password_file: " \
                    f"{e.strerror or e}", "fix the file's path or permissions"
            try:
                await smtp.login(r.smart_host_user, password)
            except aiosmtplib.SMTPAuthenticationError as e:
                # A hostile or broken server may echo what we sent: never into the report.
                sent = (password, base64.b64encode(password.encode()).decode(),
                        base64.b64encode(f"\0{r.smart_host_user}\0{password}".encode()
                                         ).decode())
                return False, f"AUTH refused: {e.code} " \
                    f"{redact(' '.join(e.message.split()), *sent)}", \
                    "check relay.smart_host_user and smart_host_password_file"
            finally:
                del password
            return True, f"answers and accepts AUTH as {r.smart_host_user}", ""
        except aiosmtplib.SMTPException as e:
            cause = e.__cause__ or e.__context__
            why = str(cause) if isinstance(cause, ssl.SSLError | OSError) else str(e)
            return False, f"{step} failed: {why}", \
                "check relay.smart_host, smart_host_tls and the network path"
        except (OSError, TimeoutError) as e:
            return False, f"{step} failed: {e}", "check relay.smart_host and the network path"
        finally:
            with contextlib.suppress(Exception):
                if smtp.is_connected:
                    await smtp.quit()
            smtp.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _connect_first(addrs: list[str], port: int, timeout: float) -> socket.socket:
    """A TCP connection to the first address that answers (IPv6 first, as delivery)."""
    err: BaseException = OSError("no address")
    for ip in sorted(dict.fromkeys(addrs), key=lambda a: 0 if ":" in a else 1):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET,
                          socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (ip, port)),
                                   timeout)
            return s
        except (OSError, TimeoutError) as e:
            s.close()
            err = e
    raise err


def _cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:  # RFC 6125 6.4.4: CN only without any DNS-ID
        return [str(a.value).lower() for a in
                cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 6.4.3: a wildcard only as the whole left-most label."""
    p, h = pattern.rstrip(".").lower(), host.rstrip(".").lower()
    if p.startswith("*."):
        head, _, rest = h.partition(".")
        return bool(head) and rest == p[2:]
    return p == h


@contextlib.contextmanager
def _default_resolver(cfg: Config) -> Iterator[None]:
    """Point dnspython's default resolver (the one pyspf asks) at our nameservers."""
    if not cfg.delivery.nameservers:
        yield
        return
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in
                     (_parse_nameserver(ns) for ns in cfg.delivery.nameservers)]
    r.lifetime = cfg.delivery.dns_timeout
    old = dns.resolver.default_resolver
    dns.resolver.default_resolver = r
    try:
        yield
    finally:
        dns.resolver.default_resolver = old


def run(cfg: Config, domains: list[str] | None = None) -> list[Check]:
    return asyncio.run(Doctor(cfg, domains).run())


def main(cfg: Config, domains: list[str] | None = None, *, as_json: bool = False) -> int:
    results = run(cfg, domains)
    if as_json:
        print(json.dumps([asdict(c) for c in results], indent=2, ensure_ascii=False))
    else:
        for c in results:
            print(c.line())
        bad = sum(1 for c in results if not c.ok)
        print(f"doctor: {bad} of {len(results)} checks failed" if bad else
              f"doctor: all {len(results)} checks passed", file=sys.stderr)
    return 0 if all(c.ok for c in results) else 1
