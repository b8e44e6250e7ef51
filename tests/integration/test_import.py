"""`authrelay import`: a real sendmail.mc and a real sasldb2 (made by saslpasswd2).

The sendmail.mc fixture carries every directive of the usual sendmail + saslauthd
submission howto; the converted config must pass `check-config` and keep every directive
either mapped or named in a `# not mapped:` comment. The sasldb2 users, once imported,
log in to a real authrelay process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from relayproc import RelayProcess
from smtpclient import RawClient, client_ctx, plain
from support.ports import free_port

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "sendmail.mc"


def _cli(*args: str, input: str | None = None, config: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    pre = ["-c", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "authrelay", *pre, *args], input=input,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- sendmail.mc

@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    r = _cli("import", "sendmail-mc", str(FIXTURE))
    assert r.returncode == 0, r.stderr
    out = tmp_path_factory.mktemp("mc") / "authrelay.toml"
    out.write_text(r.stdout)
    return r.stdout, out


def test_mc_output_passes_check_config(converted: tuple[str, Path]) -> None:
    _text, path = converted
    r = _cli("check-config", "--syntax", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(": ok")
    # The full check looks at this machine, which is not the migrated one: it names
    # what is missing here (the certbot files), by key, without a traceback.
    r = _cli("check-config", str(path))
    assert "error: tls.cert: /etc/letsencrypt/live/relay.example.org/fullchain.pem: " \
        "certificate not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_mc_maps_listeners_and_modes(converted: tuple[str, Path]) -> None:
    cfg = tomllib.loads(converted[0])
    listen = [(ln["address"], ln["mode"]) for ln in cfg["listen"]]
    assert listen == [
        ("0.0.0.0:25", "smtp"),
        ("[::]:25", "smtp"),
        ("0.0.0.0:587", "submission"),  # Port=submission, M=Ea: AUTH required
        ("0.0.0.0:465", "submissions"),  # Port=smtps, M=s
    ]


def test_mc_maps_limits_tls_auth_smarthost(converted: tuple[str, Path]) -> None:
    cfg = tomllib.loads(converted[0])
    assert cfg["hostname"] == "relay.example.org"
    assert cfg["limits"] == {
        "max_message_size": 20480000, "data_block_timeout": "10m",
        "data_final_timeout": "10m", "command_timeout": "5m", "max_connections": 100,
        "connection_rate": 10, "bad_rcpt_throttle": 5,
    }
    assert cfg["tls"]["cert"] == "/etc/letsencrypt/live/relay.example.org/fullchain.pem"
    assert cfg["tls"]["key"] == "/etc/letsencrypt/live/relay.example.org/privkey.pem"
    # LOGIN PLAIN CRAM-MD5 DIGEST-MD5 offered, LOGIN PLAIN trusted: only those two.
    assert cfg["auth"]["mechanisms"] == ["LOGIN", "PLAIN"]
    assert "CRAM-MD5" in converted[0] and "DIGEST-MD5" in converted[0]
    assert cfg["relay"]["smart_host"] == ["smtp.provider.example:587"]
    assert cfg["relay"]["smart_host_tls"] == "starttls"


def test_mc_every_directive_accounted_for(converted: tuple[str, Path]) -> None:
    """Each directive of the fixture is mapped (quoted in a comment) or listed as not mapped."""
    text = converted[0]
    comments = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    boiler = ("divert", "include", "VERSIONID", "OSTYPE", "DOMAIN(", "MAILER", "undefine")
    for raw in FIXTURE.read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith(("#", "dnl", "`")) or s.startswith(boiler):
            continue
        head = re.match(r"(\w+\(`?[\w.]+)", s)
        assert head, s
        assert head.group(1) in comments, f"directive lost: {s}"
    # The ones authrelay cannot express are named as such.
    not_mapped = [ln for ln in text.splitlines() if ln.startswith("# not mapped: ")]
    for name in ("confPRIVACY_FLAGS", "confCLIENT_CERT", "access_db", "authinfo",
                 "greet_pause", "mailertable", "LOCAL_DOMAIN"):
        assert any(name in ln for ln in not_mapped), name
    for name in ("confMAX_MESSAGE_SIZE", "SMART_HOST", "DAEMON_OPTIONS", "confSERVER_CERT"):
        assert not any(name in ln for ln in not_mapped), name


def test_mc_variants(tmp_path: Path) -> None:
    mc = tmp_path / "variant.mc"
    mc.write_text(
        "define(`SMART_HOST', `esmtp:[10.0.0.5]:465')dnl\n"
        "define(`confTO_DATABLOCK', `1h30m')dnl\n"
        "define(`confAUTH_OPTIONS', `A p y q')dnl\n"
        "DAEMON_OPTIONS(`Port=2525, Addr=127.0.0.1, Name=MSA, M=a')dnl\n"
        "DAEMON_OPTIONS(`Port=smtp, Addr=127.0.0.1, Name=MTA, M=A')dnl\n"
        "this is not m4 at all\n"
    )
    r = _cli("import", "sendmail-mc", str(mc))
    assert r.returncode == 0, r.stderr
    cfg = tomllib.loads(r.stdout)
    assert cfg["relay"]["smart_host"] == ["10.0.0.5:465"]
    assert cfg["relay"]["smart_host_tls"] == "tls"
    assert cfg["limits"]["data_block_timeout"] == "90m"
    assert [(ln["address"], ln["mode"]) for ln in cfg["listen"]] == [
        ("127.0.0.1:2525", "submission"), ("127.0.0.1:25", "smtp")]
    assert "# not mapped: define(`confAUTH_OPTIONS', `A p y q') (flags q)" in r.stdout
    assert "(M= flags A)" in r.stdout
    assert "# not mapped: this is not m4 at all" in r.stdout
    p = tmp_path / "out.toml"
    p.write_text(r.stdout)
    assert _cli("check-config", "--syntax", str(p)).returncode == 0


def test_mc_missing_file(tmp_path: Path) -> None:
    r = _cli("import", "sendmail-mc", str(tmp_path / "nope.mc"))
    assert r.returncode == 1 and "nope.mc" in r.stderr


# --------------------------------------------------------------------------- sasldb

def _saslpasswd2(db: Path, user: str, password: str, realm: str | None = None) -> None:
    if shutil.which("saslpasswd2") is None:
        pytest.fail("saslpasswd2 is not installed (sasl2-bin; the test command installs it)")
    args = ["saslpasswd2", "-f", str(db), "-c", "-p"]
    if realm:
        args += ["-u", realm]
    subprocess.run([*args, user], input=password + "\n", text=True, check=True, timeout=30)


def test_sasldb_import_then_login(relay_factory, tmp_path: Path) -> None:
    db = tmp_path / "sasldb2"
    _saslpasswd2(db, "carol", "caröl's pass word")
    _saslpasswd2(db, "dave", "dave-secret", realm="other.example")
    r: RelayProcess = relay_factory(users={}, start=False)
    res = r.cli("import", "sasldb", str(db), "--realm", r.config_data["hostname"],
                "--realm", _default_realm(), check=False)
    assert res.returncode == 0, res.stderr
    assert "added carol" in res.stdout and "added dave@other.example" in res.stdout
    assert "caröl" not in res.stdout + res.stderr and "dave-secret" not in res.stdout
    listed = r.cli("user", "list").stdout.split()
    assert "carol" in listed and "dave@other.example" in listed

    r.start()
    for user, pw, code in (("carol", "caröl's pass word", 235),
                           ("dave@other.example", "dave-secret", 235),
                           ("carol", "wrong", 535)):
        # AUTH PLAIN carries UTF-8 (RFC 4616); smtplib cannot send a non-ASCII password.
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            assert c.reply().code == 220
            assert c.cmd("EHLO t").code == 250
            assert c.cmd(f"AUTH PLAIN {plain(user, pw)}").code == code

    # Hashes are argon2id, never the cleartext.
    import sqlite3

    con = sqlite3.connect(r.state / "users.db")
    hashes = [h for (h,) in con.execute("SELECT hash FROM users")]
    con.close()
    assert hashes and all(h.startswith("$argon2id$") for h in hashes)


def _default_realm() -> str:
    import socket

    return socket.gethostname()


def test_sasldb_existing_user_skipped_or_replaced(relay_factory, tmp_path: Path) -> None:
    db = tmp_path / "sasldb2"
    _saslpasswd2(db, "alice", "from-sendmail")
    r: RelayProcess = relay_factory(start=False)  # alice exists with PASSWORD
    r.cli("user", "add", "alice", "--password-stdin", input="original\n")
    res = r.cli("import", "sasldb", str(db), "--realm", _default_realm(), check=False)
    assert res.returncode == 0
    assert "skipped alice" in res.stdout
    from authrelay.auth.passwords import verify_password
    from authrelay.auth.userdb import UserDB

    udb = UserDB(r.state / "users.db")
    try:
        assert verify_password(udb.get_hash("alice") or "", "original")
        res = r.cli("import", "sasldb", str(db), "--realm", _default_realm(), "--replace",
                    check=False)
        assert res.returncode == 0 and "replaced alice" in res.stdout
        assert verify_password(udb.get_hash("alice") or "", "from-sendmail")
    finally:
        udb.close()


def test_sasldb_one_name_from_two_realms_is_never_merged(tmp_path: Path) -> None:
    # alice of two default realms: two Cyrus users with two passwords, one authrelay name.
    # The old code added one and then, with --replace, overwrote it with the other in the
    # same run ("replaced alice", counted as imported): one of the two lost her password.
    # Also: a name holding ESC was printed raw to the admin's terminal.
    db = tmp_path / "sasldb2"
    _saslpasswd2(db, "alice", "pw-one", realm="one.test")
    _saslpasswd2(db, "alice", "pw-two", realm="two.test")
    _saslpasswd2(db, "evil\x1b[31mred", "pw", realm="one.test")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    r = _cli("import", "sasldb", str(db), "--realm", "one.test", "--realm", "two.test",
             "--replace", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert "skipped evil\\x1b[31mred: user name must not contain spaces or control " \
           "characters" in out, out
    assert "added alice" in out and "replaced alice" not in r.stdout
    taken = [ln for ln in out if ln.startswith("skipped alice@")]
    assert len(taken) == 1, out
    first, second = ("one", "two") if taken[0].startswith("skipped alice@two.test") \
        else ("two", "one")
    assert taken[0] == (f"skipped alice@{second}.test: it would be user alice, already "
                        f"taken by alice@{first}.test in this sasldb (two Cyrus users; add "
                        "this one by hand under another name)")
    assert out[-1] == "1 imported, 2 skipped, 0 failed"
    from authrelay.auth.passwords import verify_password
    from authrelay.auth.userdb import UserDB

    udb = UserDB(tmp_path / "state" / "users.db")
    try:
        assert verify_password(udb.get_hash("alice") or "", f"pw-{first}")
    finally:
        udb.close()


def test_sasldb_default_realm_matches_without_case(tmp_path: Path) -> None:
    # Cyrus stored the realm as written (saslpasswd2 -u RELAY.TEST); the old code compared
    # it with the default realms case-sensitively and stored "alice@RELAY.TEST": no login
    # reached her (as "alice" no such user; as alice@relay.test with [auth] realms, mapped
    # to "alice" too).
    db = tmp_path / "sasldb2"
    _saslpasswd2(db, "alice", "pw-alice", realm="RELAY.TEST")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    r = _cli("import", "sasldb", str(db), "--realm", "relay.test", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "added alice" in r.stdout.splitlines(), r.stdout
    assert 'realms = ["RELAY.TEST"]' in r.stdout  # the line to add, as for any bare realm


def test_sasldb_import_with_an_external_backend_says_where_users_went(
        tmp_path: Path) -> None:
    # With saslauthd or Dovecot as backend the users land in a users.db no server reads
    # until backend = "userdb": said, not left for the admin to find at the first 535.
    db = tmp_path / "sasldb2"
    _saslpasswd2(db, "erin", "pw", realm="relay.test")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n'
                   '[auth]\nbackend = "saslauthd:/run/saslauthd/mux"\n')
    r = _cli("import", "sasldb", str(db), "--realm", "relay.test", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: [auth] backend is saslauthd:/run/saslauthd/mux: the users imported into " \
           f'{tmp_path / "state" / "users.db"} are used once you set backend = "userdb"' \
        in r.stdout.splitlines(), r.stdout


def test_sasldb_record_that_is_no_user_is_named(tmp_path: Path) -> None:
    # A record whose key is not user\0realm\0property (another program's, or damage)
    # was dropped without a word: the totals did not count it.
    db = tmp_path / "sasldb2"
    subprocess.run(["db_load", "-T", "-t", "hash", str(db)], check=True, timeout=30,
                   input=b"alice\\00relay.test\\00userPassword\npw1\njunk-key\nvalue\n")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    r = _cli("import", "sasldb", str(db), "--realm", "relay.test", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert "skipped record junk-key: not a user\\0realm\\0property key (no Cyrus user to " \
           "import from it)" in out, out
    assert "added alice" in out and out[-1] == "1 imported, 1 skipped, 0 failed"


def test_sasldb_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "sasldb2"
    bad.write_bytes(b"not a berkeley db\n" * 100)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    r = _cli("import", "sasldb", str(bad), config=cfg)
    assert r.returncode == 1 and "cannot read" in r.stderr
    r = _cli("import", "sasldb", str(tmp_path / "missing"), config=cfg)
    assert r.returncode == 1 and "no such file" in r.stderr


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def test_sasldb_latin1_password_imported_and_verified_as_bytes(relay_factory,
                                                               tmp_path: Path) -> None:
    """A legacy Latin-1 password: imported (no traceback, later users too), then AUTH with
    its exact bytes succeeds over PLAIN and LOGIN; the UTF-8 spelling is another password.
    Users that cannot be imported are named with the reason, and the rest still are."""
    if shutil.which("saslpasswd2") is None:
        pytest.fail("saslpasswd2 is not installed (sasl2-bin; the test command installs it)")
    db = tmp_path / "sasldb2"
    for user, pw in ((b"dora", b"caf\xe9 cr\xe8me"), (b"j\xf6rg", b"x"),
                     (b"two words", b"pw"), (b"zoe", b"plain-zoe")):
        subprocess.run(["saslpasswd2", "-f", str(db), "-c", "-p", user], input=pw + b"\n",
                       check=True, timeout=30)
    r: RelayProcess = relay_factory(users={}, start=False,
                                    overrides={"metrics": {"address": f"127.0.0.1:{free_port()}"}})
    res = r.cli("import", "sasldb", str(db), "--realm", _default_realm(), check=False)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout.splitlines()
    assert "added dora" in out and "added zoe" in out
    assert any(ln.startswith("skipped j\\xf6rg@") and
               ln.endswith(": user name or realm is not UTF-8") for ln in out), out
    assert "skipped two words: user name must not contain spaces or control characters" \
        in out
    assert out[-1] == "2 imported, 2 skipped, 0 failed"
    assert "caf" not in res.stdout  # never a password
    # Run again: the same summary shape, existing users skipped with the reason.
    again = r.cli("import", "sasldb", str(db), "--realm", _default_realm(), check=False)
    assert "skipped dora: already exists (--replace to overwrite)" in again.stdout

    r.start()
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220 and c.cmd("EHLO t").code == 250
        assert c.cmd("AUTH PLAIN " + _b64(b"\0dora\0caf\xe9 cr\xe8me")).code == 235
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220 and c.cmd("EHLO t").code == 250
        assert c.cmd("AUTH LOGIN").code == 334
        assert c.cmd(_b64(b"dora")).code == 334
        assert c.cmd(_b64(b"caf\xe9 cr\xe8me")).code == 235
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220 and c.cmd("EHLO t").code == 250
        assert c.cmd("AUTH PLAIN " + _b64("\0dora\0café crème".encode())).code == 535
        # A user name that is not UTF-8 cannot be decoded: 501, logged, counted.
        reply = c.cmd("AUTH PLAIN " + _b64(b"\0d\xf6ra\0x"))
        assert reply.code == 501 and reply.text.startswith("5.5.2 "), reply
    r.wait_for(lambda: "reason=user name is not UTF-8" in r.maillog())
    line = next(ln for ln in r.maillog().splitlines() if "reason=user name is not UTF-8" in ln)
    assert "reject=501 5.5.2 authentication failed, relay=" in line
    assert "sasl_method=PLAIN" in line
    import urllib.request

    port = int(r.config_data["metrics"]["address"].rsplit(":", 1)[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
              if ln.startswith("authrelay_auth_total{")}
    assert counts['authrelay_auth_total{result="ok"}'] == 2
    assert counts['authrelay_auth_total{result="fail"}'] == 1
    assert counts['authrelay_auth_total{result="malformed"}'] == 1




# --------------------------------------------------------------------------- mc: issue 12

def test_mc_queue_timeouts_and_dnsbl_mapped(converted: tuple[str, Path]) -> None:
    cfg = tomllib.loads(converted[0])
    assert cfg["delivery"] == {"delay_warning": "4h", "max_queue_lifetime": "5d"}
    assert cfg["checks"] == {"dnsbl": ["zen.spamhaus.org", "bl.spamcop.net"]}
    not_mapped = [ln for ln in converted[0].splitlines() if ln.startswith("# not mapped: ")]
    for name in ("confTO_QUEUEWARN", "confTO_QUEUERETURN"):
        assert not any(name in ln for ln in not_mapped), name
    # The custom reject text has no equivalent: said so, the zone itself is mapped.
    assert any("zen.spamhaus.org" in ln and "custom reject message" in ln
               for ln in not_mapped)


def test_mc_bare_numbers_use_sendmails_units(tmp_path: Path) -> None:
    mc = tmp_path / "q.mc"
    mc.write_text("define(`confTO_QUEUEWARN', `8')dnl\ndefine(`confTO_QUEUERETURN', `3')dnl\n"
                  "FEATURE(`dnsbl')dnl\n")
    cfg = tomllib.loads(_cli("import", "sendmail-mc", str(mc)).stdout)
    # queuewarn counts hours, queuereturn days (sendmail's readcf.c defaults).
    assert cfg["delivery"] == {"delay_warning": "8h", "max_queue_lifetime": "3d"}
    assert cfg["checks"]["dnsbl"] == ["blackholes.mail-abuse.org"]  # sendmail's default


def test_mc_no_empty_checks_table(tmp_path: Path) -> None:
    mc = tmp_path / "d.mc"
    mc.write_text("FEATURE(`delay_checks')dnl\n")
    r = _cli("import", "sendmail-mc", str(mc))
    assert r.returncode == 0, r.stderr
    assert "[checks]" not in r.stdout and "delay_checks" in r.stdout
    assert "checks" not in tomllib.loads(r.stdout)


def test_mc_cyrus_sasl_saslauthd_is_named(converted: tuple[str, Path], tmp_path: Path) -> None:
    text = converted[0]
    assert text.splitlines()[3].startswith("# IMPORTANT: sendmail authenticated users "
                                           "through Cyrus SASL")
    cfg = tomllib.loads(text)
    assert cfg["auth"]["backend"] == "saslauthd:/var/run/saslauthd/mux"
    # Sendmail.conf naming another saslauthd socket directory.
    (tmp_path / "mux").mkdir()
    conf = tmp_path / "Sendmail.conf"
    conf.write_text(f"pwcheck_method: saslauthd\nsaslauthd_path: {tmp_path / 'mux'}\n"
                    "mech_list: PLAIN LOGIN\n")
    r = _cli("import", "sendmail-mc", "--sasl-conf", str(conf), str(FIXTURE))
    assert tomllib.loads(r.stdout)["auth"]["backend"] == f"saslauthd:{tmp_path}/mux/mux"


def test_mc_cyrus_sasl_sasldb_says_import(tmp_path: Path) -> None:
    conf = tmp_path / "Sendmail.conf"
    conf.write_text("pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                    "sasldb_path: /etc/mail/sasldb2\n")
    r = _cli("import", "sendmail-mc", "--sasl-conf", str(conf), str(FIXTURE))
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["auth"]["backend"] == "userdb"
    assert "Run `authrelay import sasldb /etc/mail/sasldb2` before starting" in r.stdout
    # Without SMTP AUTH in the .mc, nothing is said about Cyrus.
    mc = tmp_path / "noauth.mc"
    mc.write_text("define(`confMAX_MESSAGE_SIZE', `1000')dnl\n")
    r = _cli("import", "sendmail-mc", "--sasl-conf", str(conf), str(mc))
    assert "Cyrus" not in r.stdout and "backend" not in r.stdout


def test_cf_is_refused(tmp_path: Path) -> None:
    cf = tmp_path / "sendmail.cf"
    cf.write_text("# generated\nV10/Berkeley\nCwlocalhost\nO SmtpGreetingMessage=$j\n"
                  "S0\nR$*\t$#local $: $1\n")
    r = _cli("import", "sendmail-mc", str(cf))
    assert r.returncode == 1 and r.stdout == ""
    assert "is a generated sendmail.cf, not the m4 source" in r.stderr
    renamed = tmp_path / "whatever.mc"
    renamed.write_text(cf.read_text())  # the content gives it away too
    assert _cli("import", "sendmail-mc", str(renamed)).returncode == 1


def test_authinfo_becomes_smart_host_credentials(
        relay_factory, fake_mx, trustme_ca, trustme_ca_file: Path, tmp_path: Path) -> None:
    """authinfo -> smart_host_user + a 0600 password file; a relay on the converted
    credentials then logs in to a real smart host that requires AUTH."""
    import os
    import smtplib
    import stat

    from relayproc import PASSWORD
    from support.certs import server_tls_context

    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 require_starttls=True, users={"relay-user@provider": "p\u00e4ss w0rd!"})
    authinfo = tmp_path / "authinfo"
    authinfo.write_text('AuthInfo:other.example "U:x" "P:y"\n'
                        'AuthInfo:127.0.0.2 "U:root" "I:relay-user@provider" '
                        '"P:p\u00e4ss w0rd!" "M:PLAIN"\n')
    mc = tmp_path / "s.mc"
    mc.write_text("define(`SMART_HOST', `relay:[127.0.0.2]')dnl\n"
                  "FEATURE(`authinfo', `hash -o /etc/mail/authinfo.db')dnl\n")
    pwfile = tmp_path / "out" / "smart.pw"
    r = _cli("import", "sendmail-mc", "--authinfo", str(authinfo), "--password-file",
             str(pwfile), str(mc))
    assert r.returncode == 0, r.stderr
    conv = tomllib.loads(r.stdout)
    assert conv["relay"]["smart_host_user"] == "relay-user@provider"
    assert conv["relay"]["smart_host_password_file"] == str(pwfile)
    assert stat.S_IMODE(os.stat(pwfile).st_mode) == 0o600
    assert "w0rd" not in r.stdout  # the password only in the file
    assert pwfile.read_text() == "p\u00e4ss w0rd!\n"
    relay: RelayProcess = relay_factory({"relay": {
        "smart_host": [f"127.0.0.2:{sh.port}"], "smart_host_tls": "starttls",
        "smart_host_user": conv["relay"]["smart_host_user"],
        "smart_host_password_file": conv["relay"]["smart_host_password_file"],
        "smart_host_ca_file": str(trustme_ca_file)}, "delivery": {"retry": ["1s"]}})
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=10) as s:
        s.starttls(context=relay.client_context())
        s.login("alice", PASSWORD)
        s.sendmail("alice@local.test", ["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n")
    relay.wait_for(lambda: len(sh.messages) == 1, timeout=30)
    assert sh.messages[0].auth_user == "relay-user@provider"


def test_mc_macros_aliases_free_blocks_and_access_db(tmp_path: Path) -> None:
    """The classic TLS macros are expanded where used; ALIAS_FILE, confMIN_FREE_BLOCKS
    and the access db's Connect: RELAY entries are mapped; the rest of the access file
    is listed as not mapped."""
    access = tmp_path / "access"
    access.write_text(
        "# generated by hand\n"
        "Connect:localhost.localdomain RELAY\n"
        "Connect:127.0.0.1 RELAY\n"
        "Connect:10.1.2 RELAY\n"
        "192.168 RELAY\n"
        "Connect:IPv6:2001:db8 RELAY\n"
        "Connect:192.0.2.9 REJECT\n"
        "From:spammer@example.com REJECT\n")
    mc = tmp_path / "tls.mc"
    mc.write_text(
        "define(`CERT_DIR', `/etc/mail/tls')dnl\n"
        "define(`confSERVER_CERT', `CERT_DIR/sendmail.pem')dnl\n"
        "define(`confSERVER_KEY', `CERT_DIR/sendmail.key')dnl\n"
        "define(`ALIAS_FILE', `/etc/mail/aliases')dnl\n"
        "define(`confMIN_FREE_BLOCKS', `250')dnl\n"
        f"FEATURE(`access_db', `hash -T<TMPF> -o {tmp_path}/access.db')dnl\n")
    r = _cli("import", "sendmail-mc", str(mc))
    assert r.returncode == 0, r.stderr
    cfg = tomllib.loads(r.stdout)
    assert cfg["tls"] == {"cert": "/etc/mail/tls/sendmail.pem",
                          "key": "/etc/mail/tls/sendmail.key"}
    assert cfg["aliases_file"] == "/etc/mail/aliases"
    assert cfg["limits"]["queue_min_free"] == 250 * 4096
    assert cfg["relay"]["trusted_networks"] == ["127.0.0.1/32", "10.1.2.0/24",
                                                "192.168.0.0/16", "2001:db8::/32"]
    assert "a macro of the .mc, expanded where it is used" in r.stdout
    assert "not mapped: define(`CERT_DIR'" not in r.stdout
    for line in ("Connect:localhost.localdomain RELAY", "Connect:192.0.2.9 REJECT",
                 "From:spammer@example.com REJECT"):
        assert f"# not mapped: {access}: {line}" in r.stdout
    p = tmp_path / "out.toml"
    p.write_text(r.stdout)
    assert _cli("check-config", "--syntax", str(p)).returncode == 0
    # --access names the file when the .mc's map path is elsewhere.
    other = tmp_path / "other"
    other.write_text("Connect:203.0.113.7 RELAY\n")
    r = _cli("import", "sendmail-mc", str(mc), "--access", str(other))
    assert tomllib.loads(r.stdout)["relay"]["trusted_networks"] == ["203.0.113.7/32"]


def test_mc_with_control_characters_converts_to_valid_toml(tmp_path: Path) -> None:
    # A .mc line holding ESC or DEL (a pasted colour code, a stray byte) went verbatim
    # into a `# not mapped:` comment; TOML allows no control character in a comment, so
    # the validation of the output raised a traceback and nothing was converted. A value
    # (ALIAS_FILE) holding one made an invalid TOML string the same way.
    mc = tmp_path / "ctl.mc"
    mc.write_bytes(b"define(`confMAX_MESSAGE_SIZE', `1000000')dnl\n"
                   b"FEATURE(`weird\x1b[31m')dnl\n"
                   b"define(`confFOO', `a\x7fb')dnl\n"
                   b"define(`ALIAS_FILE', `/etc/mail/ali\x1bases')dnl\n")
    r = _cli("import", "sendmail-mc", str(mc))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "\x1b" not in r.stdout and "\x7f" not in r.stdout
    cfg = tomllib.loads(r.stdout)
    assert cfg["limits"]["max_message_size"] == 1000000
    assert cfg["aliases_file"] == "/etc/mail/ali\x1bases"  # kept exact, escaped in TOML
    assert "# not mapped: FEATURE(`weird\\x1b[31m')" in r.stdout
    assert "# not mapped: define(`confFOO', `a\\x7fb')" in r.stdout


def test_mc_include_of_an_admins_file_is_named(tmp_path: Path) -> None:
    # Debian's sendmail.mc includes /etc/mail/m4/provider.m4 (and dialup.m4), where a
    # SMART_HOST may be defined: the old code took every include() as m4 scaffolding and
    # dropped it without a word. sendmail's own cf.m4 stays scaffolding.
    mc = tmp_path / "inc.mc"
    mc.write_text("include(`/usr/share/sendmail/cf/m4/cf.m4')dnl\n"
                  "include(`/etc/mail/m4/provider.m4')dnl\n"
                  "define(`confMAX_MESSAGE_SIZE', `1000000')dnl\n")
    r = _cli("import", "sendmail-mc", str(mc))
    assert r.returncode == 0, r.stderr
    not_mapped = [ln for ln in r.stdout.splitlines() if ln.startswith("# not mapped: ")]
    assert not_mapped == ["# not mapped: include(`/etc/mail/m4/provider.m4') (its "
                          "directives were not read: append them to the .mc and convert "
                          "again)"], not_mapped
    assert tomllib.loads(r.stdout)["limits"]["max_message_size"] == 1000000


def test_mc_smart_host_defined_twice_names_both(tmp_path: Path) -> None:
    # m4 keeps the last define; the old output kept no trace of the first SMART_HOST (an
    # admin comparing the .mc and the output saw a smart host vanish).
    mc = tmp_path / "twice.mc"
    mc.write_text("define(`SMART_HOST', `[old.isp.example]')dnl\n"
                  "define(`SMART_HOST', `[new.isp.example]')dnl\n")
    r = _cli("import", "sendmail-mc", str(mc))
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["relay"]["smart_host"] == ["new.isp.example:25"]
    assert "# define(`SMART_HOST', `[old.isp.example]'): overridden by a later define " \
           "(as in m4)" in r.stdout


def test_password_file_in_a_shared_directory_cannot_be_hijacked(tmp_path: Path) -> None:
    # The password went to PATH.tmp, opened O_CREAT|O_TRUNC without O_EXCL: in a directory
    # others may write to (a --password-file under /tmp, run as root), a symlink planted
    # as PATH.tmp made root overwrite its target with the password (here "victim"), and
    # a planted file of another user ended up as the password file, theirs to read.
    import pwd
    import stat

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pwfile = shared / "smart.pw"
    os.symlink(victim, shared / "smart.pw.tmp")
    authinfo = tmp_path / "authinfo"
    authinfo.write_text('AuthInfo:smtp.isp.example "U:relay" "P:s3cret"\n')
    mc = tmp_path / "s.mc"
    mc.write_text("define(`SMART_HOST', `[smtp.isp.example]')dnl\n"
                  "FEATURE(`authinfo', `hash -o /etc/mail/authinfo.db')dnl\n")
    r = _cli("import", "sendmail-mc", "--authinfo", str(authinfo), "--password-file",
             str(pwfile), str(mc))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    st = os.lstat(pwfile)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid() and pwfile.read_text() == "s3cret\n"
    # A planted regular file of another user under the old name: never the password's.
    os.unlink(shared / "smart.pw.tmp")
    nobody = pwd.getpwnam("nobody")
    planted = shared / "smart.pw.tmp"
    planted.write_text("")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    planted.chmod(0o666)
    assert _cli("import", "sendmail-mc", "--authinfo", str(authinfo), "--password-file",
                str(pwfile), str(mc)).returncode == 0
    assert os.stat(pwfile).st_uid == os.geteuid() and planted.read_text() == ""
    assert sorted(p.name for p in shared.iterdir()) == ["smart.pw", "smart.pw.tmp"]


def test_realm_logins_keep_working_after_sasldb_import(relay_factory, tmp_path: Path
                                                       ) -> None:
    """Cyrus took erin@REALM as erin for its default realm; the import stores erin and
    says which `[auth] realms` keeps those logins working; with it they do."""
    db = tmp_path / "sasldb2"
    _saslpasswd2(db, "erin", "erin-secret", realm="relay.test")
    r: RelayProcess = relay_factory(users={}, start=False,
                                    overrides={"auth": {"realms": ["Relay.Test"]}})
    res = r.cli("import", "sasldb", str(db), "--realm", "relay.test", check=False)
    assert res.returncode == 0, res.stderr
    assert "added erin" in res.stdout
    assert "realms" not in res.stdout  # already configured: nothing to say
    r2: RelayProcess = relay_factory(users={}, start=False)
    res = r2.cli("import", "sasldb", str(db), "--realm", "relay.test", check=False)
    assert 'set in [auth]: realms = ["relay.test"]' in res.stdout, res.stdout
    r.start()
    for user, pw, code in (("erin", "erin-secret", 235),
                           ("erin@relay.test", "erin-secret", 235),
                           ("erin@RELAY.TEST", "erin-secret", 235),
                           ("erin@other.test", "erin-secret", 535),
                           ("erin@relay.test", "wrong", 535)):
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            assert c.reply().code == 220
            assert c.cmd("EHLO t").code == 250
            assert c.cmd(f"AUTH PLAIN {plain(user, pw)}").code == code, user
    assert "sasl_username=erin@other.test" in r.maillog()


def test_a_file_that_is_no_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO (or /dev/zero) named as the .mc or as --access: the import opened it and
    waited for a writer for ever (/dev/zero: read until memory ran out). Now refused at
    once, as a config file is (config.read_config_bytes)."""
    fifo = tmp_path / "sendmail.mc"
    os.mkfifo(fifo)
    r = _cli("import", "sendmail-mc", str(fifo))
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"authrelay: {fifo}: not a "
                                                         "regular file\n")
    r = _cli("import", "sendmail-mc", str(FIXTURE), "--access", str(fifo))
    assert r.returncode == 0, r.stderr
    assert (f"# not mapped: FEATURE(`access_db', , `skip') ({fifo}: not a regular file; "
            "give --access FILE)") in r.stdout.splitlines()
