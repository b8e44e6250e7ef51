"""tlsmatch / tls.hello_refusal against OpenSSL itself: real ClientHellos (Python's ssl
and openssl s_client as clients) handed to the server context in memory. Where the
prediction refuses, OpenSSL refuses too, for the same reason and with the same alert;
where OpenSSL completes the handshake, nothing is refused."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from support import ci, hellos
from support.certs import install_cert

from authrelay import tls
from authrelay.config import Config

T12, T13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.ServerContext]:
    """Server contexts as serve builds them: ECDSA only, RSA only, both."""
    import trustme

    d = tmp_path_factory.mktemp("pairs")
    ca = trustme.CA()
    ec = install_cert(ca, d / "ec", key_type=trustme.KeyType.ECDSA)
    rsa = install_cert(ca, d / "rsa", key_type=trustme.KeyType.RSA)
    ed = ed25519_pair(d / "ed")
    out = {}
    for name, first, second in (("ECDSA", ec, None), ("RSA", rsa, None),
                                ("ECDSA+RSA", ec, rsa), ("Ed25519", ed, None)):
        t = dataclasses.replace(Config().tls, cert=str(first[0]), key=str(first[1]),
                                second_cert=str(second[0]) if second else "",
                                second_key=str(second[1]) if second else "")
        out[name] = tls.server_context(dataclasses.replace(Config(), tls=t))
    return out


def ed25519_pair(d: Path) -> tuple[Path, Path]:
    """A self-signed Ed25519 certificate and key (trustme makes none)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, None))
    d.mkdir()
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / "key.pem").chmod(0o600)
    return d / "cert.pem", d / "key.pem"


def python_hello(*, maximum: ssl.TLSVersion | None = None,
                 minimum: ssl.TLSVersion | None = None, ciphers: str | None = None,
                 curve: str | None = None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if minimum is not None:
        ctx.minimum_version = minimum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if curve is not None:
        ctx.set_ecdh_curve(curve)
    return hellos.client_hello(ctx)


def s_client_hello(*args: str) -> bytes:
    """The ClientHello openssl s_client sends with `args` (to a loopback listener that
    reads it whole and closes)."""
    ci.require_tool("openssl", "openssl")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        got: list[bytes] = []

        def read() -> None:
            conn, _ = srv.accept()
            with conn:
                data = b""
                while not data or tls.read_hello(data).need > len(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)

        t = threading.Thread(target=read)
        t.start()
        subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                       input=b"", capture_output=True, timeout=30, check=False)
        t.join(30)
    return got[0]


def openssl_answer(ctx: tls.ServerContext, hello: bytes) -> tuple[str | None, bytes]:
    """What OpenSSL makes of `hello` in the context serve would pick: (None, first
    flight) when the handshake goes on, (reason, the bytes it sends) when it fails."""
    server = tls.for_hello(ctx, tls.read_hello(hello))
    inp, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = server.wrap_bio(inp, out, server_side=True)
    inp.write(hello)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return None, out.read()
    except ssl.SSLError as e:
        return str(e.reason), out.read()
    return None, out.read()


def check(ctx: tls.ServerContext, hello: bytes) -> str | None:
    """The prediction's reason (None: not refused), after checking it against OpenSSL."""
    refusal = tls.hello_refusal(tls.read_hello(hello), ctx)
    reason, sent = openssl_answer(ctx, hello)
    if refusal is None:
        return None
    assert reason is not None, f"refused, but OpenSSL goes on: {refusal.reason}"
    assert refusal.reason.startswith(f"handshake failed: {reason} ("), (refusal, reason)
    assert sent == refusal.alert == tls.HANDSHAKE_FAILURE_ALERT
    return refusal.reason.removeprefix("handshake failed: ")


OK = [  # (server, hello maker): handshakes that go on, never refused
    ("ECDSA", lambda: python_hello()),
    ("ECDSA", lambda: python_hello(maximum=T12)),
    ("RSA", lambda: python_hello(maximum=T12)),
    ("ECDSA+RSA", lambda: python_hello(maximum=T12, ciphers="ECDHE-RSA-AES128-GCM-SHA256")),
    ("ECDSA+RSA", lambda: python_hello(maximum=T12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")),
    ("ECDSA", lambda: python_hello(curve="prime256v1")),
    ("ECDSA", lambda: python_hello(curve="X25519")),
    ("ECDSA", lambda: python_hello(maximum=T12, curve="prime256v1")),
    ("ECDSA", lambda: s_client_hello("-tls1_3", "-groups", "P-384:P-256")),
    ("ECDSA+RSA", lambda: s_client_hello("-tls1_2", "-groups", "X25519")),
    ("RSA", lambda: s_client_hello("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256")),
    ("ECDSA+RSA", lambda: s_client_hello("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256")),
    ("ECDSA+RSA", lambda: s_client_hello("-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256")),
    ("RSA", lambda: s_client_hello("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha512:ed25519")),
    ("Ed25519", lambda: s_client_hello("-tls1_3", "-sigalgs", "ed25519")),
    # An Ed25519 certificate signs for the TLS 1.2 ECDSA suites (RFC 8422 5.1.1).
    ("Ed25519", lambda: python_hello(maximum=T12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")),
]


@pytest.mark.parametrize(("server", "hello"), OK, ids=range(len(OK)))
def test_handshakes_openssl_completes_are_not_refused(servers, server, hello) -> None:  # noqa: ANN001
    assert check(servers[server], hello()) is None
    assert openssl_answer(servers[server], hello())[0] is None


REFUSED = [  # (server, hello maker, the reason's start)
    ("ECDSA", lambda: python_hello(maximum=T12, ciphers="ECDHE-RSA-AES128-GCM-SHA256"),
     "NO_SHARED_CIPHER (the client's TLS 1.2 suites need an RSA certificate; this server "
     "has ECDSA)"),
    ("RSA", lambda: python_hello(maximum=T12, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"),
     "NO_SHARED_CIPHER (the client's TLS 1.2 suites need an ECDSA certificate; this "
     "server has RSA)"),
    # TLS 1.3 clients that accept only signatures no certificate here can make.
    ("ECDSA", lambda: s_client_hello("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"),
     "NO_SUITABLE_SIGNATURE_ALGORITHM (client accepts signatures rsa_pss_rsae_sha256; "
     "this server's ECDSA certificate signs ecdsa_secp256r1_sha256)"),
    ("RSA", lambda: s_client_hello("-sigalgs", "ECDSA+SHA256:ECDSA+SHA384:RSA+SHA256"),
     "NO_SUITABLE_SIGNATURE_ALGORITHM (client accepts signatures ecdsa_secp256r1_sha256, "
     "ecdsa_secp384r1_sha384, rsa_pkcs1_sha256; this server's RSA certificate signs "
     "rsa_pss_rsae_sha256"),
    ("ECDSA", lambda: s_client_hello("-tls1_3", "-sigalgs", "ecdsa_secp384r1_sha384"),
     "NO_SUITABLE_SIGNATURE_ALGORITHM (client accepts signatures ecdsa_secp384r1_sha384;"),
    ("Ed25519", lambda: python_hello(maximum=T12, ciphers="ECDHE-RSA-AES256-GCM-SHA384"),
     "NO_SHARED_CIPHER (the client's TLS 1.2 suites need an RSA certificate; this "
     "server has Ed25519)"),
    ("ECDSA+RSA", lambda: python_hello(maximum=T12, ciphers="AES128-SHA"),
     "NO_SHARED_CIPHER (no cipher suite in common)"),
    # Finite-field DHE is never usable: no DH parameters are loaded (tlsmatch.Offer.of).
    ("RSA", lambda: python_hello(maximum=T12, ciphers="DHE-RSA-AES128-GCM-SHA256"),
     "NO_SHARED_CIPHER (no cipher suite in common)"),
    ("ECDSA", lambda: python_hello(curve="secp384r1"),
     "NO_SUITABLE_KEY_SHARE (client offered groups P-384; this server has P-256, X25519)"),
    ("ECDSA", lambda: python_hello(minimum=T13, curve="secp521r1"),
     "NO_SUITABLE_KEY_SHARE (client offered groups P-521;"),
    ("ECDSA", lambda: python_hello(maximum=T12, curve="secp384r1"),
     "NO_SHARED_CIPHER (client offered groups P-384; this server has P-256, X25519)"),
    ("ECDSA+RSA", lambda: s_client_hello("-groups", "ffdhe2048:ffdhe8192"),
     "NO_SUITABLE_KEY_SHARE (client offered groups ffdhe2048, ffdhe8192;"),
    # (s_client leaves out the suites its signature algorithms cannot verify.)
    ("ECDSA", lambda: s_client_hello("-tls1_2", "-sigalgs", "RSA+SHA256"),
     "NO_SHARED_CIPHER (the client's TLS 1.2 suites need an RSA certificate"),
    ("ECDSA", lambda: s_client_hello("-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_SHA256"),
     "NO_SHARED_CIPHER (no TLS 1.3 cipher suite in common)"),
    ("ECDSA", lambda: s_client_hello("-ciphersuites", "TLS_AES_128_CCM_SHA256", "-cipher",
                                     "ECDHE-ECDSA-AES128-GCM-SHA256"),
     "NO_SHARED_CIPHER (no TLS 1.3 cipher suite in common)"),
]


@pytest.mark.parametrize(("server", "hello", "reason"), REFUSED, ids=range(len(REFUSED)))
def test_hellos_openssl_refuses_get_its_alert_and_reason(servers, server, hello,  # noqa: ANN001
                                                         reason: str) -> None:
    """Each of these was a bare close (asyncio drops OpenSSL's alert): now the
    handshake_failure alert OpenSSL would send and its reason, saying what is missing."""
    got = check(servers[server], hello())
    assert got is not None and got.startswith(reason), got


def test_not_judged_failures_keep_openssls_way(servers) -> None:  # noqa: ANN001
    """Failures the prediction does not judge (TLS 1.2: the certificate's curve) are
    left to OpenSSL, as before: no refusal, OpenSSL fails."""
    for server, hello in (
            ("ECDSA", s_client_hello("-tls1_2", "-groups", "X25519")),):  # P-256 cert
        assert check(servers[server], hello) is None
        assert openssl_answer(servers[server], hello)[0] is not None


def test_a_system_config_capping_tls_at_1_2_is_respected(tmp_path: Path) -> None:
    """A system OpenSSL config with `MaxProtocol = TLSv1.2` (openssl.cnf; here through
    OPENSSL_CONF in a child process, as serve would read it) makes OpenSSL answer a client
    offering TLS 1.3 and 1.2 in TLS 1.2. The prediction assumed TLS 1.3 whenever the client
    offered it: a client whose TLS 1.3 suites the server lacks (TLS_AES_128_CCM_SHA256
    only), but with TLS 1.2 suites it has, was refused with handshake_failure ('no TLS 1.3
    cipher suite in common') where OpenSSL completes the handshake."""
    import sys
    import textwrap

    import trustme

    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
                    "[ssl_sect]\nsystem_default = system_default_sect\n"
                    "[system_default_sect]\nMaxProtocol = TLSv1.2\n")
    cert, key, _ = install_cert(trustme.CA(), tmp_path / "ec", key_type=trustme.KeyType.ECDSA)
    hello = s_client_hello("-ciphersuites", "TLS_AES_128_CCM_SHA256", "-cipher",
                           "ECDHE-ECDSA-AES128-GCM-SHA256")
    code = textwrap.dedent(f"""
        import dataclasses, ssl, sys
        from authrelay import tls
        from authrelay.config import Config
        t = dataclasses.replace(Config().tls, cert={str(cert)!r}, key={str(key)!r})
        ctx = tls.server_context(dataclasses.replace(Config(), tls=t))
        hello = sys.stdin.buffer.read()
        refusal = tls.hello_refusal(tls.read_hello(hello), ctx)
        inp, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = tls.for_hello(ctx, tls.read_hello(hello)).wrap_bio(inp, out, server_side=True)
        inp.write(hello)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        print(ctx.maximum_version.name, out.read()[:6].hex(), refusal and refusal.reason)
    """)
    env = {"OPENSSL_CONF": str(conf), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], input=hello, capture_output=True,
                       timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stderr.decode()
    capped, first, refused = r.stdout.decode().split(" ", 2)
    assert capped == "TLSv1_2"
    assert first.startswith("160303") and first[10:12] == "02"  # OpenSSL: a ServerHello
    assert refused.strip() == "None"


def _without(hello: bytes, *kinds: int) -> bytes:
    """`hello` (one record, as Python's ssl and s_client send it) without the extensions
    of `kinds`."""
    body = hello[9:]  # record header (5), handshake type and length (4)
    i = 2 + 32
    i += 1 + body[i]  # legacy_session_id
    i += 2 + int.from_bytes(body[i:i + 2], "big")  # cipher_suites
    i += 1 + body[i]  # legacy_compression_methods
    head, exts, j = body[:i], b"", i + 2
    while j < len(body):
        kind, n = int.from_bytes(body[j:j + 2], "big"), int.from_bytes(body[j + 2:j + 4], "big")
        if kind not in kinds:
            exts += body[j:j + 4 + n]
        j += 4 + n
    msg = head + len(exts).to_bytes(2, "big") + exts
    msg = b"\x01" + len(msg).to_bytes(3, "big") + msg
    return hello[:3] + len(msg).to_bytes(2, "big") + msg


@pytest.mark.parametrize(("kinds", "reason"), [
    ((10,), "MISSING_SUPPORTED_GROUPS_EXTENSION"),  # supported_groups
    ((13,), "MISSING_SIGALGS_EXTENSION")])  # signature_algorithms
def test_a_tls13_hello_without_a_mandatory_extension_is_openssls_to_refuse(
        servers, kinds: tuple[int, ...], reason: str) -> None:  # noqa: ANN001
    """A TLS 1.3 ClientHello without supported_groups or signature_algorithms (RFC 8446
    9.2: mandatory) was refused with handshake_failure for what it would have agreed on
    ('NO_SUITABLE_SIGNATURE_ALGORITHM', 'NO_SUITABLE_KEY_SHARE'), where OpenSSL refuses
    it for the missing extension, with missing_extension: the maillog named another
    reason than OpenSSL's. Now OpenSSL judges it."""
    for hello in (s_client_hello("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"),
                  s_client_hello("-tls1_3", "-groups", "P-384")):
        stripped = _without(hello, *kinds)
        assert tls.read_hello(stripped).suites == tls.read_hello(hello).suites
        assert check(servers["ECDSA"], stripped) is None
        assert openssl_answer(servers["ECDSA"], stripped)[0] == reason
