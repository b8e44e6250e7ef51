"""`authrelay dkim keygen|list|dns` and `authrelay dns` as an admin runs them."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dkimcheck import dkim_zones
from support import ci

from authrelay.dkim.keys import KeyStore

pytestmark = pytest.mark.slow


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(tmp / "a.toml"), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"})


def write_cfg(tmp: Path, extra: str = "") -> None:
    (tmp / "a.toml").write_text(
        'hostname = "relay.example.org"\n'
        f'state_dir = "{tmp / "var"}"\n'
        'public_addresses = ["192.0.2.10", "2001:db8::10"]\n'
        + extra +
        '[[listen]]\naddress = "0.0.0.0:587"\nmode = "submission"\n'
        '[[listen]]\naddress = "0.0.0.0:465"\nmode = "submissions"\n')


def test_keygen_both_list_and_dns(tmp_path: Path) -> None:
    write_cfg(tmp_path)
    r = run(tmp_path, "dkim", "keygen", "Example.ORG", "--selector", "202611")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r'202611-rsa\._domainkey\.example\.org\. IN TXT '
                        r'"v=DKIM1; k=rsa; p=[A-Za-z0-9+/]{237}" "[A-Za-z0-9+/=]+"', lines[0])
    assert re.fullmatch(r'202611-ed25519\._domainkey\.example\.org\. IN TXT '
                        r'"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="', lines[1])
    keydir = tmp_path / "var" / "dkim" / "example.org"
    for f in ("202611-rsa.key", "202611-ed25519.key"):
        st = (keydir / f).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    # The same selector again: refused, nothing overwritten.
    before = (keydir / "202611-rsa.key").read_bytes()
    r2 = run(tmp_path, "dkim", "keygen", "example.org", "--selector", "202611")
    assert r2.returncode == 1 and "exists" in r2.stderr
    assert (keydir / "202611-rsa.key").read_bytes() == before

    r = run(tmp_path, "dkim", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"example.org\t202611-ed25519\ted25519-256\t{keydir / '202611-ed25519.key'}",
        f"example.org\t202611-rsa\trsa-2048\t{keydir / '202611-rsa.key'}",
    ]
    r = run(tmp_path, "dkim", "dns", "example.org")
    assert r.returncode == 0 and sorted(r.stdout.splitlines()) == sorted(lines)
    r = run(tmp_path, "dkim", "dns", "nokey.test")
    assert r.returncode == 1 and "authrelay dkim keygen nokey.test" in r.stderr

    r = run(tmp_path, "dns")
    assert r.returncode == 0, r.stderr
    out = [ln for ln in r.stdout.splitlines() if not ln.startswith(";")]
    assert "relay.example.org. IN A 192.0.2.10" in out
    assert "relay.example.org. IN AAAA 2001:db8::10" in out
    assert "10.2.0.192.in-addr.arpa. IN PTR relay.example.org." in out
    assert any(ln.endswith(".8.b.d.0.1.0.0.2.ip6.arpa. IN PTR relay.example.org.") for ln in out)
    assert set(lines) <= set(out)
    assert 'example.org. IN TXT "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 ~all"' in out
    # SPF for the HELO name: bounces (null sender) are checked against it (RFC 7208 2.3).
    assert 'relay.example.org. IN TXT "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 -all"' in out
    assert ('_dmarc.example.org. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.org"'
            in out)
    assert "_submission._tcp.example.org. IN SRV 0 1 587 relay.example.org." in out
    assert "_submissions._tcp.example.org. IN SRV 0 1 465 relay.example.org." in out


def test_keygen_single_algorithm_and_default_selector(tmp_path: Path) -> None:
    write_cfg(tmp_path)
    r = run(tmp_path, "dkim", "keygen", "other.test", "--algorithm", "ed25519")
    assert r.returncode == 0, r.stderr
    keys = KeyStore(tmp_path / "var" / "dkim").load().all()
    assert [(k.domain, k.algorithm) for k in keys] == [("other.test", "ed25519")]
    assert re.fullmatch(r"20\d\d(0[1-9]|1[0-2])", keys[0].selector)
    r = run(tmp_path, "dkim", "keygen", "not_a_domain")
    assert r.returncode == 1 and "not a domain name" in r.stderr


@pytest.mark.external
def test_opendkim_testkey_agrees(tmp_path: Path, dns_server) -> None:  # noqa: ANN001
    """OpenDKIM's own tool reads our RSA key file and our published record (from the
    loopback DNS server, through libunbound) and finds they match; a different key does
    not. (opendkim-testkey 2.11 handles RSA keys only; Ed25519 records are checked by
    dkimpy's verifier in test_dkim_signer.py / test_e2e_dkim.py.)"""
    ci.require_tool("opendkim-testkey", "opendkim-tools")
    write_cfg(tmp_path)
    assert run(tmp_path, "dkim", "keygen", "example.org", "--selector", "s").returncode == 0
    store = KeyStore(tmp_path / "var" / "dkim").load()
    other = KeyStore(tmp_path / "other").generate("example.org", "x", "rsa")
    dns_server.set_zones(dkim_zones(store.all()))
    (tmp_path / "unbound.conf").write_text(
        "server:\n  do-not-query-localhost: no\n"
        f'forward-zone:\n  name: "."\n  forward-addr: 127.0.0.1@{dns_server.port}\n')
    (tmp_path / "opendkim.conf").write_text(
        f"ResolverConfiguration {tmp_path / 'unbound.conf'}\n")

    def testkey(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["opendkim-testkey", "-vvv", "-x", str(tmp_path / "opendkim.conf"),
                               "-d", "example.org", "-s", "s-rsa", "-k", str(path)],
                              capture_output=True, text=True, timeout=60)

    rsa = next(k for k in store.all() if k.algorithm == "rsa")
    r = testkey(rsa.path)
    assert r.returncode == 0 and "key OK" in r.stdout + r.stderr, r.stdout + r.stderr
    assert ("s-rsa._domainkey.example.org", "TXT") in dns_server.queries
    r = testkey(other.path)
    assert r.returncode != 0 and "key OK" not in r.stdout + r.stderr


def test_dns_with_smart_host_uses_its_include(tmp_path: Path) -> None:
    write_cfg(tmp_path, '[relay]\nsmart_host = ["smtp.provider.example:587"]\n')
    r = run(tmp_path, "dns", "example.org")
    assert r.returncode == 0, r.stderr
    assert 'example.org. IN TXT "v=spf1 include:provider.example ~all"' in r.stdout
    assert "-all" not in r.stdout  # the smart host's HELO is seen, not ours: no HELO SPF
    assert "dkim keygen example.org" in r.stdout  # no key yet: says how to make one


def test_check_config_reports_dkim_key_problems(tmp_path: Path) -> None:
    from authrelay.checkconfig import check
    from authrelay.config import from_dict

    cfg = from_dict({"state_dir": str(tmp_path / "var"),
                     "dkim": {"domains": ["example.org", "missing.test"]}})
    k = KeyStore(cfg.dkim_dir).generate("example.org", "s", "ed25519")

    def dkim_findings() -> list[str]:
        return sorted(str(f) for f in check(cfg) if f.key.startswith("dkim"))

    assert dkim_findings() == [f"warning: dkim.domains: missing.test has no key in "
                               f"{cfg.dkim_dir}: authrelay dkim keygen missing.test"]
    k.path.chmod(0o644)
    (k.path.parent / "bad.key").write_text("junk")
    found = dkim_findings()
    assert len(found) == 3
    assert any(f.startswith(f"warning: dkim: {k.path}: mode 0644") for f in found)
    assert any(f.startswith(f"warning: dkim: {k.path.parent / 'bad.key'}: not a PEM")
               for f in found)


@pytest.mark.root
def test_keygen_as_root_gives_the_key_to_the_run_user(tmp_path: Path) -> None:
    """Started as root with `user = "nobody"`, the server reads the keys after dropping
    privileges: keygen makes the key and its directories nobody's, mode 0600/0700."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    write_cfg(tmp_path, 'user = "nobody"\n')
    r = run(tmp_path, "dkim", "keygen", "example.org", "--algorithm", "ed25519", "--selector", "n")
    assert r.returncode == 0, r.stderr
    key = tmp_path / "var" / "dkim" / "example.org" / "n.key"
    for p, mode in ((key, 0o600), (key.parent, 0o700), (key.parent.parent, 0o700)):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
            (nobody.pw_uid, nobody.pw_gid, mode), p


def test_keygen_as_root_never_follows_a_link_in_the_run_users_dkim_dir(
        tmp_path: Path) -> None:
    # state_dir/dkim is the run user's: that user (or whoever took the daemon over) could
    # put a symlink where keygen's domain directory goes; root's keygen then chowned the
    # link's target (here a root directory standing for /etc) to the run user and wrote
    # the key inside it. Now refused, naming the link; the target is left as it was.
    import pwd

    nobody = pwd.getpwnam("nobody")
    write_cfg(tmp_path, 'user = "nobody"\n')
    target = tmp_path / "etc"
    target.mkdir(mode=0o755)
    dkim = tmp_path / "var" / "dkim"
    dkim.mkdir(parents=True)
    os.chown(dkim, nobody.pw_uid, nobody.pw_gid)
    os.symlink(target, dkim / "example.org")
    r = run(tmp_path, "dkim", "keygen", "example.org", "--algorithm", "ed25519", "--selector", "n")
    assert r.returncode == 1
    assert r.stderr == f"authrelay: {dkim / 'example.org'} is not a directory (a symbolic " \
                       "link?): remove it\n", r.stderr
    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert list(target.iterdir()) == []


def test_an_internationalised_domain_written_as_the_config_allows(tmp_path: Path) -> None:
    """`[dkim] domains` and the signer take `bücher.example` as its A-label; keygen, list,
    dkim dns, dns and check-config take it the same way, so the admin's one spelling works
    throughout and the records are in the zone's ASCII form."""
    write_cfg(tmp_path, '[dkim]\ndomains = ["Bücher.example"]\n')
    r = run(tmp_path, "dkim", "keygen", "bücher.example", "--selector", "s1",
            "--algorithm", "ed25519")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("s1._domainkey.xn--bcher-kva.example. IN TXT ")
    keyfile = tmp_path / "var" / "dkim" / "xn--bcher-kva.example" / "s1.key"
    assert keyfile.exists()
    # the signer finds it: the key the running server would sign this domain's mail with
    assert [k.path for k in KeyStore(tmp_path / "var" / "dkim").load()
            .for_domain("bücher.example")] == [keyfile]

    r = run(tmp_path, "dkim", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"xn--bcher-kva.example\ts1\ted25519-256\t{keyfile}\n"  # not "unused"
    r = run(tmp_path, "dkim", "dns", "BÜCHER.example.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("s1._domainkey.xn--bcher-kva.example. IN TXT ")
    for args in (("dns",), ("dns", "bücher.example")):
        r = run(tmp_path, *args)
        assert r.returncode == 0, r.stderr
        assert "s1._domainkey.xn--bcher-kva.example. IN TXT" in r.stdout
        assert "_dmarc.xn--bcher-kva.example. IN TXT" in r.stdout
        assert not any(not ln.isascii() for ln in r.stdout.splitlines()
                       if ln and not ln.startswith(";")), r.stdout
    r = run(tmp_path, "check-config")
    assert "has no key" not in r.stdout + r.stderr
    # a name IDNA2003 maps onto another (ß -> ss) is refused, never filed under the other
    r = run(tmp_path, "dkim", "keygen", "boß.example", "--algorithm", "ed25519")
    assert r.returncode == 1 and "not a domain name" in r.stderr
    assert not (tmp_path / "var" / "dkim" / "boss.example").exists()


def test_dns_output_loads_in_bind_and_refuses_what_is_no_domain(tmp_path: Path) -> None:
    # A DOMAIN with a space or a newline was printed as the owner of every record: the
    # zone lines then failed to load, or a newline added records of the caller's choice
    # ("evil.org. IN NS x" after it). Now it is refused (exit 1, nothing printed); the
    # output for real domains loads in BIND's own checker.
    checkzone = ci.require_tool("named-checkzone", "bind9-utils")
    write_cfg(tmp_path)
    assert run(tmp_path, "dkim", "keygen", "example.org").returncode == 0
    for bad in ("ex ample.org", "example.org.\nevil.example. IN NS x", "a..b"):
        r = run(tmp_path, "dns", bad)
        assert r.returncode == 1 and r.stdout == "", (bad, r.stdout)
        assert r.stderr == f"authrelay: {bad!r} is not a domain name\n"
        r = run(tmp_path, "doctor", bad)
        assert r.returncode == 1 and r.stderr == f"authrelay: {bad!r} is not a domain name\n"
    r = run(tmp_path, "dns", "example.org")
    assert r.returncode == 0, r.stderr
    # In the zone of example.org: its own records and the relay's host name (PTRs are
    # the address owner's, not this zone's).
    body = "\n".join(ln for ln in r.stdout.splitlines()
                     if ln.startswith(";") or ".arpa." not in ln)
    zone = tmp_path / "example.org.zone"
    zone.write_text("$TTL 3600\n@ IN SOA ns.example.org. hostmaster.example.org. "
                    "1 3600 600 86400 60\n@ IN NS ns.example.org.\nns IN A 192.0.2.1\n"
                    + body + "\n")
    out = subprocess.run([checkzone, "example.org", str(zone)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
