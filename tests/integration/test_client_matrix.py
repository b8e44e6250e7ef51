"""What a user sees, client by client: each real mail client, set up as README's "Client
set-up" says (465 implicit TLS and 587 STARTTLS, PLAIN and LOGIN, the server's certificate
verified: never `-k` or `tls_certcheck off`), exits 0; the message reaches the MX with
the body byte for byte as the client sent it, and both DKIM signatures verify (dkimpy and
OpenDKIM's verifier, the keys from the loopback DNS server). test_clients.py checks what
each client gets stored; this checks what arrives.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dkimcheck import dkim_zones, opendkim_results, verify_all
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory
from relayproc import PASSWORD, RelayProcess
from support import ci
from test_e2e_delivery import ZONES, mx_overrides

from authrelay.dkim.keys import KeyStore

pytestmark = [pytest.mark.external, pytest.mark.slow]

FROM = "alice@sender.test"
RCPT = "bob@example.test"
COMBOS = [(mode, mech) for mode in ("submissions", "submission") for mech in ("PLAIN", "LOGIN")]


def message(tag: str) -> bytes:
    """A message a user writes: a dot-led line, a line of two dots, trailing blanks, an
    empty line before the end (what dot-stuffing and canonicalisation get wrong)."""
    return (f"From: Alice <{FROM}>\r\nTo: <{RCPT}>\r\nSubject: {tag}\r\n"
            f"Date: Mon, 07 Dec 2026 01:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n"
            f"\r\nhello {tag}\r\n.dot line\r\n..two\r\ntrailing   \r\n\r\nend\r\n").encode()


@pytest.fixture
def rig(relay_factory: Callable[..., RelayProcess], dns_server: FakeDNSServer,
        fake_mx: MXFactory) -> dict[str, Any]:
    mx = fake_mx("127.0.0.2")  # mx1.example.test
    relay = relay_factory(mx_overrides(dns_server, fake_mx.port), users={}, start=False)
    relay.cli("user", "add", "alice", "--password-stdin", "--address", FROM,
              input=PASSWORD + "\n")
    relay.cli("dkim", "keygen", "sender.test", "--selector", "t")
    dns_server.set_zones({**ZONES, **dkim_zones(KeyStore(relay.state / "dkim").load().all())})
    relay.start()
    return {"relay": relay, "mx": mx, "dns": dns_server}


def _swaks(relay: RelayProcess, mode: str, mech: str, data: Path, ca: str
           ) -> subprocess.CompletedProcess[bytes]:
    swaks = ci.require_tool("swaks", "swaks")
    # swaks ends the data with CRLF before the dot itself: the file holds no last one
    data.write_bytes(data.read_bytes().removesuffix(b"\r\n"))
    return subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(relay.ports[mode]),
         "--tls" if mode == "submission" else "--tls-on-connect", "--tls-verify",
         "--tls-ca-path", ca, "--auth", mech, "--auth-user", "alice",
         "--auth-password", PASSWORD, "--from", FROM, "--to", RCPT, "--data", f"@{data}"],
        capture_output=True, timeout=60)


def _msmtp(relay: RelayProcess, mode: str, mech: str, data: Path, ca: str
           ) -> subprocess.CompletedProcess[bytes]:
    msmtp = ci.require_tool("msmtp", "msmtp")
    rc = data.with_suffix(".msmtprc")
    rc.write_text(f"account default\nhost 127.0.0.1\nport {relay.ports[mode]}\ntls on\n"
                  f"tls_starttls {'on' if mode == 'submission' else 'off'}\n"
                  f"tls_trust_file {ca}\nauth {mech.lower()}\nuser alice\n"
                  f"password {PASSWORD}\nfrom {FROM}\n")
    rc.chmod(0o600)
    # as a user pipes a file in: LF line ends, msmtp sends CRLF
    return subprocess.run([msmtp, "-C", str(rc), RCPT],
                          input=data.read_bytes().replace(b"\r\n", b"\n"),
                          capture_output=True, timeout=60)


def _curl(relay: RelayProcess, mode: str, mech: str, data: Path, ca: str
          ) -> subprocess.CompletedProcess[bytes]:
    curl = ci.require_tool("curl", "curl")
    url = (f"smtp://127.0.0.1:{relay.ports[mode]}" if mode == "submission"
           else f"smtps://127.0.0.1:{relay.ports[mode]}")
    return subprocess.run(
        [curl, "-sS", url, *(["--ssl-reqd"] if mode == "submission" else []),
         "--cacert", ca, "--login-options", f"AUTH={mech}", "--user", f"alice:{PASSWORD}",
         "--mail-from", FROM, "--mail-rcpt", RCPT, "--upload-file", str(data)],
        capture_output=True, timeout=60)


def _smtplib(relay: RelayProcess, mode: str, mech: str, data: Path, ca: str
             ) -> subprocess.CompletedProcess[bytes]:
    ctx = ssl.create_default_context(cafile=ca)  # hostname checked too: 127.0.0.1
    port = relay.ports[mode]
    s = (smtplib.SMTP("127.0.0.1", port, timeout=20) if mode == "submission"
         else smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20))
    with s:
        if mode == "submission":
            s.starttls(context=ctx)
        s.ehlo()
        s.user, s.password = "alice", PASSWORD
        code, _ = s.auth(mech, getattr(s, f"auth_{mech.lower()}"))
        refused = s.sendmail(FROM, [RCPT], data.read_bytes())
    return subprocess.CompletedProcess([], 0 if (code, refused) == (235, {}) else 1,
                                       f"{code} {refused}".encode(), b"")


CLIENTS = {"swaks": _swaks, "msmtp": _msmtp, "curl": _curl, "smtplib": _smtplib}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_each_client_s_message_arrives_as_sent_and_signed(
        rig: dict[str, Any], tmp_path: Path, client: str) -> None:
    relay, mx, dns = rig["relay"], rig["mx"], rig["dns"]
    ca = str(relay.state / "tls" / "cert.pem")
    for n, (mode, mech) in enumerate(COMBOS):
        tag = f"{client}-{mode}-{mech}"
        sent = message(tag)
        data = tmp_path / f"{tag}.eml"
        data.write_bytes(sent)
        r = CLIENTS[client](relay, mode, mech, data, ca)
        assert r.returncode == 0, (tag, r.stdout, r.stderr)
        got = relay.wait_for(lambda n=n: len(mx.messages) > n and mx.messages[n],
                             what=f"delivery of {tag}").content
        assert f"Subject: {tag}\r\n".encode() in got, (tag, got)
        head, body = sent.split(b"\r\n\r\n", 1)
        assert got.split(b"\r\n\r\n", 1)[1] == body, (tag, got)
        assert got.endswith(head.split(b"\r\n", 1)[1] + b"\r\n\r\n" + body), (tag, got)
        res = sorted(verify_all(got, dns.nameserver))
        assert res == [(b"sender.test", b"t-ed25519", b"ed25519-sha256", True),
                       (b"sender.test", b"t-rsa", b"rsa-sha256", True)], (tag, res)
        assert opendkim_results(got, dns.nameserver) == res, tag
    log = relay.maillog()
    for mech in ("PLAIN", "LOGIN"):
        assert log.count(f"auth=ok, sasl_method={mech}, sasl_username=alice,") == 2, log
    assert log.count("stat=Sent") == len(COMBOS), log
    assert log.count("dkim=signed, d=sender.test, s=t-ed25519,t-rsa") == len(COMBOS), log
