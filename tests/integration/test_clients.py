"""Real mail clients submit through a real authrelay process; the message lands intact."""

from __future__ import annotations

import smtplib
import subprocess
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess
from support import ci

pytestmark = [pytest.mark.external, pytest.mark.slow]


def _only_message(relay: RelayProcess) -> bytes:
    relay.wait_for(lambda: len(relay.queued()) == 1)
    return relay.message_bytes(relay.queued()[0])


def test_smtplib_starttls_login(relay: RelayProcess) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@local.test"
    msg["To"] = "bob@remote.example"
    msg["Subject"] = "hello"
    msg.set_content("line one\n.leading dot\n\nend\n")
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=10) as s:
        s.starttls(context=relay.client_context())
        s.login("alice", PASSWORD)
        refused = s.send_message(msg)
    assert refused == {}
    stored = _only_message(relay)
    assert stored.startswith(b"Received: from ")
    parsed = BytesParser().parsebytes(stored)
    assert parsed["Subject"] == "hello"
    assert parsed["Message-ID"]  # added by us (RFC 6409 8.3) when missing
    assert parsed["Date"]
    assert b"\r\n.leading dot\r\n" in stored  # un-stuffed exactly once
    assert "with ESMTPSA" in parsed["Received"]
    assert b"\n" not in stored.replace(b"\r\n", b"")
    log = relay.maillog()
    assert "auth=alice" in log and "nrcpts=1" in log
    # One TLS line per session, as Postfix logs it: protocol and cipher.
    # (The harness's readiness probe connects to 465 and hangs up: its handshake failure
    # is a tls_failed= line.)
    tls = [ln for ln in log.splitlines() if "NOQUEUE: tls=from " in ln and "protocol=" in ln]
    assert len(tls) == 1, log
    assert "[127.0.0.1], protocol=TLSv1." in tls[0] and ", cipher=" in tls[0]
    assert ", bits=" in tls[0]


def _swaks(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    ci.require_tool("swaks", "swaks")
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--from", "alice@local.test",
         "--to", "carol@remote.example", "--auth-user", "alice", "--auth-password", PASSWORD,
         "--header", "Subject: via swaks", "--body", "swaks body\n", *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_starttls(relay: RelayProcess, mech: str) -> None:
    r = _swaks(relay, "--port", str(relay.ports["submission"]), "--tls", "--auth", mech)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0" in r.stdout
    stored = _only_message(relay)
    assert b"Subject: via swaks" in stored and b"swaks body" in stored


def test_swaks_tls_on_connect(relay: RelayProcess) -> None:
    r = _swaks(relay, "--port", str(relay.ports["submissions"]), "--tls-on-connect",
               "--auth", "PLAIN")
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"via swaks" in _only_message(relay)
    relay.wait_for(lambda: ", protocol=TLSv1." in relay.maillog())
    line = next(ln for ln in relay.maillog().splitlines()
                if "NOQUEUE: tls=from " in ln and "protocol=" in ln)
    assert "protocol=TLSv1." in line and "cipher=" in line


def test_swaks_wrong_password_refused(relay: RelayProcess) -> None:
    ci.require_tool("swaks", "swaks")
    r = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(relay.ports["submission"]), "--tls",
         "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong",
         "--from", "alice@local.test", "--to", "x@remote.example"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "535 5.7.8" in r.stdout
    assert relay.queued() == []
    log = relay.maillog()
    assert "sasl_username=alice" in log and "[127.0.0.1]" in log
    assert "wrong" not in log  # never a password in the log


def test_msmtp(relay: RelayProcess, tmp_path: Path) -> None:
    ci.require_tool("msmtp", "msmtp")
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "account relay\n"
        "host 127.0.0.1\n"
        f"port {relay.ports['submission']}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {relay.state / 'tls' / 'cert.pem'}\n"
        "tls_certcheck off\n"
        "auth plain\nuser alice\n"
        f"password {PASSWORD}\n"
        "from alice@local.test\n"
        "account default : relay\n"
    )
    rc.chmod(0o600)
    body = "From: alice@local.test\nTo: dave@remote.example\nSubject: msmtp\n\nvia msmtp\n"
    r = subprocess.run(["msmtp", "-C", str(rc), "dave@remote.example"], input=body,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    stored = _only_message(relay)
    assert b"Subject: msmtp\r\n" in stored and b"via msmtp\r\n" in stored


def test_curl_ssl_reqd(relay: RelayProcess, tmp_path: Path) -> None:
    ci.require_tool("curl", "curl")
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"From: alice@local.test\r\nTo: erin@remote.example\r\n"
                     b"Subject: curl\r\n\r\nvia curl\r\n")
    r = subprocess.run(
        ["curl", "-sS", f"smtp://127.0.0.1:{relay.ports['submission']}", "--ssl-reqd",
         "--cacert", str(relay.state / "tls" / "cert.pem"), "-k",
         "--user", f"alice:{PASSWORD}", "--mail-from", "alice@local.test",
         "--mail-rcpt", "erin@remote.example", "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert b"via curl" in _only_message(relay)


def test_curl_implicit_tls(relay: RelayProcess, tmp_path: Path) -> None:
    ci.require_tool("curl", "curl")
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"Subject: smtps\r\n\r\nimplicit\r\n")
    r = subprocess.run(
        ["curl", "-sS", f"smtps://127.0.0.1:{relay.ports['submissions']}", "-k",
         "--user", f"alice:{PASSWORD}", "--mail-from", "alice@local.test",
         "--mail-rcpt", "erin@remote.example", "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert b"implicit" in _only_message(relay)
