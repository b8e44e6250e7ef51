"""`authrelay doctor` against a loopback DNS server with zones that are right, and zones
broken one way at a time: each breakage is reported by its own check, precisely, and the
others stay green. Real parts: dnslib DNS server, pyspf evaluating the records, aiosmtpd
smart host with STARTTLS and AUTH, trustme certificates."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authrelay.config import Config, from_dict
from authrelay.dkim.doctor import Check, Doctor
from authrelay.dkim.keys import KeyStore
from authrelay.tls import make_self_signed

pytestmark = pytest.mark.slow

HOST = "relay.example.test"
IP = "192.0.2.10"
DOMAIN = "example.test"


def base_zones(keys: list) -> dict[str, Any]:  # noqa: ANN001
    z: dict[str, Any] = {
        # SPF for the HELO name: bounces (null sender) are checked against it.
        HOST: {"A": [IP], "TXT": [f"v=spf1 ip4:{IP} -all"]},
        "10.2.0.192.in-addr.arpa": {"PTR": [HOST]},
        # SPF through an include, so pyspf must follow it.
        DOMAIN: {"TXT": ["v=spf1 include:_spf.example.test ~all", "google-site-verify=x"]},
        "_spf.example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=none; rua=mailto:postmaster@example.test"]},
    }
    for k in keys:
        z[k.record_name] = {"TXT": [k.txt_strings()]}
    return z


@pytest.fixture(scope="module")
def generated_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RSA and Ed25519 keys, generated once per module (RSA generation is slow)."""
    d = tmp_path_factory.mktemp("dkimkeys") / "dkim"
    store = KeyStore(d)
    store.generate(DOMAIN, "s-rsa", "rsa")
    store.generate(DOMAIN, "s-ed25519", "ed25519")
    return d


@pytest.fixture
def setup(tmp_path: Path, dns_server, trustme_ca, generated_keys: Path) -> dict[str, Any]:  # noqa: ANN001
    shutil.copytree(generated_keys, tmp_path / "dkim")  # each test its own copy
    keys = sorted(KeyStore(tmp_path / "dkim").load().for_domain(DOMAIN),
                  key=lambda k: k.selector != "s-rsa")  # [RSA, Ed25519], as generated
    leaf = trustme_ca.issue_cert(HOST)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    dns_server.set_zones(base_zones(keys))
    return {"keys": keys, "tmp": tmp_path, "ca": trustme_ca}


def cfg_for(tmp: Path, dns_server, **extra: Any) -> Config:  # noqa: ANN001
    data: dict[str, Any] = {
        "hostname": HOST, "state_dir": str(tmp), "public_addresses": [IP],
        "tls": {"cert": str(tmp / "cert.pem"), "key": str(tmp / "key.pem")},
        "delivery": {"nameservers": [dns_server.nameserver], "dns_timeout": "3s"},
    }
    data.update(extra)
    return from_dict(data)


async def doctor(cfg: Config) -> dict[str, Check]:
    return {c.check: c for c in await Doctor(cfg).run()}


def failing(res: dict[str, Check]) -> dict[str, Check]:
    return {k: c for k, c in res.items() if not c.ok}


async def test_right_zones_all_pass(setup: dict, dns_server) -> None:  # noqa: ANN001
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert failing(res) == {}
    assert set(res) == {
        "hostname", f"fcrdns {IP}", f"spf {DOMAIN}", f"dmarc {DOMAIN}", "tls",
        f"spf helo {HOST}",
        f"dkim s-rsa._domainkey.{DOMAIN}", f"dkim s-ed25519._domainkey.{DOMAIN}",
    }
    assert res[f"fcrdns {IP}"].detail == f"{IP} -> {HOST} -> {IP}"
    assert res[f"spf {DOMAIN}"].detail == f"pass for {IP}"
    assert res[f"dmarc {DOMAIN}"].detail == "p=none; alignment by DKIM and SPF"
    assert res[f"spf helo {HOST}"].detail == f"pass for {IP}"
    # pyspf asked OUR server for the include (not the system resolver).
    assert ("_spf.example.test", "TXT") in dns_server.queries


def _set(dns_server, name: str, value: Any) -> None:  # noqa: ANN001
    if value is None:
        dns_server.zones.pop(name, None)
    else:
        dns_server.update({name: value})


@pytest.mark.parametrize("name,value,check,detail,fix", [
    ("10.2.0.192.in-addr.arpa", None, f"fcrdns {IP}", f"{IP} has no PTR record",
     f"ask the owner of {IP} (your hosting provider) to set its PTR to {HOST}"),
    ("10.2.0.192.in-addr.arpa", {"PTR": ["vps-1.hoster.test"]}, f"fcrdns {IP}",
     f"PTR of {IP} is vps-1.hoster.test, not {HOST}", "to set its PTR to"),
    (DOMAIN, {"TXT": ["google-site-verify=x"]}, f"spf {DOMAIN}",
     f"{DOMAIN} has no SPF record", f'publish {DOMAIN}. IN TXT "v=spf1 ip4:{IP} ~all"'),
    ("_spf.example.test", {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]}, f"spf {DOMAIN}",
     f'"v=spf1 include:_spf.example.test ~all": softfail for {IP}', f"authorise {IP}"),
    ("_spf.example.test", {"TXT": ["v=spf1 include:_spf.example.test -all"]}, f"spf {DOMAIN}",
     "permerror for", "in the SPF record"),
    ("_spf.example.test", "SERVFAIL", f"spf {DOMAIN}", "temperror for", ""),
    (HOST, {"A": [IP]}, f"spf helo {HOST}",
     f"{HOST} has no SPF record (bounces, sent with a null sender, are checked against "
     "the HELO name)", f'publish {HOST}. IN TXT "v=spf1 ip4:{IP} -all"'),
    (HOST, {"A": [IP], "TXT": ["v=spf1 ip4:198.51.100.7 -all"]}, f"spf helo {HOST}",
     f'"v=spf1 ip4:198.51.100.7 -all": fail for {IP}', f"publish {HOST}. IN TXT"),
    ("s-rsa._domainkey.example.test", None, f"dkim s-rsa._domainkey.{DOMAIN}",
     "no key published: the name does not exist (NXDOMAIN)",
     "publish s-rsa._domainkey.example.test. IN TXT \"v=DKIM1; k=rsa; p="),
    ("s-ed25519._domainkey.example.test",
     {"TXT": ["v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]},
     f"dkim s-ed25519._domainkey.{DOMAIN}", "the published key differs from the local one",
     "publish s-ed25519._domainkey.example.test. IN TXT"),
    ("s-ed25519._domainkey.example.test", {"TXT": ["v=DKIM1; k=ed25519; p="]},
     f"dkim s-ed25519._domainkey.{DOMAIN}", "the published key is revoked (empty p=)", ""),
    ("_dmarc.example.test", None, f"dmarc {DOMAIN}", f"no DMARC record at _dmarc.{DOMAIN}",
     f'publish _dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"'),
    ("_dmarc.example.test", {"TXT": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]},
     f"dmarc {DOMAIN}", "2 DMARC records at _dmarc.example.test", "keep exactly one"),
    ("_dmarc.example.test", {"TXT": ["v=DMARC1; rua=mailto:x@example.test"]},
     f"dmarc {DOMAIN}", "p= missing or invalid", "publish _dmarc"),
])
async def test_each_breakage_reported_precisely(setup: dict, dns_server, name: str,  # noqa: ANN001
                                                value: Any, check: str, detail: str,
                                                fix: str) -> None:
    _set(dns_server, name, value)
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    bad = failing(res)
    assert set(bad) == {check}, {k: c.line() for k, c in bad.items()}
    assert detail in bad[check].detail, bad[check].line()
    assert fix in bad[check].fix, bad[check].line()


async def test_ptr_name_does_not_resolve_back(setup: dict, dns_server) -> None:  # noqa: ANN001
    _set(dns_server, HOST, {"A": ["192.0.2.99"], "TXT": [f"v=spf1 ip4:{IP} -all"]})
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert set(failing(res)) == {f"fcrdns {IP}"}
    c = res[f"fcrdns {IP}"]
    assert c.detail == f"PTR of {IP} is {HOST}, but {HOST} resolves to 192.0.2.99"
    assert c.fix == f"publish {HOST}. IN A {IP}"


async def test_hostname_missing(setup: dict, dns_server) -> None:  # noqa: ANN001
    _set(dns_server, HOST, None)
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert set(failing(res)) == {"hostname", f"fcrdns {IP}", f"spf helo {HOST}"}
    assert res["hostname"].detail == f"{HOST}: the name does not exist (NXDOMAIN)"


async def test_no_alignment_possible(setup: dict, dns_server) -> None:  # noqa: ANN001
    for k in setup["keys"]:
        _set(dns_server, k.record_name, None)
    _set(dns_server, "_spf.example.test", {"TXT": ["v=spf1 -all"]})
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert res[f"dmarc {DOMAIN}"].detail == \
        f"p=none, but neither DKIM nor SPF can align for {DOMAIN}"
    assert "fail for 192.0.2.10" in res[f"spf {DOMAIN}"].detail
    # Only the published DKIM key: DMARC still passes (alignment by DKIM alone).
    _set(dns_server, setup["keys"][0].record_name, {"TXT": [setup["keys"][0].txt_strings()]})
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert res[f"dmarc {DOMAIN}"].ok and res[f"dmarc {DOMAIN}"].detail.endswith("by DKIM")


async def test_dmarc_of_the_parent_domain(setup: dict, dns_server) -> None:  # noqa: ANN001
    store = KeyStore(setup["tmp"] / "dkim")
    k = store.generate("news.example.test", "n1", "ed25519")
    _set(dns_server, k.record_name, {"TXT": [k.txt_strings()]})
    _set(dns_server, "news.example.test", {"TXT": ["v=spf1 ip4:192.0.2.10 -all"]})
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert failing(res) == {}
    assert res["dmarc news.example.test"].detail == \
        "p=none (at _dmarc.example.test); alignment by DKIM and SPF"


@pytest.mark.parametrize("kind,detail", [
    ("other-name", "does not cover relay.example.test (names: mail.other.test)"),
    ("expiring", "expires in 9 days"),
    ("expired", "expired on"),
    ("self-signed", "is self-signed"),
])
async def test_tls_problems(setup: dict, dns_server, kind: str, detail: str) -> None:  # noqa: ANN001
    tmp, ca = setup["tmp"], setup["ca"]
    now = dt.datetime.now(dt.UTC)
    if kind == "self-signed":
        make_self_signed(HOST, tmp / "ss")
        cfg = cfg_for(tmp, dns_server, tls={"cert": str(tmp / "ss" / "cert.pem"),
                                           "key": str(tmp / "ss" / "key.pem")})
    else:
        if kind == "other-name":
            leaf = ca.issue_cert("mail.other.test")
        elif kind == "expiring":
            leaf = ca.issue_cert(HOST, not_after=now + dt.timedelta(days=9, hours=12))
        else:
            leaf = ca.issue_cert(HOST, not_before=now - dt.timedelta(days=90),
                                 not_after=now - dt.timedelta(days=1))
        leaf.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        cfg = cfg_for(tmp, dns_server)
    res = await doctor(cfg)
    assert set(failing(res)) == {"tls"}
    assert detail in res["tls"].detail and "from a CA" in res["tls"].fix


async def test_the_second_certificate_is_checked_too(setup: dict, dns_server) -> None:  # noqa: ANN001
    """[tls] second_cert (the RSA one beside the ECDSA one) gets its own check: before,
    only [tls] cert was looked at, and an RSA certificate for another name went unsaid."""
    import trustme

    tmp, ca = setup["tmp"], setup["ca"]
    leaf = ca.issue_cert("mail.other.test", key_type=trustme.KeyType.RSA)
    leaf.cert_chain_pems[0].write_to_path(str(tmp / "rsa.pem"))
    leaf.private_key_pem.write_to_path(str(tmp / "rsa.key"))
    tls = {"cert": str(tmp / "cert.pem"), "key": str(tmp / "key.pem"),
           "second_cert": str(tmp / "rsa.pem"), "second_key": str(tmp / "rsa.key")}
    res = await doctor(cfg_for(tmp, dns_server, tls=tls))
    assert set(failing(res)) == {"tls second_cert"}
    assert res["tls second_cert"].detail == (
        f"{tmp / 'rsa.pem'}: does not cover {HOST} (names: mail.other.test)")
    # The fix names the second pair's keys, not the first's (old: "set [tls] cert/key").
    assert "set [tls] second_cert/second_key, renew" in res["tls second_cert"].fix
    assert res["tls"].ok
    (tmp / "rsa.pem").unlink()
    res = await doctor(cfg_for(tmp, dns_server, tls=tls))
    assert res["tls second_cert"].fix == (
        "set [tls] second_cert/second_key (authrelay cert make --rsa)")


async def test_wildcard_certificate_covers_hostname(setup: dict, dns_server) -> None:  # noqa: ANN001
    setup["ca"].issue_cert("*.example.test").cert_chain_pems[0].write_to_path(
        str(setup["tmp"] / "cert.pem"))
    res = await doctor(cfg_for(setup["tmp"], dns_server))
    assert res["tls"].ok, res["tls"].line()


async def test_smart_host_auth(setup: dict, dns_server, fake_mx, trustme_ca_file: Path) -> None:  # noqa: ANN001
    from support.certs import server_tls_context

    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(setup["ca"], "127.0.0.2"),
                 require_starttls=True, users={"relayuser": "s3cret"})
    pw = setup["tmp"] / "pw"
    pw.write_text("s3cret\n")
    relay = {"smart_host": [f"127.0.0.2:{sh.port}"], "smart_host_user": "relayuser",
             "smart_host_password_file": str(pw), "smart_host_ca_file": str(trustme_ca_file)}
    # SPF is then about the smart host's address: authorise it.
    _set(dns_server, "_spf.example.test", {"TXT": ["v=spf1 ip4:127.0.0.2 -all"]})
    res = await doctor(cfg_for(setup["tmp"], dns_server, relay=relay))
    assert failing(res) == {}, {k: c.line() for k, c in failing(res).items()}
    name = f"smarthost 127.0.0.2:{sh.port}"
    assert res[name].detail == "answers and accepts AUTH as relayuser"
    assert res[f"spf {DOMAIN}"].detail == "pass for 127.0.0.2 (smart host)"

    pw.write_text("wrong\n")
    res = await doctor(cfg_for(setup["tmp"], dns_server, relay=relay))
    assert set(failing(res)) == {name}
    assert res[name].detail.startswith("AUTH refused: 535")
    assert res[name].fix == "check relay.smart_host_user and smart_host_password_file"

    sh.stop()  # nothing listening any more
    res = await doctor(cfg_for(setup["tmp"], dns_server, relay=relay))
    assert set(failing(res)) == {name}
    assert res[name].detail.startswith("connect failed")


@pytest.mark.slow
def test_cli_exit_status_and_json(setup: dict, dns_server) -> None:  # noqa: ANN001
    tmp = setup["tmp"]
    (tmp / "a.toml").write_text(
        f'hostname = "{HOST}"\nstate_dir = "{tmp}"\npublic_addresses = ["{IP}"]\n'
        f'[tls]\ncert = "{tmp / "cert.pem"}"\nkey = "{tmp / "key.pem"}"\n'
        f'[delivery]\nnameservers = ["{dns_server.nameserver}"]\ndns_timeout = "3s"\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(tmp / "a.toml"),
                               "doctor", *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8"})

    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(line.startswith("\u2714 ") for line in r.stdout.splitlines()), r.stdout
    assert len(r.stdout.splitlines()) == 8
    _set(dns_server, "_dmarc.example.test", None)
    r = run("--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert [d["check"] for d in data if not d["ok"]] == [f"dmarc {DOMAIN}"]
    assert set(data[0]) == {"check", "ok", "detail", "fix"}
    r = run()
    assert r.returncode == 1
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("\u2717"))
    assert line == (f"\u2717 dmarc {DOMAIN}: no DMARC record at _dmarc.{DOMAIN} -- fix: "
                    f'publish _dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none; '
                    f'rua=mailto:postmaster@{DOMAIN}"')


async def test_smart_host_name_through_the_configured_nameservers(
        setup: dict, dns_server, fake_mx, trustme_ca_file: Path) -> None:  # noqa: ANN001
    """A smart host named by a name only the loopback DNS server knows: found through
    `[delivery] nameservers` (as delivery finds it), its certificate verified for the
    name; a name it does not know is reported as such."""
    from support.certs import server_tls_context

    sh = fake_mx("127.0.0.2",
                 starttls_context=server_tls_context(setup["ca"], "smart.example.test"),
                 require_starttls=True, users={"relayuser": "s3cret"})
    _set(dns_server, "smart.example.test", {"A": ["127.0.0.2"]})
    _set(dns_server, "_spf.example.test", {"TXT": ["v=spf1 ip4:127.0.0.2 -all"]})
    pw = setup["tmp"] / "pw"
    pw.write_text("s3cret\n")
    relay = {"smart_host": [f"smart.example.test:{sh.port}"], "smart_host_user": "relayuser",
             "smart_host_password_file": str(pw), "smart_host_ca_file": str(trustme_ca_file),
             "smart_host_tls": "verify"}
    res = await doctor(cfg_for(setup["tmp"], dns_server, relay=relay))
    assert failing(res) == {}, {k: c.line() for k, c in failing(res).items()}
    assert res[f"smarthost smart.example.test:{sh.port}"].detail == \
        "answers and accepts AUTH as relayuser"
    assert f"spf helo {HOST}" not in res  # with a smart host its HELO is what is seen
    relay["smart_host"] = [f"nosuch.example.test:{sh.port}"]
    res = await doctor(cfg_for(setup["tmp"], dns_server, relay=relay))
    name = f"smarthost nosuch.example.test:{sh.port}"
    assert res[name].detail == ("nosuch.example.test through [delivery] nameservers: the "
                                "name does not exist (NXDOMAIN)"), res[name].line()
