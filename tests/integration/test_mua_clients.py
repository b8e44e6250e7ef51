"""mutt, s-nail and git send-email, set up as README's "Client set-up" shows them, against
one real authrelay: 587 STARTTLS and 465 implicit TLS, AUTH PLAIN and LOGIN, the server's
certificate verified against a CA file (trustme). What the user sees (the client's exit
status and words), what the next hop gets (headers, the body byte for byte, both DKIM
signatures verified by dkimpy; none on a From: the user does not own) and the maillog
(one line per event, the queue id first, `tls=` as it happened). Then the user's
mistakes: a wrong password (535 5.7.8), a From: not the user's under
`from_header_policy = "own"` (550 5.7.1, nothing queued) and a CA that did not sign the
server's certificate (the client refuses; one line, no traceback).

test_client_matrix.py does the same for swaks, msmtp, curl and smtplib. One server for the
module: the tests run in order and each reads only the maillog lines after its own start.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from dkimcheck import dkim_zones, verify_all
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import PASSWORD, RelayProcess
from support import ci
from support.certs import install_cert, server_tls_context
from test_e2e_delivery import ZONES, mx_overrides

from authrelay.dkim.keys import KeyStore

pytestmark = [pytest.mark.external, pytest.mark.slow]

FROM = "Alice <alice@sender.test>"
NOT_OWNED = "Carol <carol@other.test>"
RCPT = "bob@example.test"
# The mechanism each listener is tried with on the failure paths (both on the good one).
MECH = {"submission": "PLAIN", "submissions": "LOGIN"}
CLIENTS = ("git", "mutt", "s-nail")
PATHS = [(c, mode) for c in CLIENTS for mode in ("submission", "submissions")]


def body(tag: str) -> bytes:
    """What the user types (LF line ends): dot-led lines, trailing blanks, an empty line."""
    return f"hello {tag}\n.dot line\n..two\ntrailing   \n\nend\n".encode()


@dataclass
class Rig:
    relay: RelayProcess
    mx: FakeSMTPServer
    dns: FakeDNSServer
    ca: Path      # signed the relay's certificate: the file a user is given
    other_ca: Path  # a CA that did not: "untrusted server certificate"
    home: Path    # HOME of every client: no ~/.muttrc, ~/.gitconfig or dead.letter of ours
    repo: Path    # a git repository with a commit to send
    patch: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("mua")
    dns, mxs = FakeDNSServer().start(), MXFactory()
    relay: RelayProcess | None = None
    try:
        ca, other = trustme.CA(), trustme.CA()
        (base / "ca.pem").write_bytes(ca.cert_pem.bytes())
        (base / "other-ca.pem").write_bytes(other.cert_pem.bytes())
        mx = mxs("127.0.0.2", starttls_context=server_tls_context(ca, "mx1.example.test"))
        cert, key, _ = install_cert(ca, base / "tls", "relay.test", "localhost", "127.0.0.1")
        cfg = mx_overrides(dns, mxs.port, tls_ca_file=str(base / "ca.pem"))
        relay = RelayProcess(base, {**cfg, "tls": {"cert": str(cert), "key": str(key)}},
                             users={})
        relay.cli("user", "add", "alice", "--password-stdin", "--address",
                  "alice@sender.test", input=PASSWORD + "\n")
        relay.cli("dkim", "keygen", "sender.test", "--selector", "t")
        dns.set_zones({**ZONES, **dkim_zones(KeyStore(relay.state / "dkim").load().all())})
        relay.start()
        home = base / "home"
        home.mkdir()
        repo, patch = _repository(base / "repo", home)
        yield Rig(relay, mx, dns, base / "ca.pem", base / "other-ca.pem", home, repo, patch)
    finally:
        if relay is not None:
            relay.stop()
        mxs.stop()
        dns.stop()


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LC_ALL": "C.UTF-8", "GIT_CONFIG_NOSYSTEM": "1", **extra}


def _repository(repo: Path, home: Path) -> tuple[Path, Path]:
    git = ci.require_tool("git", "git")
    env = _env(home, GIT_AUTHOR_NAME="Alice", GIT_AUTHOR_EMAIL="alice@sender.test",
               GIT_COMMITTER_NAME="Alice", GIT_COMMITTER_EMAIL="alice@sender.test",
               GIT_AUTHOR_DATE="2026-12-07T01:00:00Z", GIT_COMMITTER_DATE="2026-12-07T01:00:00Z")
    repo.mkdir()

    def run(*args: str) -> str:
        return subprocess.run([git, "-C", str(repo), *args], env=env, check=True,
                              capture_output=True, text=True, timeout=60).stdout

    run("init", "-q")
    run("config", "user.name", "Alice")  # as a user has it (git send-email asks for it)
    run("config", "user.email", "alice@sender.test")
    (repo / "f").write_text("a\n")
    run("add", "f")
    run("commit", "-q", "-m", "first")
    (repo / "f").write_bytes(b"a\n" + body("patch"))
    run("commit", "-q", "-a", "-m", "second: change f\n\n.dot line in the message\n..two")
    return repo, Path(run("format-patch", "-1", "-o", str(repo.parent)).strip())


def _mutt(rig: Rig, mode: str, mech: str, password: str, ca: Path, sender: str,
          tag: str, port: int = 0) -> subprocess.CompletedProcess[str]:
    mutt = ci.require_tool("mutt", "mutt")
    scheme = "smtp" if mode == "submission" else "smtps"
    rc = rig.home / f"{tag}.muttrc"
    rc.write_text(f'set smtp_url = "{scheme}://alice@localhost:{port or rig.relay.ports[mode]}/"\n'
                  f'set smtp_pass = "{password}"\n'
                  f'set smtp_authenticators = "{mech.lower()}"\n'
                  "set ssl_starttls = yes\nset ssl_force_tls = yes\n"
                  f'set ssl_ca_certificates_file = "{ca}"\n'
                  f'set from = "{sender}"\nset use_from = yes\n'
                  'set record = ""\n')
    return subprocess.run([mutt, "-n", "-F", str(rc), "-s", tag, RCPT], input=body(tag).decode(),
                          env=_env(rig.home), capture_output=True, text=True, timeout=60)


def _snail(rig: Rig, mode: str, mech: str, password: str, ca: Path, sender: str,
           tag: str, port: int = 0) -> subprocess.CompletedProcess[str]:
    snail = ci.require_tool("s-nail", "s-nail")
    port = port or rig.relay.ports[mode]
    scheme = "smtp" if mode == "submission" else "smtps"
    rc = rig.home / f"{tag}.mailrc"
    rc.write_text("set v15-compat sendwait\n"
                  f"set mta={scheme}://alice@localhost:{port} smtp-auth={mech.lower()}\n"
                  + ("set smtp-use-starttls\n" if mode == "submission" else "")
                  + f"set password-alice@localhost:{port}='{password}'\n"
                  f"set tls-ca-file={ca} tls-ca-no-defaults\n"
                  f"set from='{sender}'\n")
    # -n: not /etc/s-nail.rc; nosave: no dead.letter of a test's refused message
    return subprocess.run([snail, "-n", "-Snosave", "-s", tag, RCPT], input=body(tag).decode(),
                          env=_env(rig.home, MAILRC=str(rc)), capture_output=True, text=True,
                          timeout=60)


def _git(rig: Rig, mode: str, mech: str, password: str, ca: Path, sender: str,
         tag: str, port: int = 0) -> subprocess.CompletedProcess[str]:
    git = ci.require_tool("git", "git")
    exec_path = subprocess.run([git, "--exec-path"], capture_output=True, text=True).stdout
    ci.require(Path(exec_path.strip(), "git-send-email").exists(),
               "git send-email not installed (apt-get install git-email)")
    # git-email only recommends the Perl modules git send-email cannot start without
    ci.require(subprocess.run(["perl", "-MMail::Address", "-MAuthen::SASL",
                               "-MIO::Socket::SSL", "-e1"], capture_output=True).returncode == 0,
               "git send-email's Perl modules missing (apt-get install libmailtools-perl "
               "libauthen-sasl-perl libio-socket-ssl-perl)")
    return subprocess.run(
        [git, "-C", str(rig.repo), "send-email", "--quiet", "--confirm=never",
         "--suppress-cc=all", "--smtp-server=127.0.0.1",
         f"--smtp-server-port={port or rig.relay.ports[mode]}",
         f"--smtp-encryption={'tls' if mode == 'submission' else 'ssl'}",
         "--smtp-user=alice", f"--smtp-pass={password}", f"--smtp-auth={mech}",
         f"--smtp-ssl-cert-path={ca}", f"--from={sender}", f"--to={RCPT}", str(rig.patch)],
        env=_env(rig.home), capture_output=True, text=True, timeout=60)


RUN = {"mutt": _mutt, "s-nail": _snail, "git": _git}


def _sent_body(rig: Rig, client: str, tag: str) -> bytes:
    if client == "git":
        return rig.patch.read_bytes().split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    return body(tag).replace(b"\n", b"\r\n")


def _next_delivered(rig: Rig, n: int, tag: str) -> bytes:
    got = rig.relay.wait_for(lambda: len(rig.mx.messages) > n and rig.mx.messages[n],
                             what=f"delivery of {tag}")
    assert got.rcpt_tos == [RCPT], got
    return got.content


def _qid(message: bytes) -> str:
    m = re.search(rb"by relay\.test \(authrelay\) with ESMTPSA id (\w+)\r\n", message)
    assert m, message
    return m.group(1).decode()


def _lines_since(rig: Rig, mark: int) -> list[str]:
    lines = rig.relay.maillog()[mark:].splitlines()
    assert not [ln for ln in lines if "Traceback" in ln], lines
    for ln in lines:  # queue id (or NOQUEUE) first, then one event
        assert re.match(r"\w{3} \d\d \d\d:\d\d:\d\d authrelay\[\d+\]: (NOQUEUE|[0-9A-Z]{10,}): "
                        r"[a-z_]+=", ln), ln
    return lines


def _wait_line(rig: Rig, mark: int, pattern: str) -> None:
    """Until a maillog line written after `mark` matches `pattern`."""
    rx = re.compile(pattern, re.M)
    rig.relay.wait_for(lambda: rx.search(rig.relay.maillog(settle=0.01)[mark:]),
                       what=f"a maillog line matching {pattern!r}")


def _only(lines: list[str], needle: str) -> str:
    found = [ln for ln in lines if needle in ln]
    assert len(found) == 1, (needle, lines)
    return found[0]


def _mark(rig: Rig) -> int:
    return len(rig.relay.maillog())


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["submission", "submissions"])
@pytest.mark.parametrize("client", CLIENTS)
def test_message_arrives_as_sent_signed_and_logged(rig: Rig, client: str, mode: str,
                                                   mech: str) -> None:
    tag = f"{client}-{mode}-{mech}"
    mark, n = _mark(rig), len(rig.mx.messages)
    r = RUN[client](rig, mode, mech, PASSWORD, rig.ca, FROM, tag)
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = _next_delivered(rig, n, tag)
    head, got_body = got.split(b"\r\n\r\n", 1)
    assert got_body == _sent_body(rig, client, tag), got
    fields = re.findall(rb"^([\w-]+):", head, re.M)
    # two signatures, then our one Received:, then the client's own fields, none doubled
    assert fields[:3] == [b"DKIM-Signature", b"DKIM-Signature", b"Received"], head
    assert len(set(f.lower() for f in fields[3:])) == len(fields[3:]), head
    assert f"\r\nFrom: {FROM}\r\n".encode() in head, head
    subject = "[PATCH] second: change f" if client == "git" else tag
    assert f"\r\nSubject: {subject}\r\n".encode() in head, head
    assert sorted(verify_all(got, rig.dns.nameserver)) == [
        (b"sender.test", b"t-ed25519", b"ed25519-sha256", True),
        (b"sender.test", b"t-rsa", b"rsa-sha256", True)]
    qid = _qid(got)
    _wait_line(rig, mark, rf"{qid}: status=removed")
    lines = _lines_since(rig, mark)
    port = rig.relay.ports[mode]
    assert f"listener={mode}:127.0.0.1:{port}" in _only(lines, "NOQUEUE: connect=")
    assert ", protocol=TLSv1.3, cipher=" in _only(lines, "NOQUEUE: tls=from unknown [127.0.0.1]")
    _only(lines, f"NOQUEUE: auth=ok, sasl_method={mech}, sasl_username=alice, ")
    assert not [ln for ln in lines if "tls_failed=" in ln or "reject=" in ln], lines
    _only(lines, f"{qid}: dkim=signed, d=sender.test, s=t-ed25519,t-rsa")
    frm = _only(lines, f"{qid}: from=<alice@sender.test>, ")
    assert ", nrcpts=1, " in frm and ", proto=ESMTPSA, auth=alice," in frm, frm
    # the MX offered STARTTLS with a certificate from tls_ca_file for its name: verified
    to = _only(lines, f"{qid}: to=<{RCPT}>, relay=mx1.example.test [127.0.0.2]:")
    assert ", tls=verified, policy=may, stat=Sent (250 " in to, to
    assert rig.mx.messages[n].tls, "the relay said tls=verified: the MX must have seen TLS"
    assert "quit=1" in _only(lines, "NOQUEUE: disconnect=from unknown [127.0.0.1], auth=alice")


@pytest.mark.parametrize("client", CLIENTS)
def test_a_from_the_user_does_not_own_goes_unsigned(rig: Rig, client: str) -> None:
    tag = f"{client}-unowned"
    mark, n = _mark(rig), len(rig.mx.messages)
    r = RUN[client](rig, "submissions", "LOGIN", PASSWORD, rig.ca, NOT_OWNED, tag)
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = _next_delivered(rig, n, tag)
    assert f"\r\nFrom: {NOT_OWNED}\r\n".encode() in got, got
    assert b"DKIM-Signature" not in got and verify_all(got, rig.dns.nameserver) == []
    qid = _qid(got)
    _wait_line(rig, mark, rf"{qid}: status=removed")
    _only(_lines_since(rig, mark), f"{qid}: dkim=skipped, reason=From: not owned by user")


# How each client exits, and what it tells its user, when it could not send (README).
EXIT = {"mutt": 1, "s-nail": 4, "git": 255}
SAYS_535 = {"mutt": "SASL authentication failed",
            "s-nail": "SMTP server: 535 5.7.8 Authentication credentials invalid",
            "git": "5.7.8 Authentication credentials invalid"}


@pytest.mark.parametrize(("client", "mode"), PATHS)
def test_a_wrong_password(rig: Rig, client: str, mode: str) -> None:
    mark, n = _mark(rig), len(rig.mx.messages)
    r = RUN[client](rig, mode, MECH[mode], "not the password", rig.ca, FROM, f"{client}-pw")
    assert r.returncode == EXIT[client] and SAYS_535[client] in r.stdout + r.stderr, r
    lines = _lines_since(rig, mark)
    _only(lines, "NOQUEUE: reject=535 5.7.8 authentication failed, relay=unknown [127.0.0.1], "
                 f"sasl_method={MECH[mode]}, sasl_username=alice")
    _wait_line(rig, mark, r"NOQUEUE: disconnect=from unknown \[127\.0\.0\.1\], commands=.*auth=1$")
    assert not [ln for ln in _lines_since(rig, mark) if "auth=ok" in ln or "from=<" in ln]
    assert rig.relay.queued() == [] and len(rig.mx.messages) == n


SAYS_UNTRUSTED = {"mutt": "Untrusted server certificate",
                  "s-nail": "certificate verify failed", "git": "certificate verify failed"}


@pytest.mark.parametrize(("client", "mode"), PATHS)
def test_an_untrusted_server_certificate(rig: Rig, client: str, mode: str) -> None:
    mark = _mark(rig)
    r = RUN[client](rig, mode, MECH[mode], PASSWORD, rig.other_ca, FROM, f"{client}-ca")
    assert r.returncode == EXIT[client] and SAYS_UNTRUSTED[client] in r.stdout + r.stderr, r
    _wait_line(rig, mark, r"NOQUEUE: (tls_failed|disconnect)=from unknown \[127\.0\.0\.1\]")
    lines = _lines_since(rig, mark)
    assert not [ln for ln in lines if "auth=" in ln or "from=<" in ln], lines
    if client == "mutt":
        # mutt (GnuTLS) judges the certificate after the handshake is done: the relay
        # sees a finished handshake and the client leave
        _only(lines, "NOQUEUE: tls=from unknown [127.0.0.1], protocol=TLSv1.3")
        assert not [ln for ln in lines if "tls_failed=" in ln], lines
    else:
        failed = _only(lines, "NOQUEUE: tls_failed=from unknown [127.0.0.1], ")
        assert "reason=handshake failed: TLSV1_ALERT_UNKNOWN_CA, " in failed, failed
        assert f"listener={mode}:127.0.0.1:{rig.relay.ports[mode]}" in failed, failed


@pytest.mark.parametrize("client", CLIENTS)
def test_implicit_tls_set_for_the_starttls_port(rig: Rig, client: str) -> None:
    """smtps:// (--smtp-encryption=ssl) with 587's port: the relay names the mistake."""
    mark = _mark(rig)
    r = RUN[client](rig, "submissions", "PLAIN", PASSWORD, rig.ca, FROM, f"{client}-tls",
                    port=rig.relay.ports["submission"])
    assert r.returncode == EXIT[client], r
    _wait_line(rig, mark, r"NOQUEUE: disconnect=from unknown \[127\.0\.0\.1\]")
    lines = _lines_since(rig, mark)
    refused = _only(lines, "NOQUEUE: reject=421 4.7.0 TLS handshake without STARTTLS, ")
    assert "reason=the client sent a TLS ClientHello: it is set for implicit TLS" in refused
    assert len(lines) == 3, lines  # connect=, reject=, disconnect=


@pytest.fixture
def own_policy(rig: Rig) -> Iterator[None]:
    """`[auth] from_header_policy = "own"` for one test (SIGHUP applies it), then back."""
    rig.relay.reload({"auth": {**rig.relay.config_data["auth"], "from_header_policy": "own"}})
    try:
        yield
    finally:
        rig.relay.reload({"auth": {k: v for k, v in rig.relay.config_data["auth"].items()
                                   if k != "from_header_policy"}})


SAYS_550 = {"mutt": "SMTP session failed: 550 5.7.1 From: header address not owned by user",
            "s-nail": "SMTP server: 550 5.7.1 From: header address not owned by user",
            "git": "5.7.1 From: header address not owned by user"}


@pytest.mark.parametrize("client", CLIENTS)
def test_a_from_the_user_does_not_own_is_refused_under_own(
        rig: Rig, own_policy: None, client: str) -> None:
    mark, n = _mark(rig), len(rig.mx.messages)
    r = RUN[client](rig, "submission", "PLAIN", PASSWORD, rig.ca, NOT_OWNED, f"{client}-own")
    assert r.returncode == EXIT[client] and SAYS_550[client] in r.stdout + r.stderr, r
    assert rig.relay.queued() == [] and rig.relay.unready() == []
    lines = _lines_since(rig, mark)
    refused = _only(lines, ": reject=550 5.7.1 From: header address not owned by user, ")
    assert "reason=From: <carol@other.test> not owned by alice" in refused, refused
    assert not [ln for ln in lines if "from=<" in ln or "dkim=" in ln], lines
    assert len(rig.mx.messages) == n
