"""Inbound TLS as a scanner and an attacker see it, against a real `authrelay serve`:
465 (implicit TLS) and STARTTLS on 587 and 25.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import trustme
from relayproc import RelayProcess
from smtpclient import RawClient, client_ctx
from support import ci, hellos
from support.certs import install_cert

pytestmark = pytest.mark.slow


def tls12_only() -> ssl.SSLContext:
    ctx = client_ctx()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@pytest.mark.parametrize("mode", ["submission", "smtp"])
def test_a_failed_starttls_handshake_is_logged_with_its_reason(relay_factory,  # noqa: ANN001
                                                               mode: str) -> None:
    """A client refused by `[tls] min_version` (or for its ciphers) after STARTTLS gets a
    tls_failed line saying why, as on 465: before, only 'disconnect ... starttls=1', so an
    operator raising min_version could not see which clients it turned away."""
    r: RelayProcess = relay_factory({"tls": {"min_version": "1.3"}})
    with RawClient(r.ports[mode], source="127.0.0.5") as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO client.example").code == 250
        assert c.cmd("STARTTLS").code == 220
        with pytest.raises((ssl.SSLError, OSError)):
            c.starttls(tls12_only())
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.5\]")
    assert f"reason=handshake failed: UNSUPPORTED_PROTOCOL, listener={mode}:" in line
    # The same client on 465 gets the same reason.
    s = socket.create_connection(("127.0.0.1", r.ports["submissions"]),
                                 source_address=("127.0.0.6", 0))
    with pytest.raises((ssl.SSLError, OSError)):
        tls12_only().wrap_socket(s)
    s.close()
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.6\]")
    assert "reason=handshake failed: UNSUPPORTED_PROTOCOL" in line
    assert "Traceback" not in r.maillog()


ALERT_NO_APPLICATION_PROTOCOL = bytes((21, 3, 3, 0, 2, 2, 120))  # fatal, 120 (RFC 7301)


def client_hello(alpn: list[str] | None) -> bytes:
    """A real ClientHello (Python's ssl, as a client sends it), in its first records."""
    ctx = client_ctx()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return hellos.client_hello(ctx)


def handshake_refused(port: int, ctx: ssl.SSLContext, source: str, starttls: bool,
                      alert: str) -> None:
    """A real client's handshake (after EHLO and STARTTLS on 587/25) ends with the
    server's `alert` (ssl's words: 'alert handshake failure')."""
    with RawClient(port, source=source) as c:
        if starttls:
            c.reply()
            c.cmd("EHLO client.example")
            c.cmd("STARTTLS")
        with pytest.raises(ssl.SSLError, match=alert):
            c.starttls(ctx)


def fragmented(records: bytes, size: int) -> bytes:
    """The same handshake bytes in records of `size` octets (a man in the middle may
    re-frame them: the record layer is not authenticated before the keys)."""
    assert records[0] == 22
    body = records[5:]
    return b"".join(b"\x16\x03\x01" + len(body[i:i + size]).to_bytes(2, "big")
                    + body[i:i + size] for i in range(0, len(body), size))


def send_hello(c: RawClient, hello: bytes, starttls: bool) -> None:
    """`hello` as the client's first TLS bytes (after EHLO and STARTTLS on 587/25)."""
    if starttls:
        assert c.reply().code == 220
        assert c.cmd("EHLO client.example").code == 250
        assert c.cmd("STARTTLS").code == 220
    c.send(hello)
    c.sock.settimeout(30)


def answer(port: int, hello: bytes, source: str, starttls: bool) -> bytes:
    """The server's first bytes (or b'' at its close) after `hello`."""
    with RawClient(port, source=source) as c:
        send_hello(c, hello, starttls)
        return c.sock.recv(7)


@pytest.mark.parametrize("mode", ["submissions", "submission", "smtp"])
def test_alpaca_a_client_naming_only_other_protocols_is_refused(relay_factory,  # noqa: ANN001
                                                               mode: str) -> None:
    """ALPACA: a browser (ALPN http/1.1, h2) reaching 465 directly, or 587/25 through a man
    in the middle who did the STARTTLS part, gets RFC 7301 3.2's fatal
    no_application_protocol alert and nothing else: no byte of its request is read as
    SMTP. Before, the handshake went on without ALPN. Clients offering "smtp" get it;
    those offering none are served as always."""
    r: RelayProcess = relay_factory()
    port, starttls = r.ports[mode], mode != "submissions"
    # A real client's refusal, and the maillog line.
    ctx = client_ctx()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    handshake_refused(port, ctx, "127.0.0.7", starttls, "alert no application protocol")
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.7\]")
    assert ("reason=handshake failed: NO_APPLICATION_PROTOCOL (client offered ALPN h2, "
            f"http/1.1), listener={mode}:") in line
    # The same ClientHello in one record, in 2 and in 32 records of its own framing.
    hello = client_hello(["http/1.1"])
    for size in (16384, len(hello) // 2 + 1, len(hello) // 31):
        assert answer(port, fragmented(hello, size), "127.0.0.8", starttls) \
            == ALERT_NO_APPLICATION_PROTOCOL, size
    # "smtp" among others is chosen; no ALPN is fine.
    for alpn, chosen in ((["h2", "smtp"], "smtp"), (None, None)):
        ctx = client_ctx()
        if alpn:
            ctx.set_alpn_protocols(alpn)
        with RawClient(port, source="127.0.0.9") as c:
            if starttls:
                c.reply()
                c.cmd("EHLO client.example")
                c.cmd("STARTTLS")
            c.starttls(ctx)
            assert isinstance(c.sock, ssl.SSLSocket)
            assert c.sock.selected_alpn_protocol() == chosen
            if not starttls:
                assert c.reply().code == 220
            assert c.cmd("EHLO client.example").code == 250
    assert "Traceback" not in r.maillog()


def big_hello(extensions: int, alpn: bytes | None, groups: str = "0017001d",
              tls13: bool = False, version: bytes = b"\x03\x03") -> bytes:
    """A TLS 1.2 ClientHello with `extensions` empty extensions of unassigned types
    (0x3000...: 20 KB in two records for 5,000), and ALPN `alpn` (one name) if given."""
    def ext(kind: int, data: bytes) -> bytes:
        return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data

    g = bytes.fromhex(groups)  # default: secp256r1, x25519
    exts = ext(10, len(g).to_bytes(2, "big") + g)
    exts += ext(11, b"\x01\x00") + ext(13, bytes.fromhex("0006040308040401"))
    if alpn:
        exts += ext(16, (len(alpn) + 1).to_bytes(2, "big") + bytes([len(alpn)]) + alpn)
    exts += b"".join(ext(0x3000 + i, b"") for i in range(extensions))
    suites = bytes.fromhex("c02bc02cc02fc030")
    if tls13:  # TLS 1.3 only, an X25519 key share (RFC 8446 4.2.1, 4.2.8)
        suites = bytes.fromhex("13011302")
        share = b"\x00\x1d\x00\x20" + os.urandom(32)
        exts += ext(43, b"\x02\x03\x04") + ext(51, len(share).to_bytes(2, "big") + share)
    body = (version + bytes(32) + b"\x00" + len(suites).to_bytes(2, "big") + suites
            + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts)
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return fragmented(b"\x16\x03\x01\x00\x00" + msg, 16384)


@pytest.mark.parametrize("mode", ["submissions", "submission"])
def test_a_16k_client_hello_with_thousands_of_extensions(relay_factory,  # noqa: ANN001
                                                        mode: str) -> None:
    """A ClientHello of 16 KiB+ (5,000 extensions, two records) is read whole: answered
    with a ServerHello, or the ALPN alert when its ALPN names another protocol."""
    r: RelayProcess = relay_factory()
    port, starttls = r.ports[mode], mode != "submissions"
    hello = big_hello(5000, None)
    assert len(hello) > 16384 + 5
    first = answer(port, hello, "127.0.0.10", starttls)
    assert first[:1] == b"\x16" and first[5:6] == b"\x02", first  # ServerHello
    assert answer(port, big_hello(5000, b"http/1.1"), "127.0.0.10", starttls) \
        == ALERT_NO_APPLICATION_PROTOCOL


def write_pair(d: Path, name: str, **validity: datetime.datetime) -> tuple[str, str]:
    import trustme

    leaf = trustme.CA().issue_cert("relay.test", "127.0.0.1", **validity)
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return str(cert), str(key)


def test_an_expired_certificate_is_one_warning_per_start_and_reload(  # noqa: ANN201
        relay_factory, tmp_path: Path):  # noqa: ANN001
    """serve started (and reloaded) with an expired certificate without a word: every
    client that checks certificates failed and the maillog never said why (check-config
    alone knew). Now one warning at start and at each reload that keeps serving one (the
    master only, whatever the workers), none for a valid certificate; it is still served."""
    utc = datetime.UTC
    cert, key = write_pair(tmp_path, "old", not_before=datetime.datetime(2019, 1, 1, tzinfo=utc),
                           not_after=datetime.datetime(2020, 1, 1, tzinfo=utc))
    r: RelayProcess = relay_factory({"tls": {"cert": cert, "key": key}}, workers=2)
    warning = "warning=TLS certificate expired on 2020-01-01 00:00 UTC: clients that check"
    r.wait_log(r"daemon=started \(master\)")
    assert r.maillog().count(warning) == 1
    assert f"cert={cert}" in r.wait_log(re.escape(warning))
    with RawClient(r.ports["submission"]) as c:  # served all the same
        c.reply()
        c.cmd("EHLO client.example")
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx())
        assert c.cmd("EHLO client.example").code == 250
    assert r.proc is not None
    before = r.maillog().count("daemon=reloaded")
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + 3)
    assert r.maillog().count(warning) == 2
    new_cert, new_key = write_pair(tmp_path, "new")
    r.config.write_text(r.config.read_text().replace(cert, new_cert).replace(key, new_key))
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + 6)
    assert r.maillog().count("warning=TLS certificate") == 2


HRR_RANDOM = bytes.fromhex(  # RFC 8446 4.1.3: a ServerHello with it is a HelloRetryRequest
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def server_hello(port: int, hello: bytes, starttls: bool) -> bytes:
    """The server's answer's first record, from its header (b'' when it closed)."""
    with RawClient(port, source="127.0.0.11") as c:
        send_hello(c, hello, starttls)
        head = c.sock.recv(5, socket.MSG_WAITALL)
        if len(head) < 5:
            return head
        return head + c.sock.recv(int.from_bytes(head[3:5], "big"), socket.MSG_WAITALL)


@pytest.mark.parametrize("mode", ["submissions", "submission"])
def test_key_exchange_groups(relay_factory, mode: str) -> None:  # noqa: ANN001
    """The server context had P-256 as its one group, so every TLS 1.3 client whose key
    share is X25519 (OpenSSL's, BoringSSL's, NSS's, Go's, rustls's first) was sent a
    HelloRetryRequest and paid a round trip more, and a client with X25519 alone could
    not connect. Now X25519 is answered in kind, P-256 still; finite-field groups stay
    out (ffdhe8192 alone: refused, no 8192-bit exponentiation per handshake)."""
    r: RelayProcess = relay_factory()
    port, starttls = r.ports[mode], mode != "submissions"
    # OpenSSL's own ClientHello (x25519 key share): a ServerHello, not a retry.
    first = server_hello(port, client_hello(None), starttls)
    assert first[:1] == b"\x16" and first[5:6] == b"\x02", first
    assert first[11:43] != HRR_RANDOM  # header 5, type 1, length 3, version 2: random
    # X25519 alone (TLS 1.3: in 1.2 an ECDSA P-256 certificate needs P-256 offered),
    # P-256 alone.
    for hello in (big_hello(0, None, "001d", tls13=True), big_hello(0, None, "0017")):
        first = server_hello(port, hello, starttls)
        assert first[:1] == b"\x16" and first[5:6] == b"\x02", first
        assert first[11:43] != HRR_RANDOM
    assert server_hello(port, big_hello(0, None, "0104"), starttls)[:1] != b"\x16"
    assert "Traceback" not in r.maillog()


PROTOCOL_VERSION_ALERT = bytes((21, 3, 3, 0, 2, 2, 70))  # fatal, protocol_version


@pytest.mark.parametrize("mode", ["submissions", "submission"])
def test_a_client_too_old_gets_the_protocol_version_alert(relay_factory,  # noqa: ANN001
                                                          mode: str) -> None:
    """RFC 8446 4.1.3 / RFC 5246 E.1: a client whose versions are all below the minimum
    gets the protocol_version alert. asyncio drops the alert OpenSSL makes when a
    handshake fails, so such a client saw a bare close ('unexpected EOF') and its user
    no hint why. The maillog line is as before."""
    r: RelayProcess = relay_factory({"tls": {"min_version": "1.3"}})
    port, starttls = r.ports[mode], mode != "submissions"
    for version in (b"\x03\x01", b"\x03\x02", b"\x03\x03"):  # TLS 1.0, 1.1, 1.2
        assert answer(port, big_hello(0, None, version=version), "127.0.0.12", starttls) \
            == PROTOCOL_VERSION_ALERT, version
    # A real client says why.
    handshake_refused(port, tls12_only(), "127.0.0.13", starttls, "alert protocol version")
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.13\]")
    assert f"reason=handshake failed: UNSUPPORTED_PROTOCOL, listener={mode}:" in line
    # TLS 1.3 itself goes on (its ClientHello names 1.3 in supported_versions).
    first = server_hello(port, client_hello(None), starttls)
    assert first[:1] == b"\x16" and first[5:6] == b"\x02", first


class TwoPairs(NamedTuple):
    """An ECDSA and an RSA leaf for relay.test / 127.0.0.1, each under its own
    intermediate of one root (`root`: the only CA a client trusts, so a verified
    handshake proves the server sent the right intermediate)."""

    root: Path
    ecdsa: tuple[str, str]
    rsa: tuple[str, str]
    chain: dict[str, list[bytes]]  # "ECDSA"/"RSA": the leaf and its intermediate (DER)
    cas: dict[str, trustme.CA]  # "ECDSA"/"RSA": the intermediate


def install_two_pairs(d: Path) -> TwoPairs:
    root = trustme.CA()
    d.mkdir(parents=True, exist_ok=True)
    root.cert_pem.write_to_path(str(d / "root.pem"))
    paths: dict[str, tuple[str, str]] = {}
    chain: dict[str, list[bytes]] = {}
    cas: dict[str, trustme.CA] = {}
    for kind, key_type in (("ECDSA", trustme.KeyType.ECDSA), ("RSA", trustme.KeyType.RSA)):
        ca = cas[kind] = root.create_child_ca(key_type=key_type)
        cert, key, leaf = install_cert(ca, d / kind.lower(), key_type=key_type)
        paths[kind] = (str(cert), str(key))
        chain[kind] = [leaf, ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())]
    return TwoPairs(d / "root.pem", paths["ECDSA"], paths["RSA"], chain, cas)


def verifying_ctx(root: Path, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that trusts only `root`; `ciphers`: TLS 1.2 with these suites only."""
    ctx = ssl.create_default_context(cafile=str(root))
    ctx.check_hostname = False  # RawClient.starttls sends no name; the chain is checked
    if ciphers is not None:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
    return ctx


def served_leaf(r: RelayProcess, mode: str, ctx: ssl.SSLContext) -> bytes:
    """The leaf certificate (DER) a verified handshake gets on `mode`'s port."""
    if mode == "submissions":
        with RawClient(r.ports[mode], tls=ctx) as c:
            assert c.reply().code == 220
            der = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    else:
        with RawClient(r.ports[mode]) as c:
            c.reply()
            c.cmd("EHLO client.example")
            assert c.cmd("STARTTLS").code == 220
            c.starttls(ctx)
            assert c.cmd("EHLO client.example").code == 250
            der = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert der
    return bytes(der)


RSA_ONLY_TLS12 = "ECDHE-RSA-AES128-GCM-SHA256"
ECDSA_ONLY_TLS12 = "ECDHE-ECDSA-AES128-GCM-SHA256"


def s_client_chain(r: RelayProcess, mode: str, root: Path, *args: str) -> list[bytes]:
    """The chain (DER, leaf first) openssl s_client gets, verified against `root`;
    `args`: its -sigalgs, -cipher, version options."""
    ci.require_tool("openssl", "openssl")
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{r.ports[mode]}", "-showcerts",
           "-CAfile", str(root), "-verify_return_error", *args]
    if mode != "submissions":
        cmd += ["-starttls", "smtp"]
    done = subprocess.run(cmd, input=b"QUIT\r\n", capture_output=True, timeout=30,
                          check=False)
    out = done.stdout.decode()
    assert done.returncode == 0 and "Verify return code: 0 (ok)" in out, \
        out + done.stderr.decode()
    return [ssl.PEM_cert_to_DER_cert(pem) for pem in re.findall(
        r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)]


@pytest.mark.parametrize("mode", ["submissions", "submission"])
def test_an_ecdsa_and_an_rsa_certificate_side_by_side(relay_factory,  # noqa: ANN001
                                                      tmp_path: Path, mode: str) -> None:
    """[tls] second_cert/second_key: a second pair of the other key type is served beside
    the first, each with its own intermediate. A client that can verify only RSA (TLS
    1.2 ECDHE-RSA suites, or RSA signature algorithms) gets the RSA certificate, one
    that can verify only ECDSA gets the ECDSA one, on 465 and after STARTTLS. Before,
    one certificate was served: an ECDSA one turned RSA-only clients away."""
    p = install_two_pairs(tmp_path / "certs")
    r: RelayProcess = relay_factory({"tls": {"cert": p.ecdsa[0], "key": p.ecdsa[1],
                                             "second_cert": p.rsa[0],
                                             "second_key": p.rsa[1]}})
    # Python's ssl: TLS 1.2 suites of one signature kind; TLS 1.3 (ECDSA preferred).
    rsa, ecdsa = p.chain["RSA"][0], p.chain["ECDSA"][0]
    assert served_leaf(r, mode, verifying_ctx(p.root, RSA_ONLY_TLS12)) == rsa
    assert served_leaf(r, mode, verifying_ctx(p.root, ECDSA_ONLY_TLS12)) == ecdsa
    assert served_leaf(r, mode, verifying_ctx(p.root)) == ecdsa
    # openssl s_client: TLS 1.3 restricted by signature algorithms, TLS 1.2 by suite;
    # the chain sent is the leaf and its own intermediate. X25519 (the twin context) and
    # P-256 alone (the context itself) alike.
    rsa_sigalgs = "rsa_pss_rsae_sha256:rsa_pkcs1_sha256"
    for args, kind in ((("-tls1_3", "-sigalgs", rsa_sigalgs), "RSA"),
                       (("-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256"), "ECDSA"),
                       (("-tls1_3", "-groups", "P-256", "-sigalgs", rsa_sigalgs), "RSA"),
                       (("-tls1_3", "-groups", "P-256"), "ECDSA"),
                       (("-tls1_2", "-cipher", RSA_ONLY_TLS12), "RSA"),
                       (("-tls1_2", "-cipher", ECDSA_ONLY_TLS12), "ECDSA")):
        assert s_client_chain(r, mode, p.root, *args) == p.chain[kind], args
    assert "Traceback" not in r.maillog()


def test_a_reload_swaps_one_pair_and_each_is_warned_about(relay_factory,  # noqa: ANN001
                                                         tmp_path: Path) -> None:
    """SIGHUP reloads both pairs: a renewed RSA pair (certbot's rename over the old files)
    is served to RSA-only clients by every worker, the ECDSA one stays; an expired second
    certificate is one warning naming it at start and at each reload that keeps it; a
    reload onto two pairs of one key type fails and keeps both running."""
    p = install_two_pairs(tmp_path / "certs")
    rsa_dir = Path(p.rsa[0]).parent
    utc = datetime.UTC
    _, _, expired = install_cert(p.cas["RSA"], rsa_dir, key_type=trustme.KeyType.RSA,
                                 not_before=datetime.datetime(2019, 1, 1, tzinfo=utc),
                                 not_after=datetime.datetime(2020, 1, 1, tzinfo=utc))
    r: RelayProcess = relay_factory({"tls": {"cert": p.ecdsa[0], "key": p.ecdsa[1],
                                             "second_cert": p.rsa[0],
                                             "second_key": p.rsa[1]}}, workers=2)
    warning = "warning=TLS certificate expired on 2020-01-01 00:00 UTC: clients that check"
    assert f"cert={p.rsa[0]}" in r.wait_log(re.escape(warning))
    r.wait_log(r"daemon=started \(master\)")
    assert r.maillog().count(warning) == 1
    rsa_only, ecdsa_only = tls12_only(), tls12_only()
    rsa_only.set_ciphers(RSA_ONLY_TLS12)
    ecdsa_only.set_ciphers(ECDSA_ONLY_TLS12)
    for mode in ("submissions", "submission"):  # served all the same, expired
        assert served_leaf(r, mode, rsa_only) == expired
    assert r.proc is not None
    before = r.maillog().count("daemon=reloaded")
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + 3)
    assert r.maillog().count(warning) == 2
    _, _, renewed = install_cert(p.cas["RSA"], rsa_dir, key_type=trustme.KeyType.RSA)
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + 6)
    assert r.maillog().count(warning) == 2
    for _ in range(4):  # connections spread over both workers (SO_REUSEPORT)
        for mode in ("submissions", "submission"):
            assert served_leaf(r, mode, verifying_ctx(p.root, RSA_ONLY_TLS12)) == renewed
            assert served_leaf(r, mode, ecdsa_only) == p.chain["ECDSA"][0]
    # Two ECDSA pairs: the reload fails, both running pairs stay.
    r.config.write_text(r.config.read_text().replace(p.rsa[0], p.ecdsa[0])
                        .replace(p.rsa[1], p.ecdsa[1]))
    os.kill(r.proc.pid, signal.SIGHUP)
    line = r.wait_log("daemon=reload failed")
    assert f"tls.second_cert: {p.ecdsa[0]} is ECDSA, as tls.cert ({p.ecdsa[0]}) is" in line
    assert served_leaf(r, "submissions", rsa_only) == renewed
    assert "Traceback" not in r.maillog()


HANDSHAKE_FAILURE_ALERT = bytes((21, 3, 3, 0, 2, 2, 40))  # fatal, handshake_failure


@pytest.mark.parametrize("mode", ["submissions", "submission"])
def test_a_client_with_nothing_in_common_gets_the_handshake_failure_alert(  # noqa: ANN201
        relay_factory, mode: str):  # noqa: ANN001
    """A client sharing no cipher suite or group with the server (an RSA-only client
    when one ECDSA certificate is served; one with only P-384) saw a bare close
    ('unexpected EOF': asyncio drops the alert OpenSSL makes; so did a TLS 1.3 client
    accepting only RSA signatures), and the maillog said only NO_SHARED_CIPHER (or
    NO_SUITABLE_SIGNATURE_ALGORITHM). Now it gets OpenSSL's handshake_failure alert, and
    the maillog line says what is missing."""
    r: RelayProcess = relay_factory()  # the self-signed ECDSA certificate
    port, starttls = r.ports[mode], mode != "submissions"
    rsa_only = tls12_only()
    rsa_only.set_ciphers(RSA_ONLY_TLS12)
    handshake_refused(port, rsa_only, "127.0.0.14", starttls, "alert handshake failure")
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.14\]")
    assert ("reason=handshake failed: NO_SHARED_CIPHER (the client's TLS 1.2 suites need "
            f"an RSA certificate; this server has ECDSA), listener={mode}:") in line
    p384 = client_ctx()
    p384.set_ecdh_curve("secp384r1")  # a client's groups: P-384 alone
    assert answer(port, hellos.client_hello(p384), "127.0.0.15", starttls) \
        == HANDSHAKE_FAILURE_ALERT
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.15\]")
    assert "reason=handshake failed: NO_SUITABLE_KEY_SHARE (client offered groups P-384; " \
        "this server has P-256, X25519)" in line
    # TLS 1.3, RSA signatures only (openssl s_client): the alert, and why.
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-sigalgs",
           "rsa_pss_rsae_sha256"] + (["-starttls", "smtp"] if starttls else [])
    done = subprocess.run(cmd, input=b"", capture_output=True, timeout=30, check=False)
    assert done.returncode != 0
    assert b"alert handshake failure" in done.stderr, done.stderr
    line = r.wait_log(r"tls_failed=.*NO_SUITABLE_SIGNATURE")  # (s_client: 127.0.0.1)
    assert ("reason=handshake failed: NO_SUITABLE_SIGNATURE_ALGORITHM (client accepts "
            "signatures rsa_pss_rsae_sha256; this server's ECDSA certificate signs "
            "ecdsa_secp256r1_sha256)") in line
    # A client with something in common goes on (TLS 1.2, an ECDSA suite).
    ecdsa_only = tls12_only()
    ecdsa_only.set_ciphers(ECDSA_ONLY_TLS12)
    assert served_leaf(r, mode, ecdsa_only)
    assert "Traceback" not in r.maillog()


def _cut_handshake(port: int, source: str, *, starttls: bool, reset: bool
                   ) -> socket.socket:
    """Send a whole ClientHello, and once the server answers it, reset the connection or
    close our side of it (a FIN only: the socket, whose unread handshake records would
    make a close a reset, is returned open)."""
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0),
                                 timeout=20)
    if starttls:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO client.example\r\n")
        while not (ln := f.readline()).startswith(b"250 "):
            assert ln.startswith(b"250-"), ln
        s.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
    s.sendall(hellos.client_hello(client_ctx()))
    assert s.recv(1) == b"\x16"  # the server's handshake record: it is at it
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
    else:
        s.shutdown(socket.SHUT_WR)
    return s


def test_a_client_leaving_in_the_handshake_is_logged_as_such(relay_factory  # noqa: ANN001
                                                             ) -> None:
    """A client that closes the connection in the TLS handshake (465, or after STARTTLS)
    was logged `reason=handshake failed: ConnectionResetError`, as if it had reset it:
    now its close is `the client closed the connection (eof)` and a reset `connection
    reset by the client`."""
    r: RelayProcess = relay_factory()
    cases = {"127.0.0.40": ("submissions", False), "127.0.0.41": ("submission", False),
             "127.0.0.42": ("submissions", True), "127.0.0.43": ("submission", True)}
    socks = [_cut_handshake(r.ports[mode], src, starttls=mode == "submission", reset=reset)
             for src, (mode, reset) in cases.items()]
    try:
        for src, (mode, reset) in cases.items():
            line = r.wait_log(rf"tls_failed=from unknown \[{re.escape(src)}\]")
            why = "connection reset by the client" if reset \
                else "the client closed the connection (eof)"
            assert f"reason=handshake failed: {why}, listener={mode}:" in line, line
    finally:
        for s in socks:
            s.close()
    assert "Traceback" not in r.maillog()
