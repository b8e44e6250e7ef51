"""DKIM signer and key store: signatures checked by dkimpy's verifier reading the public
keys from a loopback DNS server (never from our key store)."""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

import dkim
import pytest
from dkimcheck import dkim_zones, opendkim_results, verify_all
from hypothesis import given, settings
from hypothesis import strategies as st
from support.maillog import ListLog
from support.spools import temp_spool
from test_ownership import _NEAR_SIMPLE

from authrelay.config import from_dict
from authrelay.dkim.keys import DkimKeyError, KeyStore, split_txt
from authrelay.dkim.signer import TAB_GAP, Signer, from_domain, split_fields
from authrelay.policy.ownership import Owner
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.submit import Submitter


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str | None, dict]] = []

    def dkim(self, qid: str | None, result: str, **fields: object) -> None:
        self.events.append((qid, {"dkim": result, **fields}))


MSG = (b"From: Alice <alice@example.org>\r\n"
       b"To: bob@dest.test\r\n"
       b"Subject: hello\r\n"
       b"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
       b"Message-ID: <1@example.org>\r\n"
       b"\r\n"
       b"Hello Bob.\r\n")


@pytest.fixture(scope="module")
def generated_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RSA-2048 and one Ed25519 key, generated once per module (RSA key generation is
    the slow part); each test gets its own copy, modes and all."""
    d = tmp_path_factory.mktemp("dkimkeys") / "dkim"
    ks = KeyStore(d)
    ks.generate("example.org", "s-rsa", "rsa")
    ks.generate("example.org", "s-ed25519", "ed25519")
    return d


@pytest.fixture
def store(generated_keys: Path, tmp_path: Path) -> KeyStore:
    shutil.copytree(generated_keys, tmp_path / "dkim")  # copy2: 0600 keys stay 0600
    return KeyStore(tmp_path / "dkim").load()


@pytest.fixture
def signer(store: KeyStore) -> tuple[Signer, Log]:
    log = Log()
    return Signer(store, headers=("From", "To", "Subject", "Date", "Message-ID",
                                  "MIME-Version", "Content-Type"),
                  oversign=("From", "To", "Subject", "Date", "Message-ID"), maillog=log), log


def test_keys_written_0600_and_algorithm_read_from_key(store: KeyStore) -> None:
    keys = {k.selector: k for k in store.all()}
    assert set(keys) == {"s-rsa", "s-ed25519"}
    assert keys["s-rsa"].algorithm == "rsa" and keys["s-rsa"].bits == 2048
    assert keys["s-ed25519"].algorithm == "ed25519"
    for k in keys.values():
        assert stat.S_IMODE(k.path.stat().st_mode) == 0o600
        assert k.path.parent == store.root / "example.org"
    # The algorithm comes from the key, not the name: rename the Ed25519 key to "x-rsa".
    os.rename(keys["s-ed25519"].path, store.root / "example.org" / "x-rsa.key")
    again = {k.selector: k for k in store.load().all()}
    assert again["x-rsa"].algorithm == "ed25519"
    assert store.problems == []


def test_keygen_never_overwrites(store: KeyStore) -> None:
    with pytest.raises(DkimKeyError, match="exists"):
        store.generate("example.org", "s-rsa", "rsa")


def test_bad_and_open_keys_reported_not_fatal(store: KeyStore) -> None:
    (store.root / "example.org" / "junk.key").write_bytes(b"not a key")
    open_key = store.root / "example.org" / "s-rsa.key"
    open_key.chmod(0o644)
    store.load()
    assert {k.selector for k in store.all()} == {"s-rsa", "s-ed25519"}
    assert any("junk.key" in p and "PEM" in p for p in store.problems)
    assert any("s-rsa.key" in p and "chmod 600" in p for p in store.problems)


def test_txt_record_split_in_255_strings(store: KeyStore) -> None:
    rsa = next(k for k in store.all() if k.algorithm == "rsa")
    parts = rsa.txt_strings()
    assert len(parts) == 2 and len(parts[0]) == 255 and "".join(parts) == rsa.txt_value
    assert rsa.txt_value.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    line = rsa.zone_line()
    assert line.startswith("s-rsa._domainkey.example.org. IN TXT \"v=DKIM1; k=rsa; p=")
    assert line.count('"') == 4
    assert split_txt("x" * 510) == ["x" * 255, "x" * 255]


def test_both_algorithms_verify(signer: tuple[Signer, Log], store: KeyStore,
                                dns_server) -> None:  # noqa: ANN001
    s, log = signer
    dns_server.set_zones(dkim_zones(store.all()))
    sigs = s(MSG, queue_id="Q1")
    assert sigs is not None and sigs.count(b"DKIM-Signature:") == 2
    assert sigs.endswith(b"\r\n") and b"\n" not in sigs.replace(b"\r\n", b"")
    signed = sigs + MSG
    res = verify_all(signed, dns_server.nameserver)
    assert sorted((d, sel, a, ok) for d, sel, a, ok in res) == [
        (b"example.org", b"s-ed25519", b"ed25519-sha256", True),
        (b"example.org", b"s-rsa", b"rsa-sha256", True),
    ]
    assert ("Q1", {"dkim": "signed", "d": "example.org", "s": "s-ed25519,s-rsa"}) \
        in log.events
    # relaxed/relaxed, over-signing: each present over-signed field listed twice.
    fields = dkim.DKIM(signed).headers
    sig0 = next(v for n, v in fields if n == b"DKIM-Signature")
    flat = sig0.replace(b"\r\n", b"").replace(b" ", b"")
    assert b"c=relaxed/relaxed" in flat
    assert b"h=from:from:to:to:subject:subject:date:date:message-id:message-id" in flat
    assert b"l=" not in flat  # no body length limit (RFC 6376 8.2)


def test_oversigning_blocks_an_added_header(signer: tuple[Signer, Log], store: KeyStore,
                                            dns_server) -> None:  # noqa: ANN001
    s, _ = signer
    dns_server.set_zones(dkim_zones(store.all()))
    signed = s(MSG) + MSG
    tampered = signed.replace(b"\r\n\r\nHello", b"\r\nSubject: buy now\r\n\r\nHello")
    assert all(not ok for *_, ok in verify_all(tampered, dns_server.nameserver))
    body_changed = signed.replace(b"Hello Bob.", b"Hello Eve.")
    assert all(not ok for *_, ok in verify_all(body_changed, dns_server.nameserver))
    # relaxed canonicalization survives refolding and trailing whitespace.
    refolded = signed.replace(b"Subject: hello", b"Subject:   hello  ")
    assert all(ok for *_, ok in verify_all(refolded, dns_server.nameserver))


def test_8bit_dotted_body_and_existing_signature_kept(signer: tuple[Signer, Log],
                                                       store: KeyStore, tmp_path: Path,
                                                       dns_server) -> None:  # noqa: ANN001
    s, _ = signer
    other = KeyStore(tmp_path / "other")
    okey = other.generate("other.test", "o1", "rsa")
    body = ("From: alice@example.org\r\nTo: bob@dest.test\r\nSubject: caf\u00e9\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            ".leading dot\r\n..two dots\r\n.\r\nCaf\u00e9 \u00fcber \u20ac\r\n"
            "trailing space   \r\n\r\n\r\n").encode("utf-8")
    foreign = dkim.sign(body, b"o1", b"other.test", okey.signing_key,
                        canonicalize=(b"relaxed", b"relaxed"))
    msg = foreign + body
    dns_server.set_zones(dkim_zones([*store.all(), okey]))
    signed = s(msg) + msg
    res = verify_all(signed, dns_server.nameserver)
    assert len(res) == 3 and all(ok for *_, ok in res)
    assert res[2][0] == b"other.test"


@pytest.mark.parametrize("headers,why", [
    (b"To: b@x.test\r\n", "no From: field"),
    (b"From: a@example.org\r\nFrom: c@example.org\r\n", "several From: fields"),
    (b"From: a@example.org, c@other.test\r\n", "From: mailboxes of several domains"),
    (b"From: undisclosed\r\n", "no address in From:"),
    (b"From: a@nokey.test\r\n", "no key for nokey.test"),
])
def test_unsigned_with_a_maillog_note(signer: tuple[Signer, Log], headers: bytes,
                                      why: str) -> None:
    s, log = signer
    assert s(headers + b"\r\nbody\r\n", queue_id="Q2") is None
    assert log.events[-1] == ("Q2", {"dkim": "none", "reason": why})


def test_domains_setting_limits_signing(store: KeyStore, tmp_path: Path) -> None:
    log = Log()
    store.generate("second.test", "k", "ed25519")
    s = Signer(store, domains=("second.test", "missing.test"), maillog=log)
    assert s.domains() == ["second.test"]
    assert any("missing.test has no key" in p for p in s.problems)
    assert s(MSG, queue_id="Q3") is None
    assert log.events[-1] == ("Q3", {"dkim": "none", "reason": "example.org not in dkim.domains"})
    assert s(MSG.replace(b"alice@example.org", b"alice@Second.Test")) is not None


def test_domains_setting_compares_internationalised_names_as_a_labels(
        store: KeyStore) -> None:
    """`[dkim] domains` may name an internationalised domain as written (U-label): it is
    compared as the From: domain is, by its A-label, where its key lives; a name Python's
    IDNA2003 codec maps onto another (boß.test -> boss.test) restricts to nothing and
    is reported, never widened to the mapped name."""
    log = Log()
    store.generate("xn--bcher-kva.test", "k", "ed25519")
    store.generate("boss.test", "k", "ed25519")
    s = Signer(store, domains=("B\u00fccher.test.", "bo\u00df.test"), maillog=log)
    assert s.domains() == ["xn--bcher-kva.test"]
    assert not any("has no key" in p for p in s.problems), s.problems
    assert any("bo\u00df.test is not a domain name we can sign for" in p for p in s.problems)
    msg = "From: alice@b\u00fccher.test\r\nTo: x@y.test\r\n\r\nbody\r\n".encode()
    assert s(msg) is not None
    boss = MSG.replace(b"alice@example.org", b"alice@boss.test")
    assert s(boss, queue_id="Q1") is None
    assert log.events[-1] == ("Q1", {"dkim": "none", "reason": "boss.test not in dkim.domains"})
    only_bad = Signer(store, domains=("bo\u00df.test",), maillog=log)
    assert only_bad.domains() == []  # a restriction to nothing stays one,
    only_bad.reload()  # also when the keys are re-read
    assert only_bad.domains() == []
    s.reload()
    assert s.domains() == ["xn--bcher-kva.test"]


def test_from_config_and_reload(tmp_path: Path) -> None:
    cfg = from_dict({"state_dir": str(tmp_path)})
    log = Log()
    s = Signer.from_config(cfg, maillog=log)
    assert s.domains() == [] and s(MSG) is None
    KeyStore(cfg.dkim_dir).generate("example.org", "new", "ed25519")
    s.reload(cfg)  # SIGHUP
    assert s.domains() == ["example.org"]
    sig = s(MSG)
    assert sig is not None and b"s=new;" in sig


def test_from_domain_idn() -> None:
    d, why = from_domain([(b"From", " J\u00f6rg <j@b\u00fccher.example>".encode())])
    assert (d, why) == ("xn--bcher-kva.example", "")


@given(st.lists(_NEAR_SIMPLE, min_size=1, max_size=2).map(", ".join))
@settings(max_examples=1500, deadline=None)
def test_from_domain_shortcut_reads_what_the_parser_reads(value: str) -> None:
    """The plain-mailbox shortcut gives the domain (or the reason for none) that
    `email.utils.getaddresses` gives, for simple values and those a character away."""
    from unittest import mock

    from authrelay.dkim import signer as signer_mod

    fields = [(b"From", value.encode())]
    with mock.patch.object(signer_mod, "plain_mailbox", lambda _v: None):
        slow = from_domain(fields)
    assert from_domain(fields) == slow, value


@pytest.mark.parametrize("ctl", [b"\x0b", b"\x0c", b"\x00", b"\r"],
                         ids=["VT", "FF", "NUL", "bare-CR"])
def test_control_bytes_verifiers_read_differently_go_unsigned(
        signer: tuple[Signer, Log], store: KeyStore, dns_server, ctl: bytes) -> None:  # noqa: ANN001
    """RFC 6376 3.4.2 (and dkimpy, and we) keep a VT, FF, NUL or bare CR inside a signed
    field's value as it is; OpenDKIM reads VT and FF as blanks and stops at NUL or a bare
    CR, so its receivers would fail the signature. Such a message goes unsigned, with a
    maillog reason; the same byte in a field that is not signed changes nothing, and
    that signature passes both verifiers (found by the review of 2026-12-05)."""
    from authrelay.dkim.signer import VERIFIERS_DIFFER

    s, log = signer
    dns_server.set_zones(dkim_zones(store.all()))
    msg = MSG.replace(b"Subject: hello", b"Subject: a" + ctl + b"b")
    assert s(msg, queue_id="Q1") is None
    assert log.events[-1] == ("Q1", {"dkim": "none", "reason": VERIFIERS_DIFFER})
    msg = MSG.replace(b"\r\n\r\n", b"\r\nX-Unsigned: a" + ctl + b"b\r\n\r\n", 1)
    sigs = s(msg, queue_id="Q2")
    assert sigs is not None
    res = verify_all(sigs + msg, dns_server.nameserver)
    assert [ok for *_, ok in res] == [True, True]
    if ctl in (b"\x0b", b"\x0c"):  # opendkim -t refuses a file with NUL or bare CR at all
        assert opendkim_results(sigs + msg, dns_server.nameserver) == sorted(res)


def test_names_longer_than_a_line_verify(tmp_path: Path, dns_server) -> None:  # noqa: ANN001
    """A d= or s= longer than the fold width stays whole on its own line (dkimpy's
    `dkim.sign()` breaks such a token with a space, which its own verifier then rejects):
    both verifiers pass, and no line passes RFC 5322's 998 characters."""
    domain = ".".join(["d" * 60, "e" * 60, "f" * 60, "test"])
    ks = KeyStore(tmp_path / "dkim")
    ks.generate(domain, "s" * 20 + "." + "t" * 20, "rsa")  # the record name: <= 255
    ks.generate(domain, "ed", "ed25519")
    s = Signer(ks.load(), maillog=Log())
    dns_server.set_zones(dkim_zones(ks.all()))
    msg = MSG.replace(b"alice@example.org", f"alice@{domain}".encode())
    sigs = s(msg, queue_id="Q")
    assert sigs is not None and max(map(len, sigs.split(b"\r\n"))) <= 998
    res = verify_all(sigs + msg, dns_server.nameserver)
    assert [ok for *_, ok in res] == [True, True]
    assert opendkim_results(sigs + msg, dns_server.nameserver) == sorted(res)


def test_config_section() -> None:
    cfg = from_dict({"dkim": {"domains": ["Example.ORG."]}, "public_addresses": ["192.0.2.1"]})
    assert cfg.dkim.domains == ("example.org",)
    assert "Message-ID" in cfg.dkim.headers
    from authrelay.config import ConfigError

    with pytest.raises(ConfigError, match="dkim.headers: must include From"):
        from_dict({"dkim": {"headers": ["To"]}})
    with pytest.raises(ConfigError, match=r"public_addresses\[0\]"):
        from_dict({"public_addresses": ["relay.example"]})



def _slow_relaxed(body: bytes) -> bytes:
    # dkimpy's own implementation, whatever the signer installed since
    c = dkim.canonicalization
    return c.correct_empty_body(c.strip_trailing_lines(
        c.compress_whitespace(c.strip_trailing_whitespace(body))))


# ------------------------------------------------------------------ streamed messages

def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


_PIECES = st.sampled_from([b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b"\r", b"\n", b".",
                           b"\xc3\xa4", b"\r\n\r\n", b" \r\n"])


@given(st.lists(_PIECES, max_size=80).map(b"".join), st.lists(st.integers(0, 200)))
@settings(max_examples=800, deadline=None)
def test_streamed_relaxed_body_hash_equals_dkimpy(body: bytes, cuts: list[int]) -> None:
    import hashlib
    import re

    from authrelay.dkim.signer import RelaxedBodyHash

    # dkimpy's rfc822_parse reads bare LF as a line end and joins with CRLF
    dkimpy_body = b"\r\n".join(re.split(b"\r?\n", body))
    h = RelaxedBodyHash(hashlib.sha256)
    for piece in _split(body, cuts):
        h.update(piece)
    assert h.digest() == hashlib.sha256(_slow_relaxed(dkimpy_body)).digest()


# What the SMTP body reader lets through: lines without a bare CR or LF, CRLF-terminated.
_SMTP_LINE = st.lists(st.sampled_from([b"a", b"b", b" ", b"  ", b"\t", b".", b"\xc3\xa4"]),
                      max_size=12).map(b"".join)
_SMTP_LINES = st.lists(_SMTP_LINE, max_size=40).map(lambda ls: b"\r\n".join(ls + [b""]))


@given(_SMTP_LINES, st.lists(st.integers(0, 300)))
@settings(max_examples=800, deadline=None)
def test_crlf_only_body_hash_equals_dkimpy(body: bytes, cuts: list[int]) -> None:
    """Mail the body reader vouched for (`crlf_only`: no second look at line ends)
    hashes to what dkimpy hashes, however it is cut."""
    import hashlib

    from authrelay.dkim.signer import RelaxedBodyHash

    assert body.count(b"\n") == body.count(b"\r\n") == body.count(b"\r")
    h = RelaxedBodyHash(hashlib.sha256, crlf_only=True)
    for piece in _split(body, cuts):
        h.update(piece)
    assert h.digest() == hashlib.sha256(_slow_relaxed(body)).digest()


# A text part, then a blank-free stretch (a base64 attachment), then maybe more text: the
# hasher works only on each block's part up to its last blank and takes the rest as it is.
_B64_LINE = st.text("ABCXYZabcxyz0189+/=", min_size=0, max_size=76).map(str.encode)
_B64_LINES = st.lists(_B64_LINE, max_size=30).map(lambda ls: b"\r\n".join(ls + [b""]))


@given(_SMTP_LINES, _B64_LINES, _SMTP_LINES, st.lists(st.integers(0, 3000)),
       st.booleans())
@settings(max_examples=800, deadline=None)
def test_blank_free_stretches_hash_as_dkimpy(text: bytes, b64: bytes, tail: bytes,
                                              cuts: list[int], crlf_only: bool) -> None:
    import hashlib

    from authrelay.dkim.signer import RelaxedBodyHash

    body = text + b64 + tail
    h = RelaxedBodyHash(hashlib.sha256, crlf_only=crlf_only)
    for piece in _split(body, cuts):
        h.update(piece)
    assert h.digest() == hashlib.sha256(_slow_relaxed(body)).digest()


def test_blanks_before_a_blank_free_stretch_are_still_canonicalized() -> None:
    """The examples the shortcut must not skip: a trailing blank, a run and a tab, each
    only before a long blank-free stretch, in one block."""
    import hashlib

    from authrelay.dkim.signer import RelaxedBodyHash

    b64 = b"QUJD" * 19 + b"\r\n"
    for text in (b"a \r\n", b"a  b\r\n", b"a\tb\r\n", b" \t \r\n", b"\t\r\n"):
        body = text + b64 * 1000
        h = RelaxedBodyHash(hashlib.sha256, crlf_only=True)
        h.update(body)
        assert h.digest() == hashlib.sha256(_slow_relaxed(body)).digest()
        assert h.digest() != hashlib.sha256(body).digest()


class _Canonical:
    """A stand-in for hashlib.sha256 that keeps the bytes: `digest()` is the canonical
    body itself, so a difference shows where it is."""

    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, data: bytes) -> None:
        self.data += data

    def digest(self) -> bytes:
        return bytes(self.data)


# Lines of blanks: single spaces between words, runs (up to a few hundred: several halving
# passes), tabs, blanks ending lines or making up whole lines.
_BLANKY = st.one_of(
    st.sampled_from([b"a", b"word", b" ", b" ", b"  ", b"\t", b" \t", b"\t ", b"\xc3\xa4"]),
    st.integers(3, 300).map(lambda n: b" " * n))
_BLANKY_LINE = st.lists(_BLANKY, max_size=10).map(b"".join)


@given(st.lists(_BLANKY_LINE, max_size=20), st.lists(st.tuples(st.integers(0, 20),
                                                                 st.integers(-3, 3))),
       st.booleans(), st.booleans())
@settings(max_examples=400, deadline=None)
def test_relaxed_body_bytes_equal_dkimpy_with_blanks_at_block_edges(
        lines: list[bytes], cuts: list[tuple[int, int]], crlf_only: bool,
        last_eol: bool) -> None:
    """The canonical body, byte for byte, is dkimpy's, for bodies of blanks and tabs cut
    into pieces next to their line ends (a piece ending in a run, between CR and LF, just
    after the CRLF): what the block test ("needs no change": no tab, no space before a
    space or a CR) and `_relaxed_lines` must get right at every edge."""
    from authrelay.dkim.signer import RelaxedBodyHash

    body = b"\r\n".join(lines) + (b"\r\n" if last_eol and lines else b"")
    ends = [m.end() for m in re.finditer(b"\r\n", body)] or [0]
    points = [max(0, ends[i % len(ends)] + d) for i, d in cuts]
    h = RelaxedBodyHash(_Canonical, crlf_only=crlf_only)
    for piece in _split(body, points):
        h.update(piece)
    assert h.digest() == _slow_relaxed(body)


@given(st.lists(st.one_of(_BLANKY, st.sampled_from([b"\r\n", b"\r", b"\n", b" \r\n"])),
                max_size=40).map(b"".join))
@settings(max_examples=400, deadline=None)
def test_relaxed_lines_equals_the_regex_substitutions(text: bytes) -> None:
    """`_relaxed_lines` (replaces) makes what the two regex substitutions it replaced
    made, bare CRs and LFs included: trailing blanks before each CRLF gone, then every
    blank run one space."""
    from authrelay.dkim.signer import _relaxed_lines

    slow = re.sub(rb"[\t ]+", b" ", re.sub(rb"[\t ]+\r\n", b"\r\n", text))
    assert _relaxed_lines(text) == slow


def _tags(field: bytes) -> dict[bytes, bytes]:
    """A DKIM-Signature field's tags, folding whitespace removed (RFC 6376 3.2)."""
    value = field.split(b":", 1)[1]
    out = {}
    for spec in value.split(b";"):
        name, _, v = spec.partition(b"=")
        if name.strip():
            out[name.strip()] = re.sub(rb"[\t\r\n ]", b"", v)
    return out


# Header fields as clients write them: folded, tabs, runs of blanks, blanks at the ends,
# names in any case, repeated fields (dkimpy splits no field with blanks before its colon).
def test_one_header_layout_signs_each_messages_own_fields(
        signer: tuple[Signer, Log], store: KeyStore, dns_server) -> None:  # noqa: ANN001
    """The h= selection is kept per layout of field names (signer._selection), never the
    fields: messages of one layout, and one past the cached bound, each verify."""
    s, _ = signer
    dns_server.set_zones(dkim_zones(store.all()))
    many = b"".join(b"To: r%d@dest.test\r\n" % i for i in range(40))
    for msg in (MSG, MSG.replace(b"hello", b"other"), MSG.replace(b"bob@", b"eve@"),
                many + MSG, many.replace(b"r1", b"x1") + MSG):
        sigs = s(msg)
        assert sigs is not None
        assert [ok for *_, ok in verify_all(sigs + msg, dns_server.nameserver)] == [True] * 2
        assert not any(ok for *_, ok in verify_all(
            sigs + msg.replace(b"dest.test", b"dest.tesT"), dns_server.nameserver))


_WS = st.sampled_from([b" ", b"\t", b"  ", b" \t ", b"\r\n ", b"\r\n\t", b""])
_WORD = st.sampled_from([b"hello", b"a", b"<1@example.org>", b"\xc3\xa4", b"x:y", b"=?"])
_VALUE = st.lists(st.tuples(_WS, _WORD), min_size=1, max_size=6).map(
    lambda parts: b"".join(w + v for w, v in parts))
_EXTRA = st.lists(st.tuples(st.sampled_from([b"Subject", b"SUBJECT", b"To", b"x-other",
                                              b"X-Other", b"Date"]), _VALUE),
                  max_size=5)


@pytest.mark.slow
@given(st.lists(_PIECES, max_size=60).map(b"".join), st.lists(st.integers(0, 400)),
       st.sampled_from([b"\r\n", b"\n"]), st.booleans(), _EXTRA)
@settings(max_examples=150, deadline=None)
def test_signature_equals_dkimpy_sign(tmp_path_factory, body: bytes,  # noqa: ANN001
                                      cuts: list[int], sep: bytes, empty: bool,
                                      extra: list[tuple[bytes, bytes]]) -> None:
    """One signing path: whole or in any chunking, each field carries the signature
    dkimpy's own `dkim.sign()` makes for that key (same t=; names that fit in a line;
    every tag equal up to folding whitespace, b= included: RSASSA-PKCS1-v1_5 and
    Ed25519 are deterministic, so an equal b= means the same canonical header bytes
    were signed), both algorithms, header fields folded and blanked in every way
    relaxed canonicalization undoes, and they verify with dkimpy's verifier."""
    ks = KeyStore(tmp_path_factory.mktemp("dkim"))
    ks.generate("example.org", "s-rsa", "rsa")
    ks.generate("example.org", "s-ed25519", "ed25519")
    s = Signer(ks.load(), headers=("From", "To", "Subject", "X-Other"),
               oversign=("From", "Subject"), maillog=Log())
    s._log = lambda *a, **k: None  # type: ignore[method-assign]
    head = MSG.split(b"\r\n\r\n")[0] + b"\r\n" + b"".join(
        n + b":" + v + b"\r\n" for n, v in extra)
    # `empty`: no empty line at all (header fields only), as dkimpy reads it
    msg = head if empty else head + sep + body
    st_ = s._state
    keys = st_.keys["example.org"]
    include = s._include(st_, dkim.DKIM(msg).headers)
    import time as time_mod
    from unittest import mock

    with mock.patch.object(time_mod, "time", return_value=1_800_000_000.0):
        whole = s(msg, queue_id="Q")
        streamed = s.sign_stream(_split(msg, cuts), queue_id="Q")
        want = [dkim.sign(msg, k.selector.encode(), b"example.org", k.signing_key,
                          signature_algorithm=k.dkim_algorithm,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=include, linesep=b"\r\n")
                for k in keys]
    assert whole is not None and whole.count(b"DKIM-Signature:") == 2
    assert streamed == whole
    ours = [b"DKIM-Signature:" + f for f in whole.split(b"DKIM-Signature:")[1:]]
    assert [_tags(f) for f in ours] == [_tags(f) for f in want]
    for f in ours:  # RFC 5322 2.1.1: folded to lines of at most 78 characters
        assert f.endswith(b"\r\n") and max(map(len, f.split(b"\r\n"))) <= 78
    records = {k.record_name.encode(): k.txt_value.encode() for k in keys}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.rstrip(b"."))

    signed = whole + msg
    with mock.patch.object(time_mod, "time", return_value=1_800_000_001.0):
        for i in range(2):
            assert dkim.DKIM(signed, linesep=b"\r\n").verify(idx=i, dnsfunc=dnsfunc)


def test_sign_stream_verifies_and_reads_no_body_without_key(
        signer: tuple[Signer, Log], store: KeyStore, dns_server) -> None:  # noqa: ANN001
    s, log = signer
    dns_server.set_zones(dkim_zones(store.all()))
    body = (b"line with  two spaces\t and a tab \r\n" + b"x" * 76 + b"\r\n") * 30_000
    msg = MSG + body + b"\r\n\r\n"
    pieces = [msg[i:i + 65536] for i in range(0, len(msg), 65536)]
    sigs = s.sign_stream(iter(pieces), queue_id="Q2")
    assert sigs is not None
    res = verify_all(sigs + msg, dns_server.nameserver)
    assert sorted(ok for *_, ok in res) == [True, True]

    # From: a domain without key: the header section is read, not one chunk more.
    other = MSG.replace(b"alice@example.org", b"alice@nokey.example")
    read: list[int] = []

    def chunks():  # noqa: ANN202
        for i in range(0, 20):
            read.append(i)
            yield other if i == 0 else b"x" * 1_000_000 + b"\r\n"

    assert s.sign_stream(chunks(), queue_id="Q3") is None
    assert read == [0]
    assert ("Q3", {"dkim": "none", "reason": "no key for nokey.example"}) in log.events


class CountingOwner:
    """An Owner stand-in that records whether the signer asked for an ownership verdict
    (the expensive full From:/Sender: parse) and answers like the real one."""

    def __init__(self, owned: tuple[str, ...]) -> None:
        from authrelay.policy.ownership import Owner
        self.real = Owner.of("alice", owned)
        self.asked = 0

    def verdict(self, header_section: bytes) -> str:
        self.asked += 1
        return self.real.verdict(header_section)


def test_ownership_is_checked_only_when_there_is_a_key(signer: tuple[Signer, Log]) -> None:
    """An unsigned message (no key for its From: domain) costs no ownership parse; a
    message to be signed is still refused its signature when its From: is not owned."""
    s, log = signer
    keyless = MSG.replace(b"alice@example.org", b"alice@nokey.example")
    o = CountingOwner(("alice@nokey.example",))
    assert s.sign_stream((keyless,), "Q1", o) is None  # type: ignore[arg-type]
    assert o.asked == 0
    assert log.events[-1] == ("Q1", {"dkim": "none", "reason": "no key for nokey.example"})
    stranger = CountingOwner(("alice@elsewhere.test",))
    assert s.sign_stream((MSG,), "Q2", stranger) is None  # type: ignore[arg-type]
    assert stranger.asked == 1
    assert log.events[-1] == ("Q2", {"dkim": "skipped", "reason": "From: not owned by user"})
    mine = CountingOwner(("alice@example.org",))
    assert s.sign_stream((MSG,), "Q3", mine) is not None  # type: ignore[arg-type]
    assert mine.asked == 1


def test_an_obs_optional_from_is_signed_as_opendkim_reads_it(
        signer: tuple[Signer, Log]) -> None:
    """`From :` (RFC 5322 4.5.3 obs-optional) with a folded value is alice's address to
    the ownership check and to the signer's split (as RFC 6376 3.4.2 and OpenDKIM read
    it; dkimpy refused the section, so it went unsigned, "message not parsable"): signed,
    the field covered. A line that is no field, fold or mbox line still leaves the message
    unsigned, and nothing raises."""
    from authrelay.policy.ownership import Owner
    s, log = signer
    msg = b"From : \r\n alice@example.org\r\nSubject : hi\r\n\r\nbody\r\n"
    owner = Owner.of("alice", ("alice@example.org",))
    assert owner.verdict(msg) == ""
    assert split_fields(msg) == [(b"From", b" \r\n alice@example.org\r\n"),
                                 (b"Subject", b" hi\r\n")]
    out = s(msg, "Q1", owner)
    assert out is not None and b"d=example.org" in out
    tags = out.replace(b"\r\n", b"").replace(b" ", b"")
    assert b"h=from:" in tags and b":subject:" in tags, out
    junk = b"From: alice@example.org\r\njunk line\r\n\r\nbody\r\n"
    assert s(junk, "Q2", owner) is None
    qid, ev = log.events[-1]
    assert qid == "Q2" and ev["dkim"] == "none"
    assert ev["reason"] == "message not parsable (a line that is not a header field)", ev
    assert s(b"From: alice@example.org\r\nSubject \t: hi\r\n\r\nbody\r\n", "Q3",
             owner) is None  # OpenDKIM verifies no signature of it
    assert log.events[-1] == ("Q3", {"dkim": "none",
                                     "reason": f"message not parsable ({TAB_GAP})"})


class CountingSigner(Signer):
    """The real signer, counting the messages the commit thread hands it."""

    calls = 0

    def sign_stream(self, chunks: Iterable[bytes], queue_id: str | None = None,
                    owner: Owner | None = None, *, crlf_only: bool = False) -> bytes | None:
        self.calls += 1
        return super().sign_stream(chunks, queue_id, owner, crlf_only=crlf_only)


async def test_accept_path_notes_a_keyless_from_domain_without_the_commit_thread(
        store: KeyStore, tmp_path: Path) -> None:
    """The ownership check already read the From: domain on the event loop: a domain with
    no key (or outside `[dkim] domains`) is noted there, with the reason the signer's own
    parse gives, and no signer is bound, so the commit thread parses nothing; a domain
    with a key is signed as before; a header the check gives no single domain for (two
    From: fields) is left to the signer's own parse."""
    log = ListLog()
    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path)})
    owner = Owner.of("alice", ("alice@example.org", "alice@nokey.example",
                               "alice@other.example"))

    async def send(s: CountingSigner, head: bytes) -> tuple[str, bytes, int]:
        with temp_spool(fsync=False) as spool:
            sub = Submitter(spool, cfg, signer=s, maillog=log)
            env = Envelope(queue_id=new_queue_id(), sender="alice@example.org",
                           recipients=[Recipient(address="b@example.net")], auth_user="alice")
            d = sub.begin(env, owner=owner, lines_checked=True)
            before = s.calls
            d.write(head + b"To: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n")
            await d.commit()
            _, msg, _ = spool.load_for_delivery(env.queue_id)
            return env.queue_id, msg, s.calls - before

    def notes(qid: str) -> list[str]:
        return [ln[ln.index(qid):] for ln in log.lines if f"{qid}: dkim=" in ln]

    s = CountingSigner(store, maillog=log)
    qid, msg, calls = await send(s, b"From: Alice <ALICE@NoKey.Example>\r\n")
    assert (calls, notes(qid)) == (0, [f"{qid}: dkim=none, reason=no key for nokey.example"])
    assert not msg.startswith(b"DKIM-Signature:")
    # the same reason as the signer's own parse of the same header gives
    thread = Log()
    Signer(store, maillog=thread).sign_stream((b"From: alice@nokey.example\r\n\r\nx\r\n",),
                                              "Q", owner)
    assert thread.events == [("Q", {"dkim": "none", "reason": "no key for nokey.example"})]

    qid, msg, calls = await send(s, b"From: alice@example.org\r\n")
    assert calls == 1 and msg.startswith(b"DKIM-Signature:")
    assert notes(qid) == [f"{qid}: dkim=signed, d=example.org, s=s-ed25519,s-rsa"]

    qid, msg, calls = await send(s, b"From: alice@nokey.example\r\nFrom: alice@nokey.example\r\n")
    assert (calls, notes(qid)) == (1, [f"{qid}: dkim=none, reason=several From: fields"])
    qid, msg, calls = await send(s, b"From: alice@nokey.example, alice@other.example\r\n")
    assert (calls, notes(qid)) == (1, [f"{qid}: dkim=none, reason=From: mailboxes of "
                                       "several domains"])

    limited = CountingSigner(store, domains=("other.example",), maillog=log)
    qid, msg, calls = await send(limited, b"From: alice@example.org\r\n")
    assert (calls, notes(qid)) == (0, [f"{qid}: dkim=none, reason=example.org not in "
                                       "dkim.domains"])
    assert not msg.startswith(b"DKIM-Signature:")


def _accept(signer: Signer, log: ListLog, owner: Owner, message: bytes, *,
            domain_known: bool = True) -> tuple[list[str], bool]:
    """One message of `owner` through the real accept path (Draft: ownership check, bind,
    commit): its maillog lines (queue id as QID, from= cut before size=) and whether it
    was stored signed. `domain_known=False`: the accept path as it was before the
    ownership check named the From: domain to bind() (the signer's own parse decides)."""
    cfg = from_dict({"hostname": "relay.test", "state_dir": "/nonexistent"})  # unused
    real = Owner.assess
    with temp_spool(fsync=False) as spool:
        sub = Submitter(spool, cfg, signer=signer, maillog=log)
        qid = new_queue_id()
        env = Envelope(queue_id=qid, sender="alice@example.org",
                       recipients=[Recipient(address="b@example.net")], auth_user="alice")
        d = sub.begin(env, owner=owner, lines_checked=True)
        if not domain_known:
            Owner.assess = lambda self, h: (real(self, h)[0], "")  # type: ignore[method-assign]
        try:
            d.write(message)
            d.commit_blocking()
        finally:
            Owner.assess = real  # type: ignore[method-assign]
        _, msg, _ = spool.load_for_delivery(qid)
    lines = [ln[ln.index(qid):].replace(qid, "QID").split(", size=")[0]
             for ln in log.lines if f"{qid}: " in ln]
    return lines, msg.startswith(b"DKIM-Signature:")


ALICE = ("alice@example.org", "alice@nokey.example", "alice@b\u00fccher.example")


@pytest.mark.parametrize(("head", "reason"), [
    # obs-optional (RFC 5322 4.5.3): a From: field to the ownership check and to the
    # signer's split (as OpenDKIM reads it), which the accept path leaves to the signer
    (b"From : alice@nokey.example\r\n", "no key for nokey.example"),
    (b"From\t: alice@nokey.example\r\n", f"message not parsable ({TAB_GAP})"),
    (b"Sender : alice@example.org\r\nFrom: alice@nokey.example\r\n",
     "no key for nokey.example"),
    (b"From: alice@nokey.example\r\njunk line\r\n",
     "message not parsable (a line that is not a header field)"),
    (b"From: alice@nokey.example\r\n", "no key for nokey.example"),
])
def test_keyless_note_is_the_one_the_signers_own_parse_gives(
        store: KeyStore, head: bytes, reason: str) -> None:
    """The accept path's `dkim=none` note for an owned From: is the one the commit
    thread's signer gives for the same message: a header the ownership check does not vouch
    the signer splits alike (an obs-optional `From :`, a line that is no field)
    names no domain to bind(), so the signer's own parse notes it, once, before from=."""
    owner = Owner.of("alice", ALICE)
    message = head + b"To: b@example.net\r\n\r\nbody\r\n"
    log = ListLog()
    new = _accept(Signer(store, maillog=log), log, owner, message)
    old = _accept(Signer(store, maillog=log), log, owner, message, domain_known=False)
    assert new == old == ([f"QID: dkim=none, reason={reason}", "QID: from=<alice@example.org>"],
                          False)


_A_ADDR = st.sampled_from([
    "alice@example.org", "ALICE@Example.Org.", "alice@nokey.example", "Alice@NOKEY.example.",
    "alice@b\u00fccher.example", "alice@xn--bcher-kva.example", '"alice"@nokey.example',
    "alice@ nokey.example", "alice @example.org", "ceo@example.org"])
_A_MAILBOX = st.one_of(
    _A_ADDR, _A_ADDR.map("<{}>".format), _A_ADDR.map("Alice <{}>".format),
    _A_ADDR.map('"Smith, Alice" <{}>'.format), _A_ADDR.map("{} (Alice)".format),
    _A_ADDR.map("=?utf-8?q?Al=C3=AFce?= <{}>".format),
    st.tuples(_A_ADDR, _A_ADDR).map(lambda t: f'"{t[0]}" <{t[1]}>'))
_A_VALUE = st.one_of(_A_MAILBOX, _A_MAILBOX, _A_MAILBOX,  # mostly one mailbox
                     st.lists(_A_MAILBOX, min_size=2, max_size=3).map(", ".join),
                     _A_MAILBOX.map("team: {};".format))


@st.composite
def _a_field(draw: st.DrawFn) -> bytes:
    value = draw(_A_VALUE).encode()
    blanks = [i for i, c in enumerate(value) if c == 0x20]
    if blanks and draw(st.booleans()):  # folded at a blank
        i = draw(st.sampled_from(blanks))
        value = value[:i] + b"\r\n" + value[i:]
    name = draw(st.sampled_from([b"From", b"From", b"From", b"from", b"FROM", b"From ",
                                 b"From\t", b"Sender", b"Sender ", b"Reply-To"]))
    return name + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value + b"\r\n"


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_a_field(), _a_field(), _a_field(), st.sampled_from([
           b"Subject: hi\r\n", b"junk line\r\n", b"From alice@x Mon\r\n", b" folded\r\n"])),
           min_size=1, max_size=3).map(b"".join),
       st.sampled_from([(), ("example.org",), ("nokey.example", "example.org")]),
       st.sampled_from([b"\r\nbody\r\n", b"", b"\r\n"]))
def test_the_keyless_shortcut_changes_no_decision_and_no_note(
        keyed_store: KeyStore, head: bytes, domains: tuple[str, ...], body: bytes) -> None:
    """Against the accept path before the ownership check named the From: domain to
    bind(): the same maillog lines (reason, count, order before from=) and the same
    signed/unsigned outcome, for any From:/Sender: shape (case, trailing dot, A- and
    U-label, quoted local part, groups, comments, encoded words, folds, several fields,
    obs-optional `From :`, lines dkimpy refuses, a message that is all header)."""
    owner = Owner.of("alice", ALICE)
    log = ListLog()
    new = _accept(Signer(keyed_store, domains=domains, maillog=log), log, owner, head + body)
    old = _accept(Signer(keyed_store, domains=domains, maillog=log), log, owner, head + body,
                  domain_known=False)
    assert new == old, (head + body, domains)


@pytest.fixture(scope="module")
def keyed_store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    """Ed25519 keys for example.org and the IDN bücher.example (under its A-label)."""
    ks = KeyStore(tmp_path_factory.mktemp("keyed") / "dkim")
    for dom in ("example.org", "xn--bcher-kva.example"):
        ks.generate(dom, "s1", "ed25519")
    return ks.load()


def test_fields_of_one_second_are_dkimpys_and_fold_as_a_whole_tag_list(
        tmp_path: Path) -> None:
    """The tag list is folded once per h= list, key and second (`_tag_list`) and each
    body's bh= put into it: every field must still carry dkimpy's tags (b= included) and
    be byte for byte the whole tag list folded with its own bh=, for selectors of every
    length (the folds move) and different bodies signed within the same second."""
    import time as time_mod
    from unittest import mock

    from authrelay.dkim.signer import _C_VALUE, _fold

    ks = KeyStore(tmp_path / "dkim")
    for n in range(0, 62, 3):
        ks.generate("example.org", "s" + "x" * n, "ed25519")
    s = Signer(ks.load(), headers=("From", "To", "Subject", "Date", "Message-ID"),
               oversign=("From", "Subject", "Reply-To"), maillog=Log())
    keys = {k.selector.encode(): k for k in s._state.keys["example.org"]}
    head = MSG.split(b"\r\n\r\n")[0] + b"\r\n"
    seen: set[bytes] = set()
    with mock.patch.object(time_mod, "time", return_value=1_800_000_000.0):
        for body in (b"Hello Bob.\r\n", b"two  words \t\r\n\r\n\r\n", b"", b"x" * 900):
            msg = head + b"\r\n" + body
            out = s(msg, queue_id="Q")
            assert out is not None
            fields = [b"DKIM-Signature:" + f for f in out.split(b"DKIM-Signature:")[1:]]
            assert len(fields) == len(keys)
            for f in fields:
                tags = _tags(f)
                k = keys[tags[b"s"]]
                want = dkim.sign(msg, k.selector.encode(), b"example.org", k.signing_key,
                                 signature_algorithm=k.dkim_algorithm,
                                 canonicalize=(b"relaxed", b"relaxed"),
                                 include_headers=tags[b"h"].split(b":"), linesep=b"\r\n")
                assert tags == _tags(want)
                names = b" : ".join(tags[b"h"].split(b":")).split(b" ")
                names[-1] += b";"
                whole = _fold([b"v=1;", b"a=" + k.dkim_algorithm + b";",
                               b"c=" + _C_VALUE + b";", b"d=example.org;",
                               b"i=@example.org;", b"q=dns/txt;", b"s=" + tags[b"s"] + b";",
                               b"t=1800000000;", b"h=" + names[0], *names[1:],
                               b"bh=" + tags[b"bh"] + b";", b"b="], len(b"DKIM-Signature: "))
                assert f.startswith(b"DKIM-Signature: " + whole)
                seen.add(tags[b"bh"])
    assert len(seen) == 4
    # The next second: the same h= list and keys, a new t= in every field.
    with mock.patch.object(time_mod, "time", return_value=1_800_000_001.0):
        out = s(head + b"\r\n" + b"Hello Bob.\r\n", queue_id="Q")
    assert out is not None
    assert {_tags(b"DKIM-Signature:" + f)[b"t"] for f in
            out.split(b"DKIM-Signature:")[1:]} == {b"1800000001"}


def test_from_domain_of_comments_nested_too_deep_is_unsigned_with_its_reason() -> None:
    """A From: of 2,000 nested comments (folded lines, each short): the address parser
    recursed past Python's limit and the signer's generic failure line said
    `signer failed: RecursionError` (a trusted network's or root's message)."""
    value = b" alice@example.org " + b"\r\n ".join(b"(" * 500 for _ in range(4))
    assert from_domain([(b"From", value)]) == (
        None, "From: not parsable (comments nested too deep)")


def test_split_fields_joins_a_fields_folds_in_order() -> None:
    """split_fields: a field's folds follow its first line, CRLFs kept, in one value; a
    field of 60,000 folds too (its value was grown a fold at a time: 0.15 s of the commit
    thread's CPU per such 256 KiB header section of an authenticated user's, now 0.03 s)."""
    head = b"From: a@b.example\r\nTo: y,\r\n\tz\r\n  w\r\nSubject: s\r\n\r\nbody"
    assert split_fields(head) == [(b"From", b" a@b.example\r\n"),
                                  (b"To", b" y,\r\n\tz\r\n  w\r\n"), (b"Subject", b" s\r\n")]
    [_, (name, value)] = split_fields(b"From: a@b.example\r\nX-A: a\r\n" + b" x\r\n" * 60_000)
    assert name == b"X-A" and value == b" a\r\n" + b" x\r\n" * 60_000
