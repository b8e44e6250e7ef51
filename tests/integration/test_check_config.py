"""`authrelay check-config` checks what `serve` would trip on (issue 12 item 2): real
certificate files, real sockets holding ports, real users; every finding names the key,
and no bad config ever gives a traceback.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from privpython import python_for
from relayproc import to_toml
from support.ports import free_port

pytestmark = pytest.mark.slow

UNPRIV = "nobody"


def _cc(cfg: Path, *extra: str, python: str = sys.executable, user: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    cmd = [python, "-m", "authrelay", "check-config", *extra, str(cfg)]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


def _cert(d: Path, name: str = "cert") -> tuple[Path, Path]:
    out = d / name
    r = subprocess.run([sys.executable, "-m", "authrelay", "cert", "make", "--hostname",
                        "relay.test", "--out", str(out)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return out / "cert.pem", out / "key.pem"


def _write(d: Path, data: dict) -> Path:
    base = {"hostname": "relay.test", "state_dir": str(d / "state"),
            "listen": [{"address": f"127.0.0.1:{free_port()}", "mode": "submission"}]}
    base.update(data)
    p = d / "authrelay.toml"
    p.write_text(to_toml(base))
    os.chmod(p, 0o644)
    return p


@pytest.fixture
def site() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's temp root is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="authrelay-cc-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_good_config_ok(site: Path) -> None:
    cert, key = _cert(site)
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(": ok")
    if os.geteuid() == 0:  # as root without `user`: said, not an error
        assert r.stderr.splitlines() == [
            f"{site / 'authrelay.toml'}: warning: user: not set, and started as root: the "
            "whole daemon would run as root (set user = \"authrelay\": serve binds as "
            "root, then drops to it)"], r.stderr
    else:
        assert r.stderr == ""


def test_state_dir_not_set_warns_where_the_state_goes(site: Path) -> None:
    """Relative paths are taken from the config file's directory: a file without
    state_dir keeps its state in var/ beside it (check-config runs from /: the old
    reading, ./var of the current directory, would have said /var)."""
    cert, key = _cert(site)
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)}})
    cfg.write_text("\n".join(ln for ln in cfg.read_text().splitlines()
                             if not ln.startswith("state_dir")) + "\n")
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: warning: state_dir: not set: the spool, users and keys are in " \
        f"{site / 'var'}, beside the config file" in r.stderr, r.stderr
    # Set to the very directory the default names (run.sh writes it out): set, no warning.
    set_default = cfg.with_name("default.toml")
    set_default.write_text(f'state_dir = "{site / "var"}"\n' + cfg.read_text())
    assert "state_dir: not set" not in _cc(set_default).stderr
    cfg.write_text('state_dir = "spool-here"\n' + cfg.read_text())  # before any table
    r = _cc(cfg)
    assert "state_dir: not set" not in r.stderr
    assert f"{site / 'spool-here'} is created on first start" in r.stdout + r.stderr


def test_operational_warnings(site: Path) -> None:
    """An unresolvable smart host, a DSN password in a world-readable config: warnings
    (exit 0), each naming the key and the fix, in the findings' one style."""
    cfg = _write(site, {"relay": {"smart_host": ["smarthost.invalid:587"]},
                        "auth": {"backend": "postgresql",
                                 "dsn": "postgresql://u:s3cret@127.0.0.1:9/db"},
                        "user": UNPRIV})
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(ln.startswith(f"{cfg}: warning: relay.smart_host[0]: smarthost.invalid does "
                             "not resolve") for ln in lines), lines
    assert any(ln.startswith(f"{cfg}: warning: auth.dsn: {cfg} holds a password (auth.dsn)"
                             " and is readable by group and others (mode 0644): chmod 600")
               for ln in lines), lines
    assert "s3cret" not in r.stderr + r.stdout
    os.chmod(cfg, 0o600)
    assert "holds a password" not in _cc(cfg).stderr


def test_metrics_not_on_loopback_warns(site: Path) -> None:
    # /metrics and /health have no authentication: an address every interface or the
    # network reaches passed check-config without a word (":PORT", with no host, binds
    # every address and serve said nothing either).
    for address in ("0.0.0.0:9587", ":9587", "[::]:9587", "192.0.2.1:9587"):
        cfg = _write(site, {"metrics": {"address": address}, "user": UNPRIV})
        r = _cc(cfg)
        assert r.returncode == 0, r.stderr
        assert f"{cfg}: warning: metrics.address: {address} is not loopback: /metrics and " \
               "/health answer anyone who reaches them, with no authentication; use " \
               '"127.0.0.1:9587"' in r.stderr, (address, r.stderr)
    for address in ("127.0.0.1:9587", "[::1]:9587"):
        cfg = _write(site, {"metrics": {"address": address}, "user": UNPRIV})
        assert "metrics.address" not in _cc(cfg).stderr


def test_a_wait_longer_than_attempt_timeout_warns(site: Path) -> None:
    # A config of the release before [delivery] attempt_timeout (1h by default) that gave
    # a slow next hop two hours for the end of data: that wait is now cut at the hour
    # (the message sent again at the next attempt), and check-config said "ok" silently.
    cfg = _write(site, {"delivery": {"data_timeout": "2h"}, "user": UNPRIV})
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: warning: delivery.attempt_timeout: 3600s is shorter than " \
           "delivery.data_timeout (7200s): the attempt's end cuts that wait at 3600s" \
           in r.stderr, r.stderr
    for fine in ({"data_timeout": "2h", "attempt_timeout": "3h"},
                 {"data_timeout": "2h", "attempt_timeout": 0}, {}):
        cfg = _write(site, {"delivery": fine, "user": UNPRIV})
        assert "attempt_timeout" not in _cc(cfg).stderr, fine


def test_config_errors_in_the_findings_style(site: Path) -> None:
    cfg = _write(site, {"limits": {"max_recipients": "many"}})
    for cmd in (["check-config", str(cfg)], ["-c", str(cfg), "serve"],
                ["-c", str(cfg), "queue"]):
        r = subprocess.run([sys.executable, "-m", "authrelay", *cmd], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1, (cmd, r.stderr)
        assert r.stderr.startswith(f"authrelay: {cfg}: error: limits.max_recipients: "), \
            (cmd, r.stderr)


def test_missing_cert_and_key(site: Path) -> None:
    r = _cc(_write(site, {"tls": {"cert": str(site / "no.pem"), "key": str(site / "nok.pem")}}))
    assert r.returncode == 1
    assert f"error: tls.cert: {site}/no.pem: certificate not found" in r.stderr
    assert f"error: tls.key: {site}/nok.pem: key not found" in r.stderr
    assert "1 error" not in r.stderr and "2 errors: serve would not start" in r.stderr


def test_group_readable_key(site: Path) -> None:
    cert, key = _cert(site)
    os.chmod(key, 0o640)
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert r.returncode == 1
    assert "error: tls.key:" in r.stderr and "accessible to group/others" in r.stderr
    assert f"chmod 600 {key}" in r.stderr


def test_expired_certificate_is_an_error_serve_starts_with(site: Path) -> None:
    """serve starts with an expired certificate and warns (d01234b); check-config calls
    it an error (clients that verify refuse it) but does not claim serve would not start."""
    import datetime

    import trustme

    leaf = trustme.CA().issue_cert(
        "relay.test", not_before=datetime.datetime(2019, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    cert, key = site / "old.pem", site / "old.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert r.returncode == 1
    assert f"error: tls.cert: {cert}: expired on 2020-01-01 (serve starts" in r.stderr
    assert "1 error: serve would start, but fix before serving" in r.stderr, r.stderr
    assert "would not start" not in r.stderr
    os.remove(key)  # with an error serve stops at, the summary says so
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert "key not found" in r.stderr and "error: serve would not start" in r.stderr


def test_key_of_another_certificate(site: Path) -> None:
    cert, _ = _cert(site, "a")
    _, key = _cert(site, "b")
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert r.returncode == 1
    assert f"error: tls.key: {key} does not match the certificate {cert}" in r.stderr


def test_not_pem(site: Path) -> None:
    cert, key = _cert(site)
    cert.write_text("hello\n")
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert r.returncode == 1 and "error: tls.cert:" in r.stderr, r.stderr


def _rsa_cert(d: Path, name: str) -> tuple[Path, Path, str]:
    """`authrelay cert make --rsa` into d/name: (cert, key, what it printed)."""
    out = d / name
    r = subprocess.run([sys.executable, "-m", "authrelay", "cert", "make", "--rsa",
                        "--hostname", "relay.test", "--out", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out / "rsa-cert.pem", out / "rsa-key.pem", r.stdout


def test_the_second_pair_is_checked_as_the_first(site: Path) -> None:
    """[tls] second_cert/second_key (an RSA pair beside the ECDSA one, made by `cert make
    --rsa`): each pair is checked (found, key mode, key matches, expiry) under its own
    keys, and two pairs of one key type are an error: OpenSSL would serve only one."""
    import datetime

    import trustme

    ec, ec_key = _cert(site, "ec")
    rsa, rsa_key, printed = _rsa_cert(site, "rsa")
    assert f'second_cert = "{rsa}"\nsecond_key = "{rsa_key}"' in printed
    assert oct(rsa_key.stat().st_mode & 0o777) == "0o600"

    def cc(second: Path, second_key: Path) -> subprocess.CompletedProcess[str]:
        return _cc(_write(site, {"tls": {"cert": str(ec), "key": str(ec_key),
                                         "second_cert": str(second),
                                         "second_key": str(second_key)}}))

    r = cc(rsa, rsa_key)
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok"), r.stderr
    _, other_key, _ = _rsa_cert(site, "rsa2")
    r = cc(rsa, other_key)
    assert r.returncode == 1
    assert f"error: tls.second_key: {other_key} does not match the certificate {rsa}" \
        in r.stderr
    os.chmod(other_key, 0o640)
    r = cc(rsa, other_key)
    assert "error: tls.second_key:" in r.stderr and f"chmod 600 {other_key}" in r.stderr
    r = cc(site / "none.pem", rsa_key)
    assert f"error: tls.second_cert: {site}/none.pem: certificate not found" in r.stderr
    leaf = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "relay.test", key_type=trustme.KeyType.RSA,
        not_before=datetime.datetime(2019, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    old, old_key = site / "old.pem", site / "old.key"
    leaf.cert_chain_pems[0].write_to_path(str(old))
    leaf.private_key_pem.write_to_path(str(old_key))
    old_key.chmod(0o600)
    r = cc(old, old_key)
    assert f"error: tls.second_cert: {old}: expired on 2020-01-01 (serve starts" in r.stderr
    # Two ECDSA pairs: an error naming both, and serve does not start on them.
    ec2, ec2_key = _cert(site, "ec2")
    r = cc(ec2, ec2_key)
    assert r.returncode == 1
    same = (f"tls.second_cert: {ec2} is ECDSA, as tls.cert ({ec}) is: only one "
            "certificate per key type can be served (the second would replace the "
            "first); make this pair RSA (authrelay cert make --rsa) or remove it")
    assert f"error: {same}" in r.stderr, r.stderr
    served = subprocess.run([sys.executable, "-m", "authrelay", "-c",
                             str(site / "authrelay.toml"), "serve"], capture_output=True,
                            text=True, timeout=60)
    assert served.returncode != 0 and same in served.stderr, served.stderr
    # A second certificate without its key, or without the first pair: config errors.
    r = _cc(_write(site, {"tls": {"cert": str(ec), "key": str(ec_key),
                                  "second_cert": str(rsa)}}))
    assert "error: tls.second_cert: needs tls.second_key too" in r.stderr, r.stderr
    r = _cc(_write(site, {"tls": {"second_cert": str(rsa), "second_key": str(rsa_key)}}))
    assert "error: tls.second_cert: needs tls.cert and tls.key" in r.stderr, r.stderr


def test_the_second_pair_printed_by_cert_make_rsa_passes_as_printed(site: Path) -> None:
    """A config without [tls] (serve's self-signed default): what `cert make --rsa`
    prints to paste into [tls] is a config check-config passes, first pair included (the
    self-signed default is not served beside a second pair; old: only second_cert and
    second_key were printed, and check-config then said 'needs tls.cert and tls.key')."""
    cfg = _write(site, {})

    def make(*extra: str) -> str:
        r = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(cfg), "cert",
                            "make", *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    printed = make("--rsa").split("in [tls]:\n", 1)[1]
    tls = site / "state" / "tls"
    assert f"# not made yet: authrelay cert make --out {tls}\n" in printed
    make("--out", str(tls))
    printed = make("--rsa", "--force").split("in [tls]:\n", 1)[1]
    assert "not made yet" not in printed
    cfg.write_text(cfg.read_text() + "\n[tls]\n" + printed)
    r = _cc(cfg)
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok"), r.stderr


def test_cert_make_says_which_pair_goes_beside_an_rsa_certificate(site: Path) -> None:
    """[tls] cert an RSA certificate (certbot before 2.0 made RSA): `cert make --rsa` does
    not tell to serve its pair as second_cert (check-config and serve refuse two RSA pairs;
    old: 'serve it beside the ECDSA certificate' and the second_cert lines), and `cert
    make` prints the ECDSA pair to serve beside it, which check-config passes."""
    rsa, rsa_key, _ = _rsa_cert(site, "first")
    cfg = _write(site, {"tls": {"cert": str(rsa), "key": str(rsa_key)}})

    def make(*extra: str) -> str:
        r = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(cfg), "cert",
                            "make", "--out", str(site / "new"), *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    printed = make("--rsa")
    assert "second_cert" not in printed.replace("second_cert/", ""), printed
    assert f"tls.cert ({rsa}) is RSA already" in printed
    printed = make().split("serve it beside the RSA certificate, in [tls]:\n", 1)[1]
    cfg.write_text(cfg.read_text() + printed)
    r = _cc(cfg)
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok"), r.stderr


def test_port_in_use_names_the_address(site: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = _write(site, {"listen": [{"address": f"127.0.0.1:{port}", "mode": "smtp"}]})
        r = _cc(cfg)
    assert r.returncode == 1
    assert (f"error: listen[0].address: cannot listen on 127.0.0.1:{port} (smtp): "
            "address already in use") in r.stderr


def test_address_not_on_this_machine(site: Path) -> None:
    r = _cc(_write(site, {"listen": [{"address": "192.0.2.1:2587", "mode": "submission"}]}))
    assert r.returncode == 1
    assert "listen[0].address: cannot listen on 192.0.2.1:2587 (submission): not an " \
        "address of this machine" in r.stderr


def test_unknown_user(site: Path) -> None:
    r = _cc(_write(site, {"user": "no-such-user-h12"}))
    assert r.returncode == 1
    assert "error: user: no such user 'no-such-user-h12'" in r.stderr


def test_backend_socket_missing_is_a_warning(site: Path) -> None:
    r = _cc(_write(site, {"auth": {"backend": f"saslauthd:{site}/mux"}}))
    assert r.returncode == 0, r.stderr
    assert f"warning: auth.backend: {site}/mux: no such socket" in r.stderr
    (site / "plain").write_text("")
    r = _cc(_write(site, {"auth": {"backend": f"dovecot:{site}/plain"}}))
    assert r.returncode == 1 and "not a socket" in r.stderr


def test_syntax_only(site: Path) -> None:
    cfg = _write(site, {"user": "no-such-user-h12"})
    r = _cc(cfg, "--syntax")
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok")


def test_privileged_port_as_non_root(site: Path) -> None:
    """Run as an unprivileged user: port 25 cannot be bound, and check-config says why."""
    py = python_for(UNPRIV)
    cfg = _write(site, {"listen": [{"address": "127.0.0.1:25", "mode": "smtp"}],
                        "state_dir": str(site / "st")})
    os.chmod(site, 0o777)
    r = _cc(cfg, python=py, user=UNPRIV)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: listen[0].address: cannot listen on 127.0.0.1:25 (smtp): permission " \
        "denied: ports below 1024 need root" in r.stderr


def test_key_readable_only_by_root(site: Path) -> None:
    """Without `user`, serve run as nobody could not read a root-only key: an error. With
    `user`, serve reads it as root before dropping privileges: fine."""
    py = python_for(UNPRIV)
    cert, key = _cert(site)
    os.chmod(cert.parent, 0o755)
    os.chmod(cert, 0o644)
    os.chmod(site, 0o777)
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)},
                        "state_dir": str(site / "st")})
    r = _cc(cfg, python=py, user=UNPRIV)
    assert r.returncode == 1
    assert f"error: tls.key: {key}: not readable by uid {pwd.getpwnam(UNPRIV).pw_uid}" \
        in r.stderr
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)}, "user": UNPRIV,
                        "state_dir": str(site / "st")})
    r = _cc(cfg)  # as root: the privileged loader's view
    assert r.returncode == 0, r.stderr


def test_root_only_key_needs_a_root_config(site: Path) -> None:
    """The key helper re-reads a root-only key (SIGHUP) only for a config owned by root and
    not writable by others (docs/PRIVILEGES.md): check-config says what to fix."""
    if os.geteuid() != 0:
        pytest.fail("needs root (chown)")
    cert, key = _cert(site)
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)}, "user": UNPRIV,
                        "state_dir": str(site / "st")})
    nobody = pwd.getpwnam(UNPRIV)
    os.chown(cfg, nobody.pw_uid, nobody.pw_gid)
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr  # it starts; only a later reload would fail
    assert f"warning: tls.key: {key}: readable only by root" in r.stderr
    assert "must be owned by root" in r.stderr
    os.chown(cfg, 0, 0)
    os.chmod(cfg, 0o666)
    r = _cc(cfg)
    assert "not writable by group/others" in r.stderr and "mode 0666" in r.stderr
    os.chmod(cfg, 0o600)  # root's and private: the helper serves it; a reload as nobody not
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert "readable only by root" not in r.stderr
    assert f"{cfg}: not readable by user {UNPRIV}: a reload (SIGHUP) would fail" in r.stderr


def _serve(cfg: Path, python: str = sys.executable, user: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    cmd = [python, "-m", "authrelay", "-c", str(cfg), "serve"]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


def test_serve_names_the_address_and_never_tracebacks(site: Path) -> None:
    """What check-config reports, serve refuses with one line naming the culprit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = _serve(_write(site, {"listen": [{"address": f"127.0.0.1:{port}", "mode": "smtp"}],
                                 "state_dir": str(site / "st1")}))
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr, r.stderr
    r = _serve(_write(site, {"user": "no-such-user-h12", "state_dir": str(site / "st2")}))
    assert r.returncode == 1 and "no-such-user-h12" in r.stderr, r.stderr
    r = _serve(_write(site, {"relay": {"smart_host": ["mail.example:subm"]}}))
    assert r.returncode == 1 and "relay.smart_host[0]" in r.stderr


def test_serve_privileged_port_as_non_root(site: Path) -> None:
    py = python_for(UNPRIV)
    os.chmod(site, 0o777)
    cfg = _write(site, {"listen": [{"address": "127.0.0.1:25", "mode": "smtp"}],
                        "state_dir": str(site / "st")})
    r = _serve(cfg, python=py, user=UNPRIV)
    assert r.returncode == 1, r.stderr
    assert "127.0.0.1:25" in r.stderr and "ermission denied" in r.stderr, r.stderr


def test_outbound_tls_findings(site: Path) -> None:
    """[delivery] dnssec with a resolver off this host: a warning (the AD bit can be
    forged on the path); a local one: nothing; a tls_ca_file that is no PEM: an error."""
    cert, key = _cert(site)
    tls = {"cert": str(cert), "key": str(key)}
    r = _cc(_write(site, {"tls": tls, "delivery": {"dnssec": True,
                                                   "nameservers": ["192.0.2.53"]}}))
    assert "delivery.dnssec" in r.stdout + r.stderr and "192.0.2.53" in r.stdout + r.stderr
    r = _cc(_write(site, {"tls": tls, "delivery": {"dnssec": True,
                                                   "nameservers": ["127.0.0.1:53"]}}))
    assert r.returncode == 0 and "delivery.dnssec" not in r.stdout + r.stderr
    bad = site / "ca.pem"
    bad.write_text("not a certificate\n")
    os.chmod(bad, 0o644)
    r = _cc(_write(site, {"tls": tls, "delivery": {"tls_ca_file": str(bad)}}))
    assert r.returncode != 0 and "delivery.tls_ca_file" in r.stdout + r.stderr


def test_app_passwords_require_with_an_external_backend_warns(site: Path) -> None:
    cert, key = _cert(site)
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)},
                        "auth": {"backend": f"dovecot:{site / 'auth-client'}",
                                 "app_passwords": "require"}})
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert f'{cfg}: warning: auth.app_passwords: "require" does nothing with backend ' \
        "dovecot" in r.stderr


def test_sign_unowned_warns(site: Path) -> None:
    cert, key = _cert(site)
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)},
                        "dkim": {"sign_unowned": True}})
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: warning: dkim.sign_unowned: every authenticated user's mail is " \
        "signed whatever its From: says" in r.stderr
    r = _cc(_write(site, {"tls": {"cert": str(cert), "key": str(key)}}))
    assert "sign_unowned" not in r.stderr


def test_external_backend_with_keys_notes_unsigned_logins(site: Path) -> None:
    cert, key = _cert(site)
    cfg = _write(site, {"tls": {"cert": str(cert), "key": str(key)},
                        "auth": {"backend": f"saslauthd:{site / 'mux'}"}})
    subprocess.run([sys.executable, "-m", "authrelay", "-c", str(cfg), "dkim", "keygen",
                    "example.test", "--algorithm", "ed25519"], check=True,
                   capture_output=True, timeout=60)
    r = _cc(cfg)
    assert "note: dkim.sign_unowned: with backend saslauthd a user owns only its login " \
        "when that is an address" in r.stdout, r.stdout + r.stderr


def test_oauth_smart_host_without_verified_tls(site: Path) -> None:
    """An OAuth token sent at a level that does not verify the smart host (none: in clear;
    encrypt, may: to whoever answers) is warned about; the default level is not."""
    cert, key = _cert(site)
    secret = site / "m365.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    relay = {"smart_host": ["smtp.office365.com:587"], "smart_host_user": "r@example.org",
             "smart_host_auth": "xoauth2",
             "smart_host_oauth_token_url": "https://login.example/token",
             "smart_host_oauth_client_id": "app", "smart_host_oauth_scope": "s",
             "smart_host_oauth_secret_file": str(secret)}
    tls = {"cert": str(cert), "key": str(key)}
    r = _cc(_write(site, {"tls": tls, "relay": {**relay, "smart_host_tls": "none"}}))
    assert "warning: relay.smart_host_tls: level none: the OAuth token for " \
        "smtp.office365.com:587 goes in clear text" in r.stderr
    r = _cc(_write(site, {"tls": tls, "relay": {**relay, "smart_host_tls": "encrypt"}}))
    assert "warning: relay.smart_host_tls: level encrypt: the OAuth token for " \
        "smtp.office365.com:587 goes to whoever answers" in r.stderr
    r = _cc(_write(site, {"tls": tls, "relay": relay}))
    assert "relay.smart_host_tls" not in r.stdout + r.stderr


def test_local_recipients_findings(site: Path) -> None:
    """A local domain that accepts any local part from anyone (backscatter) is a warning
    without local_recipients_file; the file is loaded as serve loads it (its error, the
    line named), must be readable by `user`, and a local domain it names nobody at is a
    warning. README "Port 25: mail for the local domains"."""
    cert, key = _cert(site)
    tls = {"cert": str(cert), "key": str(key)}
    cfg = _write(site, {"tls": tls, "relay": {"local_domains": ["a.test", "b.test"]}})
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: warning: relay.local_domains: a.test, b.test: any local part is " \
        "accepted from anyone and relayed on" in r.stderr, r.stderr
    assert "list the valid recipients in local_recipients_file" in r.stderr
    rcpts = site / "recipients"
    relay = {"local_domains": ["a.test", "b.test", "c.test"],
             "local_recipients_file": str(rcpts)}
    cfg = _write(site, {"tls": tls, "relay": relay, "user": UNPRIV})
    r = _cc(cfg)
    assert r.returncode == 1
    assert f"{cfg}: error: relay.local_recipients_file: {rcpts}: cannot read: No such " \
        "file or directory" in r.stderr, r.stderr
    rcpts.write_text("bob@a.test\n@b.test\nx@elsewhere.test\nbad@@a.test\n")
    r = _cc(cfg)
    assert f"{rcpts}: line 4: 'bad@@a.test': bad address syntax" in r.stderr, r.stderr
    rcpts.write_text("bob@a.test\n@b.test\nx@elsewhere.test\n")
    os.chmod(rcpts, 0o600)  # root's: serve reads it as `user` after the drop
    r = _cc(cfg)
    if os.geteuid() == 0:
        assert f"{cfg}: error: relay.local_recipients_file: {rcpts}: not readable by " \
            f"{UNPRIV}" in r.stderr, r.stderr
    os.chmod(rcpts, 0o644)
    r = _cc(cfg)
    assert r.returncode == 0, r.stderr
    assert "relay.local_domains: " not in r.stderr
    assert f"warning: relay.local_recipients_file: local domain c.test: no entry in " \
        f"{rcpts}: every recipient there but postmaster is refused" in r.stderr, r.stderr
    assert f"warning: relay.local_recipients_file: {rcpts}: entries at elsewhere.test, " \
        "which is not in local_domains" in r.stderr, r.stderr
    assert "note: relay.local_recipients_file: b.test: any local part is accepted" \
        in r.stdout + r.stderr
