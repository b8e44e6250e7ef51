"""DKIM signing (RFC 6376 5): whole message in -> DKIM-Signature header lines out.

Contract: `Signer` is the `signer: Callable[[bytes], bytes | None]` hook of the spool's
accept path (spool/submit.py). The accept path calls it once per message, after header
cleanup (Received, Date, Message-ID added) and before commit, only for mail we originate:
an authenticated or trusted-network sender, the sendmail command, our bounces. It prepends
the returned lines to the stored message; retries send the stored bytes, so a message is
never signed twice. The call is CPU work (an RSA-2048 signature is ~0.25 ms in OpenSSL,
~0.03 ms for Ed25519 on this machine): call it from a worker thread, not on the event loop.

What is signed: the domain of the single From: mailbox (RFC 6376 6.1.1's "d=" aligned
with From: as DMARC, RFC 7489 3.1, wants), with every key of that domain (RSA and Ed25519
side by side, RFC 8463 6), relaxed/relaxed canonicalization (RFC 6376 3.4.2, 3.4.4: survives
header refolding and trailing whitespace changes), the configured header fields that are
present, and the over-signed ones (`[dkim] oversign`) listed once more than they occur so
that none can be added after signing (RFC 6376 8.15). No l= (body length) tag: it would let
anyone append content (8.2).

What is dkimpy's and what is ours: the header section is split into fields as dkimpy's
verifier splits it (`split_fields`; a field name with spaces before its colon, which
dkimpy refuses, read as OpenDKIM and RFC 6376 3.4.2 read it) and dkimpy's `dkim.sign()` is
the reference the property tests compare with (same tags, same b= for the same t=; both
algorithms are deterministic; for d= and s= that fit in a line: dkimpy breaks longer ones,
we keep them whole). The field is built here from RFC 6376 alone, with public APIs only:
relaxed canonicalization of the selected header fields (3.4.2, 5.4.2), the tag list,
folding to 78 columns, and the signature by OpenSSL through `cryptography` (RSA, 3.3.1) or
libsodium through PyNaCl (Ed25519 over the SHA-256 of the data, RFC 8463 3). dkimpy's own
signing took ~70 µs more per signature (it canonicalizes every header field, folds twice,
and signs RSA in pure Python, ~7 ms, unless wrapped).

One signing path for a whole message and a streamed one (`sign_stream`: a message the
spool streamed to disk, over 128 KiB, read back in chunks): the From: domain is decided
on the header section alone, so a message whose domain has no key is never read back; one
that is signed has its body hashed in pieces as they come (`RelaxedBodyHash`: dkimpy's
relaxed canonicalization applied block by block on line boundaries, the same bytes,
property-tested), one SHA-256 shared by every key (both algorithms hash with it), from
which each key's field is made. Memory stays at a chunk or two whatever the size.

Who may be signed for (issue 17): an authenticated user's message only when every
From:/Sender: mailbox is one of the user's addresses (policy/ownership.py, the rule of
`sender_policy = "own"`), else `dkim=skipped, reason=From: not owned by user`; `[dkim]
sign_unowned = true` signs it anyway (every user then borrows the domain's reputation).
The spool's accept path decides on the header as received and binds the signer with the
owner (`bind(qid, owner=...)`), and the signer checks its own parse again, so a header the
two parsers read differently goes unsigned. Trusted networks, trusted local users and
bounces carry no owner and are signed as before; an untrusted local user's sendmail
message owns only login@hostname.

Failure policy: signing never fails a message. No From:, several From: fields, mailboxes of
different domains, a domain without key or outside `[dkim] domains`: the message goes out
unsigned and the maillog says why (`dkim=none`). A library error is logged (`dkim=error`)
and the message also goes out unsigned: unsigned mail is still deliverable, a lost message
is not.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authrelay.config import Config
from authrelay.dkim.keys import DkimKey, DkimKeyError, KeyStore
from authrelay.policy.ownership import Owner, a_label, plain_mailbox

log = logging.getLogger(__name__)


class DkimLog(Protocol):
    """Where a Signer writes its `QID: dkim=RESULT, ...` notes: the MailLog of the
    process or command that built it (maillog.MailLog.dkim), never a fallback."""

    def dkim(self, queue_id: str | None, result: str, **extra: Any) -> None: ...

# RFC 6376 5.4: these must not be signed (they change in transit or leak Bcc).
_NEVER_SIGN = frozenset(h.decode() for h in dkim.DKIM.SHOULD_NOT)
_C_VALUE = b"relaxed/relaxed"
_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters


_WSP = re.compile(rb"[\t ]+")
_EOL = re.compile(rb"\r?\n")


def _relaxed_lines(c: bytes) -> bytes:
    """RFC 6376 3.4.4's two changes to whole lines `c`: every WSP run one space, none
    before a CRLF (what substituting `[\t ]+\r\n` then `[\t ]+` made, property-tested).
    By replaces, not a regex substitution (a match per blank: ~2 ms per 16 KiB of text
    with a double space, an indented HTML part, a tab). Each pass halves a run of
    spaces: log2(k) passes for a run of k (at most a line: 998 bytes through SMTP)."""
    if c.find(b"\t") >= 0:
        c = c.replace(b"\t", b" ")
    while True:
        shorter = c.replace(b"  ", b" ")
        if len(shorter) == len(c):
            break
        c = shorter
    return c.replace(b" \r\n", b"\r\n")


def _relaxed_change(c: bytes) -> bytes | None:
    """`_relaxed_lines(c)`, or None when whole lines `c` need no change. They do when
    they hold a tab (one memchr) or a space before a space or a CR: found as "  " once
    every CR is a space (a single-byte replace and one search; "  " and " \r\n" were
    two searches of every text block, and a needle of blanks is searched nearly byte by
    byte through text). From the first such place on, a "  " means runs to compress,
    else only single blanks before CRLFs go."""
    if c.find(b"\t") >= 0:
        return _relaxed_lines(c)
    at = c.replace(b"\r", b" ").find(b"  ")
    if at < 0:
        return None
    if c.find(b"  ", at) >= 0:
        return _relaxed_lines(c)
    return c.replace(b" \r\n", b"\r\n")


class RelaxedBodyHash:
    """RFC 6376 3.4.4 relaxed body canonicalization + hash, fed in pieces of any size:
    the bytes dkimpy's `rfc822_parse` + `Relaxed.canonicalize_body` would hash for the
    whole body (bare LF read as CRLF as dkimpy does), holding at most one partial line
    and a count of pending empty lines. Each block is cut after its last LF, so every
    search and replace works on whole lines (no blank run or CRLF spans two blocks).
    `crlf_only`: the producer refused every bare CR and LF (smtpd/bodyreader.py), so the
    body's line ends need no second look (~120 µs per 100 KiB)."""

    def __init__(self, hasher: Callable[[], Any], crlf_only: bool = False) -> None:
        self._h = hasher()
        self._crlf_only = crlf_only
        self._carry = b""
        self._pending = 0  # CRLFs after the last non-empty line, not hashed yet
        self._content = False

    def update(self, data: bytes) -> None:
        if self._carry:
            data = self._carry + data
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        if cut:
            self._block(data[:cut] if cut < len(data) else data)

    def _block(self, c: bytes) -> None:
        if not self._crlf_only and c.count(b"\n") != c.count(b"\r\n"):
            c = _EOL.sub(b"\r\n", c)
        # Only the block up to its last blank (and the CRLF that may follow it) can
        # change: found with two memrchr calls, so a blank-free stretch (a base64 part,
        # the rest of a block after its text) is not searched. Every whitespace run, and
        # every run ending a line, lies wholly inside `head` (see _relaxed_change).
        head = max(c.rfind(b" "), c.rfind(b"\t")) + 3
        if head > 2:
            changed = _relaxed_change(c[:head] if head < len(c) else c)
            if changed is not None:
                c = changed + c[head:] if head < len(c) else changed
        end = len(c)
        while c.endswith(b"\r\n", 0, end):
            end -= 2
        if end:
            if self._pending:
                self._h.update(b"\r\n" * self._pending)
            self._h.update(c[:end] if end < len(c) else c)
            self._pending = (len(c) - end) // 2
            self._content = True
        else:
            self._pending += len(c) // 2

    def digest(self) -> bytes:
        if self._carry:  # a last line without line end (dkimpy adds the CRLF)
            self._block(self._carry)
            self._carry = b""
        if self._content:
            self._h.update(b"\r\n")
            self._content = False
        return self._h.digest()


def _header_end(buf: bytes) -> int:
    """Where the body starts (after the empty line ending the header section, as dkimpy's
    `rfc822_parse` splits), or -1 when `buf` holds no complete header section yet."""
    if buf.startswith(b"\r\n"):
        return 2
    if buf.startswith(b"\n"):
        return 1
    m = re.search(rb"\n\r?\n", buf)
    return m.end() if m else -1


# Bytes RFC 6376 3.4.2 keeps as they are in a signed field but OpenDKIM (2.11) reads
# otherwise (VT and FF as blanks; NUL and a bare CR end its reading): a signature over
# them fails at receivers running it, so such a message goes unsigned. RFC 5322 allows
# them only as obsolete syntax (4.1); SMTP refuses NUL and bare CR already.
_VERIFIERS_DIFFER = re.compile(rb"[\x00\x0b\x0c]|\r(?!\n)")
VERIFIERS_DIFFER = "a signed header field holds VT, FF, NUL or a bare CR (verifiers disagree)"
MAX_HEADER_SECTION = 1 << 20  # a streamed message's header section read before deciding
FROM_NOT_OWNED = "From: not owned by user"  # the maillog reason (dkim=skipped)


PrivateKey = rsa.RSAPrivateKey | nacl.signing.SigningKey


def _signing_key(key: DkimKey) -> PrivateKey:
    """The parsed private key, made once per key (at load and reload), not per message:
    OpenSSL's RSA key through `cryptography`, a nacl SigningKey for Ed25519 (deriving it
    from the seed is ~17 µs)."""
    if key.algorithm == "ed25519":
        return nacl.signing.SigningKey(key.signing_key, encoder=nacl.encoding.Base64Encoder)
    pk = serialization.load_pem_private_key(key.signing_key, password=None)
    if not isinstance(pk, rsa.RSAPrivateKey):  # keys.py reads the algorithm from the key
        raise DkimKeyError(f"{key.path}: not an RSA key")
    return pk


@dataclass(frozen=True)
class _State:
    keys: dict[str, tuple[DkimKey, ...]]
    privkeys: dict[tuple[str, str], PrivateKey]  # (domain, selector) -> _signing_key()
    domains: frozenset[str] | None  # None: every domain that has a key
    headers: tuple[str, ...]  # lower case, in order, without duplicates
    oversign: frozenset[str]
    problems: tuple[str, ...]
    configured: tuple[str, ...]  # `[dkim] domains` as written (what reload() re-reads)
    # `headers` and `oversign` as the h= list names them (made once, not per message)
    sign_names: tuple[bytes, ...] = ()  # headers, encoded
    oversign_names: frozenset[bytes] = frozenset()  # oversign, encoded
    oversign_only: tuple[bytes, ...] = ()  # oversign not in headers, sorted, encoded


# A header line that starts a field: its name, then (RFC 5322 4.5.3 obs-optional, which a
# reader must accept) spaces before the colon, then the colon. With a tab among those
# blanks (`_TAB_GAP`) OpenDKIM (2.11) verifies no signature of the message at all.
_FIELD_START = re.compile(rb"([\x21-\x7e]+?) *:")
_TAB_GAP = re.compile(rb"[\x21-\x7e]+?[ \t]*\t[ \t]*:")
TAB_GAP = "a tab before a header field's colon: OpenDKIM verifies no signature of it"


class HeaderSyntaxError(ValueError):
    """A header section line that is neither a field, nor a fold, nor an mbox `From `
    line, or a field a verifier cannot read (TAB_GAP): the message goes unsigned."""


def split_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of the header section `head` (up to its empty line) as the signer reads
    them: (name, value with its CRLF, folds appended). dkimpy's split (its verifier's:
    `rfc822_parse`), except for a field name followed by spaces before its colon (`Subject
    : x`, obs-optional): dkimpy refuses the section (or drops a `From :` line as an mbox
    separator), while RFC 6376 3.4.2 reads it as the field (relaxed canonicalization
    deletes the blanks) and so does OpenDKIM (2.11, what most receivers run): such a
    message is signed as OpenDKIM verifies it, the field covered under its name without
    the spaces (dkimpy's verifier cannot read the section, whoever signed it). A tab
    among those blanks raises HeaderSyntaxError (TAB_GAP); an mbox `From ` line (no colon
    after its first word) is skipped, as dkimpy does; any other line raises too."""
    # [name, first line's value, folds...]: a value grown a fold at a time was copied per
    # fold (a 256 KiB field of 60,000 folds: 0.15 s of the commit thread's CPU)
    fields: list[list[bytes]] = []
    for line in re.split(b"\r?\n", head):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            if not fields:
                raise HeaderSyntaxError("a folded line before any field")
            fields[-1].append(line + b"\r\n")
            continue
        m = _FIELD_START.match(line)
        if m is not None:
            fields.append([m[1], line[m.end():] + b"\r\n"])
        elif _TAB_GAP.match(line):
            raise HeaderSyntaxError(TAB_GAP)
        elif not line.startswith(b"From "):
            raise HeaderSyntaxError("a line that is not a header field")
    return [(f[0], f[1]) if len(f) == 2 else (f[0], b"".join(f[1:])) for f in fields]


def from_domain(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """The signing domain for these header fields: (domain, "") or (None, why not)."""
    values = [v for n, v in headers if n.lower() == b"from"]
    if not values:
        return None, "no From: field"
    if len(values) > 1:
        return None, "several From: fields"  # RFC 5322 3.6: exactly one
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    # The common `Name <a@b.c>` read without the parser (~20 µs): the same address.
    plain = plain_mailbox(text)
    try:
        addrs = [plain] if plain is not None else [
            a for _n, a in email.utils.getaddresses([text])]
    except RecursionError:  # comments nested ~1,000 deep: the parser recurses per level
        return None, "From: not parsable (comments nested too deep)"
    domains = set()
    for addr in addrs:
        if "@" not in addr:
            continue
        # Keys live under the A-label (RFC 5890) of an internationalised domain; one that
        # IDNA2003 would map onto another name is not signed for (ownership.a_label).
        dom = a_label(addr.rpartition("@")[2].strip(" \t").rstrip(".").lower())
        if not dom:
            return None, "From: domain is not a valid domain name"
        domains.add(dom)
    if not domains:
        return None, "no address in From:"
    if len(domains) > 1:
        return None, "From: mailboxes of several domains"
    return domains.pop(), ""


def _unsigned(st: _State, domain: str) -> str:
    """"" when this state signs mail of `domain` (a From: domain in comparison form),
    else why not (the `dkim=none` reason)."""
    if st.domains is not None and domain not in st.domains:
        return f"{domain} not in dkim.domains"
    if not st.keys.get(domain):
        return f"no key for {domain}"
    return ""


class Signer:
    """Thread-safe: `reload()` swaps an immutable state that `__call__` reads once."""

    def __init__(self, store: KeyStore, *, domains: tuple[str, ...] = (),
                 headers: tuple[str, ...] = (), oversign: tuple[str, ...] = (),
                 maillog: DkimLog, report: bool = True) -> None:
        """`report`: write each problem of the keys and `[dkim]` (`dkim=warning,
        problem=...`) at load and reload. A server has one signer per part and process
        that all read the same files: only one of them reports (wiring.signer), so a
        problem is one line per start and per reload, not one per part."""
        self.store = store
        self._maillog = maillog
        self._report = report
        self._lock = threading.Lock()
        self._state = self._make_state(domains, headers, oversign)

    @classmethod
    def from_config(cls, cfg: Config, maillog: DkimLog, *, report: bool = True) -> Signer:
        """Load the keys of `cfg.dkim_dir` and the `[dkim]` settings (start, SIGHUP)."""
        return cls(KeyStore(cfg.dkim_dir), domains=cfg.dkim.domains,
                   headers=cfg.dkim.headers, oversign=cfg.dkim.oversign, maillog=maillog,
                   report=report)

    def reload(self, cfg: Config | None = None) -> None:
        """Re-read the keys (and `[dkim]` from `cfg` when given): SIGHUP."""
        with self._lock:
            if cfg is not None:
                self.store.root = cfg.dkim_dir
                st = self._make_state(cfg.dkim.domains, cfg.dkim.headers, cfg.dkim.oversign)
            else:
                old = self._state
                st = self._make_state(old.configured, old.headers, tuple(old.oversign))
            self._state = st

    def _make_state(self, domains: tuple[str, ...], headers: tuple[str, ...],
                    oversign: tuple[str, ...]) -> _State:
        self.store.load()
        problems = list(self.store.problems)
        hdrs: list[str] = []
        for h in (x.lower() for x in headers):
            if h in _NEVER_SIGN:
                problems.append(f"dkim.headers: {h} is never signed (RFC 6376 5.4), ignored")
            elif h not in hdrs:
                hdrs.append(h)
        if "from" not in hdrs:
            hdrs.insert(0, "from")  # RFC 6376 5.4: From MUST be signed
        over = frozenset(h.lower() for h in oversign) - _NEVER_SIGN
        # Compared as the From: domain is (from_domain): lower case, A-label, so an
        # internationalised domain may be written either way in the config.
        dset: frozenset[str] | None = None
        if domains:
            names = {d: a_label(d.lower().rstrip(".")) for d in domains}
            for d in (d for d, a in names.items() if not a):
                problems.append(f"dkim.domains: {d} is not a domain name we can sign for "
                                "(IDNA2003 maps it onto another name), ignored")
            dset = frozenset(a for a in names.values() if a)
        if dset is not None:
            for d in sorted(dset):
                if d not in self.store.keys:
                    problems.append(f"dkim.domains: {d} has no key (authrelay dkim keygen {d})")
        for p in problems if self._report else ():
            self._log(None, dkim="warning", problem=p)
        privkeys = {(k.domain, k.selector): _signing_key(k) for k in self.store.all()}
        return _State(dict(self.store.keys), privkeys, dset, tuple(hdrs), over,
                      tuple(problems), tuple(domains),
                      tuple(h.encode() for h in hdrs), frozenset(h.encode() for h in over),
                      tuple(h.encode() for h in sorted(over - set(hdrs))))

    @property
    def problems(self) -> tuple[str, ...]:
        return self._state.problems

    def domains(self) -> list[str]:
        """The domains whose mail is signed."""
        st = self._state
        return sorted(d for d in st.keys if st.domains is None or d in st.domains)

    def _log(self, qid: str | None, dkim: str, **fields: Any) -> None:
        """`QID: dkim=RESULT, ...` through the maillog this signer was given."""
        self._maillog.dkim(qid, dkim, **fields)

    def _include(self, st: _State, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        """The h= list: each configured name once per field of that name, an over-signed
        name once more."""
        return list(_selection(st, tuple([n.lower() for n, _v in headers]))[0])

    def bind(self, queue_id: str, owner: Owner | None = None, *,
             crlf_only: bool = False, from_domain: str = "") -> _Bound | None:
        """This signer for one message: its maillog notes carry `queue_id`. None when no
        key is loaded at all, so the spool never reads a streamed message back for it.
        `owner`: an authenticated user's message is signed only when every From:/Sender:
        mailbox of the header as this signer parses it is the user's (the accept path
        decided so on the header as received; this keeps a parser difference between the
        two from lending a signature). `crlf_only`: the message has no bare CR or LF
        (the SMTP body reader refuses them), see RelaxedBodyHash. `from_domain`: the
        domain of the one From: field as the accept path's ownership check read it
        (`Owner.assess`); when no key here signs it, None and the `dkim=none` note now,
        on the caller's thread: the commit thread then parses nothing (the note's reason
        is the one the signer's own parse would give, "no key for D" or "D not in
        dkim.domains": `assess` names no domain for a header dkimpy splits otherwise)."""
        st = self._state
        if not st.keys:
            return None
        if from_domain:
            why = _unsigned(st, from_domain)
            if why:
                self._log(queue_id, dkim="none", reason=why)
                return None
        return _Bound(self, queue_id, owner, crlf_only)

    def skip(self, queue_id: str | None, reason: str) -> None:
        """Not signed by policy: `QID: dkim=skipped, reason=R`."""
        self._log(queue_id, dkim="skipped", reason=reason)

    def _decide(self, st: _State, head: bytes, queue_id: str | None,
                owner: Owner | None = None
                ) -> tuple[bytes, str, tuple[DkimKey, ...], tuple[bytes, ...]] | None:
        """(the signed header fields, canonicalized, from dkimpy's split of the header
        section; domain; keys; names of the fields to sign, the h= list), or None
        (unsigned; the maillog says why)."""
        try:
            headers = split_fields(head)
        except HeaderSyntaxError as e:  # unparsable header section: go unsigned
            self._log(queue_id, dkim="none", reason=f"message not parsable ({e})")
            return None
        domain, why = from_domain(headers)
        if domain is None:
            self._log(queue_id, dkim="none", reason=why)
            return None
        why = _unsigned(st, domain)
        if why:
            self._log(queue_id, dkim="none", reason=why)
            return None
        keys = st.keys[domain]
        # Only a message about to be signed needs the ownership check (a full parse of
        # From:/Sender: with both stdlib parsers, ~0.15-0.25 ms): deciding it first cost
        # every unsigned message that much in the commit thread, before its fsync and 250.
        if owner is not None and owner.verdict(
                b"".join(n + b":" + v for n, v in headers)):
            self.skip(queue_id, FROM_NOT_OWNED)
            return None
        include, picks = _selection(st, tuple([n.lower() for n, _v in headers]))
        signed = b"".join([_relaxed_header(*headers[i]) for i in picks])
        if _VERIFIERS_DIFFER.search(signed):
            self._log(queue_id, dkim="none", reason=VERIFIERS_DIFFER)
            return None
        return signed, domain, keys, include

    def __call__(self, message: bytes, queue_id: str | None = None,
                 owner: Owner | None = None) -> bytes | None:
        """DKIM-Signature fields (CRLF-terminated) to prepend, or None (unsigned)."""
        return self.sign_stream((message,), queue_id, owner)

    def sign_stream(self, chunks: Iterable[bytes], queue_id: str | None = None,
                    owner: Owner | None = None, *, crlf_only: bool = False) -> bytes | None:
        """DKIM-Signature fields (CRLF-terminated) for a message given in pieces of any
        size (the whole message as one piece, or a streamed file read back in bounded
        chunks), or None (unsigned). The header section decides (and reading stops after
        it when the message is not to be signed); the body is hashed as it comes, once
        per hash algorithm whatever the number of keys, and each key signs that hash."""
        st = self._state
        if not st.keys:  # DKIM not in use here: no note per message
            return None
        it = iter(chunks)
        buf = b""
        start = -1
        for chunk in it:
            buf += chunk
            start = _header_end(buf)
            if start >= 0:
                break
            if len(buf) > MAX_HEADER_SECTION:
                self._log(queue_id, dkim="none", reason="header section over 1 MiB")
                return None
        if start < 0:  # no empty line: all header fields, an empty body (as dkimpy reads)
            start = len(buf)
        head = buf[:start]
        decided = self._decide(st, head, queue_id, owner)
        if decided is None:
            return None
        signed, domain, keys, include = decided  # the one parse of the header section
        # One body hash for every key: both algorithms we sign with (rsa-sha256,
        # ed25519-sha256; keys.DkimKey.dkim_algorithm) hash with SHA-256.
        hasher = RelaxedBodyHash(hashlib.sha256, crlf_only)
        hasher.update(buf[start:])
        del buf
        for chunk in it:
            hasher.update(chunk)
        bodyhash = hasher.digest()
        stamp = str(int(time.time())).encode("ascii")
        out: list[bytes] = []
        for key in keys:
            alg = key.dkim_algorithm
            try:
                out.append(_signature_field(
                    signed, include, alg, domain.encode(), key.selector.encode(), stamp,
                    bodyhash, st.privkeys[key.domain, key.selector]))
            except Exception as e:  # never fail the message over a signature
                log.exception("DKIM signing failed (%s, s=%s)", domain, key.selector,
                              extra={"queue_id": queue_id})  # daemon.MaillogHandler
                self._log(queue_id, dkim="error", d=domain, s=key.selector,
                          reason=type(e).__name__)
        if not out:
            return None
        self._log(queue_id, dkim="signed", d=domain, s=",".join(k.selector for k in keys))
        return b"".join(out)


class _Bound:
    """A Signer for one queue id: `(message)` or `.sign_stream(chunks)`."""

    __slots__ = ("signer", "queue_id", "owner", "crlf_only")

    def __init__(self, signer: Signer, queue_id: str, owner: Owner | None = None,
                 crlf_only: bool = False) -> None:
        self.signer, self.queue_id, self.owner = signer, queue_id, owner
        self.crlf_only = crlf_only

    def __call__(self, message: bytes) -> bytes | None:
        return self.sign_stream((message,))

    def sign_stream(self, chunks: Iterable[bytes]) -> bytes | None:
        return self.signer.sign_stream(chunks, self.queue_id, self.owner,
                                       crlf_only=self.crlf_only)

    def skip(self, reason: str) -> None:
        self.signer.skip(self.queue_id, reason)


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2 relaxed header canonicalization of one field, with its CRLF:
    name in lower case without the blanks before the colon, value unfolded, every run of
    blanks one space, none at either end (as dkimpy's `Relaxed`, property-tested)."""
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    return b"".join((name.lower().rstrip(), b":", value.strip(), b"\r\n"))


def _select(names: tuple[bytes, ...], sign_names: tuple[bytes, ...],
            oversign_names: frozenset[bytes], oversign_only: tuple[bytes, ...]
            ) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """For header fields named `names` (lower case, top to bottom): (the h= list, where
    the fields it covers are, in the order they are signed). h=: each configured name
    once per field of that name, an over-signed name once more. The fields: for each
    name of h= in turn, the last field of that name not yet taken, counting from the
    bottom (RFC 6376 5.4.2); a name with no field left adds nothing (over-signing)."""
    at: dict[bytes, list[int]] = {}
    for i, n in enumerate(names):
        at.setdefault(n, []).append(i)
    include: list[bytes] = []
    picks: list[int] = []
    for h in (*sign_names, *oversign_only):
        pos = at.get(h, [])
        include.extend([h] * (len(pos) + (h in oversign_names)))
        picks.extend(reversed(pos))
    return tuple(include), tuple(picks)


# Layouts kept: 64 of at most 32 names (a name is under a line, 998 bytes: ~2 MiB at worst
# per process, a few KiB for real mail); a header section of more fields is not cached.
_select_cached = functools.lru_cache(maxsize=64)(_select)
_CACHED_FIELDS = 32


def _selection(st: _State, names: tuple[bytes, ...]
               ) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """`_select` for this state's configured names, cached by the field names (a
    sender's messages repeat one header layout: ~4 µs of the commit thread's CPU per
    signed message, docs/PERFORMANCE.md (22))."""
    select = _select_cached if len(names) <= _CACHED_FIELDS else _select
    return select(names, st.sign_names, st.oversign_names, st.oversign_only)


def _fold(tokens: list[bytes], column: int) -> bytes:
    """`tokens` joined by single spaces, a space becoming CRLF SP where the line would
    pass _WIDTH (folding whitespace: relaxed canonicalization reads both as one space)."""
    out: list[bytes] = []
    for t in tokens:
        if out:
            if column + 1 + len(t) > _WIDTH:
                out.append(b"\r\n ")
                column = 1
            else:
                out.append(b" ")
                column += 1
        out.append(t)
        column += len(t)
    return b"".join(out)


_BH_SLOT = b"\x00" * len(base64.b64encode(bytes(hashlib.sha256().digest_size)))


@functools.lru_cache(maxsize=256)
def _tag_list(include: tuple[bytes, ...], algorithm: bytes, domain: bytes, selector: bytes,
              stamp: bytes) -> tuple[bytes, bytes]:
    """The folded tag list of a DKIM-Signature value, cut around bh='s value: (up to
    "bh=", from its ";" to the final "b="). Folding depends on the tokens' lengths only,
    and every SHA-256 bh= is as long as `_BH_SLOT`, so one folding serves every body of
    the same h= list, key and second (`t=`)."""
    names = b" : ".join(include).split(b" ")
    names[-1] += b";"
    tokens = [b"v=1;", b"a=" + algorithm + b";", b"c=" + _C_VALUE + b";",
              b"d=" + domain + b";", b"i=@" + domain + b";", b"q=dns/txt;",
              b"s=" + selector + b";", b"t=" + stamp + b";", b"h=" + names[0],
              *names[1:], b"bh=" + _BH_SLOT + b";", b"b="]
    value = _fold(tokens, len(b"DKIM-Signature: "))
    cut = value.rindex(_BH_SLOT)
    return value[:cut], value[cut + len(_BH_SLOT):]


def _signature_field(signed: bytes, include: tuple[bytes, ...], algorithm: bytes, domain: bytes,
                     selector: bytes, stamp: bytes, bodyhash: bytes, pk: PrivateKey) -> bytes:
    """One DKIM-Signature field, CRLF-terminated (RFC 6376 3.5, 3.7): tags v a c d i q s
    t h bh b, relaxed/relaxed, no l=. The signed data is the canonical header fields then
    this field with an empty b= and no CRLF; RSASSA-PKCS1-v1_5 signs it with SHA-256
    (RFC 6376 3.3.1), Ed25519 signs its SHA-256 hash (RFC 8463 3)."""
    before, after = _tag_list(include, algorithm, domain, selector, stamp)
    bh = base64.b64encode(bodyhash)
    if len(bh) != len(_BH_SLOT):
        raise ValueError(f"bh= of {len(bh)} characters, not {len(_BH_SLOT)}")
    value = before + bh + after
    data = signed + _relaxed_header(b"DKIM-Signature", value)[:-2]  # without its CRLF
    if isinstance(pk, rsa.RSAPrivateKey):
        sig = pk.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = pk.sign(hashlib.sha256(data).digest()).signature
    # b= goes on after the last line's "b=", cut to the width (FWS inside b= is ignored).
    b64 = base64.b64encode(sig)
    last = len(value) - value.rfind(b"\n") - 1
    room = max(_WIDTH - last - (0 if b"\n" in value else len(b"DKIM-Signature: ")), 0)
    lines = [b64[:room]] + [b64[i:i + _WIDTH - 1] for i in range(room, len(b64), _WIDTH - 1)]
    return b"DKIM-Signature: " + value + b"\r\n ".join(lines) + b"\r\n"
