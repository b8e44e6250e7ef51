"""`authrelay user setup NAME`: the printed settings work against a real relay (implicit
TLS and STARTTLS, AUTH with the printed user name), and the Thunderbird autoconfig file
and the Apple profile parse and say the same."""

from __future__ import annotations

import os
import plistlib
import re
import smtplib
import stat
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess, to_toml

pytestmark = pytest.mark.slow


def run(conf: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(conf), "user", *args],
                          input=stdin, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    p = tmp_path / "authrelay.toml"
    p.write_text(to_toml({
        "hostname": "relay.example.org", "state_dir": str(tmp_path / "state"),
        "listen": [{"address": "0.0.0.0:25", "mode": "smtp"},
                   {"address": "0.0.0.0:587", "mode": "submission"},
                   {"address": "0.0.0.0:465", "mode": "submissions"}]}))
    r = run(p, "add", "alice", "--password-stdin", "--address", "alice@example.org",
            stdin="s3cret\n")
    assert r.returncode == 0, r.stderr
    return p


def thunderbird_read(data: bytes) -> dict:
    """What Thunderbird's readFromXML takes from the file: the first valid incoming server
    (it throws without one) and the outgoing servers (hostname, port 1-65535, socketType
    plain|SSL|STARTTLS, an authentication method it knows)."""
    root = ET.fromstring(data)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    (prov,) = root.findall("emailProvider")

    def server(el: ET.Element) -> dict:
        d = {t: el.findtext(t) for t in ("hostname", "port", "socketType", "username",
                                          "authentication")}
        assert d["hostname"] and 1 <= int(d["port"] or 0) <= 65535
        assert d["socketType"] in ("plain", "SSL", "STARTTLS")
        assert d["authentication"] in ("password-cleartext", "plain", "secure",
                                       "password-encrypted", "OAuth2")
        return d

    incoming = [server(e) for e in prov.findall("incomingServer")]
    assert incoming, "Need proper <incomingServer> in XML file"
    outgoing = [server(e) for e in prov.findall("outgoingServer")]
    assert all(e.get("type") == "smtp" for e in prov.findall("outgoingServer"))
    return {"id": prov.get("id"), "domains": [d.text for d in prov.findall("domain")],
            "incoming": incoming, "outgoing": outgoing}


def test_prints_what_to_type_and_no_files_without_incoming(conf: Path, tmp_path: Path
                                                           ) -> None:
    r = run(conf, "setup", "alice", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Outgoing mail server (SMTP) for alice@example.org:" in out
    assert "Server:          relay.example.org" in out
    assert "465, connection security SSL/TLS (implicit TLS)" in out
    assert "587, connection security STARTTLS" in out
    assert out.index("465") < out.index("587")  # implicit TLS first (RFC 8314 3.3)
    assert "User name:       alice" in out and "normal password" in out
    assert "No files written" in out and "--incoming" in out
    assert not (tmp_path / "out").exists()


def test_require_says_only_an_app_password_works(conf: Path, tmp_path: Path) -> None:
    """[auth] app_passwords = "require": the account password gets 535 at AUTH, but the
    printed settings told the person to type it ("the account password, or an app
    password"). Now they name the app password and how to make one."""
    assert "the account password, or an app password" in run(conf, "setup", "alice").stdout
    conf.write_text(conf.read_text() + '\n[auth]\napp_passwords = "require"\n')
    r = run(conf, "setup", "alice")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "Password:" in ln)
    assert "an app password for this device" in line
    assert "user app-password add alice --name DEVICE" in line
    assert "the account password is refused here" in line
    assert "the account password, or" not in r.stdout


def test_writes_thunderbird_and_apple_files(conf: Path, tmp_path: Path) -> None:
    d = tmp_path / "out"
    r = run(conf, "setup", "alice", "--incoming", "imaps://outlook.office365.com",
            "--out", str(d))
    assert r.returncode == 0, r.stderr
    assert "https://autoconfig.example.org/mail/config-v1.1.xml" in r.stdout
    assert "Incoming mail server (IMAP): outlook.office365.com, port 993" in r.stdout

    tb = thunderbird_read((d / "config-v1.1.xml").read_bytes())
    assert tb["id"] == "example.org" and tb["domains"] == ["example.org"]
    assert tb["incoming"] == [{"hostname": "outlook.office365.com", "port": "993",
                               "socketType": "SSL", "username": "%EMAILADDRESS%",
                               "authentication": "password-cleartext"}]
    # the user name is the address's local part: one file serves the whole domain
    assert [(o["hostname"], o["port"], o["socketType"], o["username"]) for o in tb["outgoing"]] \
        == [("relay.example.org", "465", "SSL", "%EMAILLOCALPART%"),
            ("relay.example.org", "587", "STARTTLS", "%EMAILLOCALPART%")]

    mc = d / "alice.mobileconfig"
    assert stat.S_IMODE(mc.stat().st_mode) == 0o644
    profile = plistlib.loads(mc.read_bytes())
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    (acct,) = profile["PayloadContent"]
    assert acct["PayloadType"] == "com.apple.mail.managed"
    for key, want in {
        "EmailAccountType": "EmailTypeIMAP", "EmailAddress": "alice@example.org",
        "IncomingMailServerHostName": "outlook.office365.com",
        "IncomingMailServerPortNumber": 993, "IncomingMailServerUseSSL": True,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": "relay.example.org", "OutgoingMailServerPortNumber": 465,
        "OutgoingMailServerUseSSL": True, "OutgoingMailServerUsername": "alice",
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
    }.items():
        assert acct[key] == want, key
    assert "OutgoingPassword" not in acct and "s3cret" not in mc.read_text()
    uuids = {profile["PayloadUUID"], acct["PayloadUUID"]}
    assert len(uuids) == 2 and all(uuid.UUID(u) for u in uuids)

    r = run(conf, "setup", "alice", "--incoming", "imaps://outlook.office365.com",
            "--out", str(d))  # again: fresh UUIDs, files replaced
    again = plistlib.loads(mc.read_bytes())
    assert again["PayloadUUID"] not in uuids
    assert again["PayloadContent"][0]["PayloadUUID"] not in uuids


def test_include_password_warns_and_is_private(conf: Path, tmp_path: Path) -> None:
    d = tmp_path / "out"
    r = run(conf, "setup", "alice", "--incoming", "pop3s://pop.example.org:1995",
            "--out", str(d), "--include-password", "--password-stdin", stdin="s3cret\n")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "clear text" in r.stderr
    mc = d / "alice.mobileconfig"
    assert stat.S_IMODE(mc.stat().st_mode) == 0o600
    acct = plistlib.loads(mc.read_bytes())["PayloadContent"][0]
    assert acct["OutgoingPassword"] == "s3cret"
    assert acct["EmailAccountType"] == "EmailTypePOP"
    assert acct["IncomingMailServerPortNumber"] == 1995
    assert b"s3cret" not in (d / "config-v1.1.xml").read_bytes()
    assert "s3cret" not in r.stdout


def test_user_names_and_errors(conf: Path, tmp_path: Path) -> None:
    r = run(conf, "setup", "nobody")
    assert r.returncode == 1 and "no user nobody" in r.stderr
    assert run(conf, "add", "bob", "--password-stdin", stdin="pw\n").returncode == 0
    r = run(conf, "setup", "bob")
    assert r.returncode == 1 and "--email" in r.stderr
    d = tmp_path / "bob"
    r = run(conf, "setup", "bob", "--email", "robert@example.net", "--incoming",
            "imap://mail.example.net", "--out", str(d))
    assert r.returncode == 0, r.stderr
    tb = thunderbird_read((d / "config-v1.1.xml").read_bytes())
    assert tb["id"] == "example.net"
    assert tb["incoming"][0]["socketType"] == "STARTTLS" and tb["incoming"][0]["port"] == "143"
    assert {o["username"] for o in tb["outgoing"]} == {"bob"}  # a per-user file
    r = run(conf, "setup", "alice", "--incoming", "https://x")
    assert r.returncode == 1 and "imaps://HOST" in r.stderr


@pytest.mark.slow
def test_the_printed_settings_work(relay_factory) -> None:  # noqa: ANN001
    """A mail program set up as printed: implicit TLS on the first port, STARTTLS on the
    second, AUTH with the printed user name and the password, a message accepted."""
    r: RelayProcess = relay_factory()
    res = r.cli("user", "setup", "alice", "--email", "alice@local.test")
    ports = [(int(p), sec) for p, sec in
             re.findall(r"(\d+), connection security (SSL/TLS|STARTTLS)", res.stdout)]
    user = re.search(r"User name:\s+(\S+)", res.stdout).group(1)
    assert [sec for _, sec in ports] == ["SSL/TLS", "STARTTLS"]
    for port, sec in ports:
        if sec == "SSL/TLS":
            s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=r.client_context(),
                                               timeout=20)
        else:
            s = smtplib.SMTP("127.0.0.1", port, timeout=20)
            s.starttls(context=r.client_context())
        with s:
            s.ehlo("laptop.test")
            assert "PLAIN" in s.esmtp_features.get("auth", "").upper()
            s.login(user, PASSWORD)
            code, _ = s.mail("alice@local.test")
            assert code == 250


@pytest.mark.root
def test_a_file_planted_in_a_shared_out_dir_does_not_get_the_password(
        conf: Path, tmp_path: Path) -> None:
    """--out in a directory others may write: a file someone planted under the old fixed
    temporary name (`NAME.tmp`) was filled with the password and renamed into place,
    still theirs (readable by them whatever its mode)."""
    d = tmp_path / "shared"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    for name in ("alice.mobileconfig.tmp", "config-v1.1.xml.tmp"):
        planted = d / name
        planted.write_bytes(b"")
        os.chown(planted, 65534, 65534)  # nobody's
        planted.chmod(0o666)
    r = run(conf, "setup", "alice", "--incoming", "imaps://imap.example.org",
            "--out", str(d), "--include-password", "--password-stdin", stdin="s3cret\n")
    assert r.returncode == 0, r.stderr
    for name in ("alice.mobileconfig", "config-v1.1.xml"):
        st = (d / name).stat()
        assert st.st_uid == os.geteuid(), name
    assert stat.S_IMODE((d / "alice.mobileconfig").stat().st_mode) == 0o600
    assert b"s3cret" in (d / "alice.mobileconfig").read_bytes()
    assert (d / "alice.mobileconfig.tmp").read_bytes() == b""  # theirs, untouched
