"""Sender ownership: which addresses an authenticated user may send as, envelope and header.

Owns the one answer to "may USER send as ADDRESS?" that `[auth] sender_policy = "own"`
(MAIL FROM, Postfix reject_sender_login_mismatch), `[auth] from_header_policy = "own"`
(the RFC 5322 From:/Sender: fields) and the DKIM signer (`[dkim] sign_unowned`) share:
an address is the user's when it is one of the user's addresses, or when the user's name
is itself that address. Addresses compare case-insensitively (local part included, as the
user DB stores them), a quoted local part by its content (RFC 5322 3.4.1: `"bob"@x` is
`bob@x`), a domain without its trailing dot and by its A-label (RFC 5890).

Contract: pure functions, no I/O.
- `may_send_as(address, user, owned) -> bool`
- `header_mailboxes(header_section) -> (addresses, problem)`: every mailbox of every
  From: and Sender: field of a header section as received (RFC 5322 3.6.2), parsed with
  both of the standard library's address parsers (`email.utils.getaddresses` and
  `email.headerregistry`) and the union taken, so a header one parser reads differently
  from the other (a display name holding an address, `a@x <b@y>`) cannot hide a mailbox.
  `problem` is "" or why the header cannot be vouched for (no From:, an encoded word or
  group where an address belongs, a parse defect, From:/Sender: values longer than
  MAX_FIELDS_CHARS in all). An address a reader is shown beside
  the mailboxes (display name, comment, group name, after unfolding, decoding
  encoded-words, unescaping quoted-pairs; an obs-route's `<@x:...>`) counts as one of
  them. A field value of the plain shapes
  nearly all mail has (`local@domain`, `<local@domain>`, `Name Words <local@domain>`,
  `"Smith, Bob" <local@domain>`; dot-atoms of letters, digits, `_+-` only) is read by one
  regex instead (~5 µs against ~100-400 µs of the two parsers): what both parsers read
  for such a value is that address, and a property test holds the two paths to the same
  answer.
- `header_verdict(header_section, user, owned) -> str`: "" when every From:/Sender:
  mailbox is the user's, else the reason (for the maillog; never sent to the client);
  `NO_FROM` when all is owned but there is no From: field at all.
- `Owner.of(user, owned)`: the user and its addresses, `.verdict(header_section)`;
  `.assess(header_section)` adds the From: domain when the verdict is "" (one From:
  field, all its mailboxes in one domain, every line of the section a field written
  `name:` or a fold: no obs-optional `From :`; else "").
Failure policy: anything that cannot be parsed as a plain address is not owned (a refusal
or an unsigned message, never a signature lent to a domain the user does not own).
"""

from __future__ import annotations

import codecs
import email.header
import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.errors import HeaderParseError, InvalidHeaderDefect
from email.headerregistry import HeaderRegistry

_REGISTRY = HeaderRegistry()
# RFC 5322 2.2 / 4.5.3 (obs-optional): a field name, optional white space, a colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_CHECKED = (b"from", b"sender")
# A line of a header section that is neither a field written `name:` (no blank before the
# colon: obs-optional, RFC 5322 4.5.3, is a field here but not to every reader) nor a
# folded continuation of one, nor the section's end (its empty line included). `assess`
# names no From: domain for a section holding one: the DKIM signer's split
# (signer.split_fields) decides such a section itself (it reads `name :` as the field,
# refuses a tab before the colon and any other such line, "message not parsable"), so
# its note is the one the signer makes. (Two patterns, the first line and then every other: one
# pattern with an `\A` alternative tried at every position took about five times longer.)
_FIRST_LINE = re.compile(rb"[!-9;-~]+:|\r?\n?\Z")
_ODD_LINE = re.compile(rb"\n(?![ \t]|[!-9;-~]+:|\r?\n?\Z)")
# The stdlib parsers take time growing with the square of a value's length on some
# inputs (many comments, dots, quoted strings: ~0.1 s for 2 KiB, minutes for the 256 KiB
# of header the accept path reads, spent on the session's event loop): From: and Sender:
# values longer than this in all (unfolded; some 26 lines of 78) are not vouched for.
MAX_FIELDS_CHARS = 2048
# header_verdict() of a header without From: (nothing to vouch for: never signed, but
# not refused either -- nothing in it claims an address the user does not own).
NO_FROM = "no From: field"

_ATOM = r"[A-Za-z0-9_+-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+"
# Anything shaped like an address (an at sign, ASCII or a look-alike, between two runs
# of characters that do not end an address).
# (Tried only where such a run starts, the lookbehind: from every position of a long run
# without an at sign the scan cost the square of the run's length, seconds for a few
# kilobytes of display name.)
_SHOWN_ADDRESS = re.compile(
    r"(?<![^\s<>()\[\]\"',;:])[^\s<>()\[\]\"',;:]+[@\uff20\ufe6b][^\s<>()\[\]\"',;:]+")
# White space other than the ASCII space and tab (hair, thin, narrow no-break spaces, NBSP,
# VT, FF, the C0 separators \x1c-\x1f, NEL): drawn narrow or not at all, so
# `"ceo\u200a@\u200abank.test"` shows as an address; the shown text is also read with
# them taken out.
_ODD_BLANK = re.compile(r"[^\S \t]")
# Blanks and invisible format characters (soft hyphen, zero-width space/joiners, word
# joiner, BOM) next to an at sign: a folded quoted name `"ceo@\r\n bank.test"` is shown
# `ceo@ bank.test` by a reader that unfolds (RFC 5322 2.2.3), `ceo@bank.test` by one that
# drops the fold whole, and `"ceo @ bank.test"` reads as an address all the same. The
# shown text is also read with them taken out, an address found only that way counting
# when its domain has a dot (`"Bob @ Home"` stays a name).
# (A run of blanks is tried at its start only, the lookbehind: else from every blank of
# a long run, the square of its length.)
_GAP = r"[\s\u00ad\u200b-\u200f\u2060-\u2064\ufeff]"
_AT_GAP = re.compile(rf"(?<!{_GAP}){_GAP}+(?=[@\uff20\ufe6b])|(?<=[@\uff20\ufe6b]){_GAP}+")
# Punctuation a reader draws as text, not as the end of an address, when it stands in a
# display name or comment: an escaped quote (`"ceo\"@bank.test"` shows ceo"@bank.test),
# quotes, parentheses, brackets, commas (`"'ceo'@bank.test"`, `"(ceo)@bank.test"`,
# `"ceo@[192.0.2.1]"`). The squeezed text (_AT_GAP) is read with each turned into a blank.
_PUNCT = re.compile(r"[\"'()<>\[\],;:\\]")
# An angle-addr holding a colon outside a quoted string and a domain literal: an obs-route
# (RFC 5322 4.4, `<@bank.test:bob@mine.test>`). Both parsers drop the route, but some
# readers show its domains; a route is never vouched for (nobody sends one).
_ANGLE_COLON = re.compile(r"<([^<>]*:[^<>]*)>")
_QUOTED_OR_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\[[^\]]*\]')
# Bidirectional embeddings, overrides and isolates: `"\u202etset.knab @ oec"` is drawn
# right to left, `ceo @ bank.test`, its domain on the left of the at sign. In a field
# holding one, an address found in the squeezed text counts with or without a dot.
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
# Bytes of a field that are not UTF-8 (RFC 6532; kept as surrogates by header_fields) are
# shown in the reader's fallback charset, often a legacy East Asian one, where two bytes
# spell a fullwidth @ (A3 C0 in GBK and EUC-KR, 81 97 in Shift_JIS, A1 F7 in EUC-JP,
# A2 49 in Big5): such a value is also read in each of them (the superset codecs).
_UNDECODED = re.compile("[\udc80-\udcff]")
_FALLBACK_CHARSETS = ("gb18030", "cp932", "big5", "cp949", "euc-jp")
# An encoded-word's charset label Python does not know is read as each of these too.
_UNKNOWN_CHARSET_READINGS = (*_FALLBACK_CHARSETS, "utf-16-le", "utf-16-be")
# A domain's dot, or a character drawn like one (ideographic, fullwidth, halfwidth full
# stops; middle dot, one dot leader, hyphenation point, small full stop, word separator
# middle dot): `"ceo @ bank\u2024test"` shows as ceo @ bank.test.
_DOTS = ".\u3002\uff0e\uff61\u00b7\u2024\u2027\ufe52\u2e31"
_DOTTED = re.compile(rf"[@\uff20\ufe6b][^{_DOTS}@\uff20\ufe6b]*[{_DOTS}]")
# A value both stdlib parsers read as exactly one mailbox, that address (see
# header_mailboxes); anything else (quotes, comments, commas, encoded words, non-ASCII,
# a display name with punctuation) takes the two parsers.
# A run of RFC 2047 encoded-words separated only by linear white space: a reader shows it
# decoded and joined, the blanks between the words dropped (RFC 2047 6.2), which
# `email.headerregistry` does not do (`=?q?ceo?= =?q?=40x?=` is "ceo @x" to it, but
# "ceo@x" on screen). Encoded-words in a comment are shown decoded too (RFC 2047 5 (2)),
# and so is one glued to a word (not RFC 2047, but what lenient readers do).
_EW = r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?="
_EW_RUN = re.compile(rf"{_EW}(?:[ \t]+{_EW})*")
# The display name: plain words, or a quoted string of letters, digits, blanks and the
# punctuation of everyday names (`"Smith, Bob"`, `"Bob J. O'Neil-Smith"`, as Outlook
# quotes them): nothing a reader could show as an address (no @, quote, backslash, =?).
_PLAIN_MAILBOX = re.compile(
    rf"[ \t]*(?:(?:(?:[A-Za-z0-9]+(?: [A-Za-z0-9]+)*|\"[A-Za-z0-9 .,'_-]*\")[ \t]*)?"
    rf"<({_ADDR})>|({_ADDR}))[ \t]*",
    re.ASCII)


# KELVIN SIGN, the one character str.lower() turns into ASCII ('k'): kept as it is, so
# `\u212aelly@x` (another mailbox to the next hop) is not taken for kelly@x.
_KELVIN = "\u212a"


def _lower(s: str) -> str:
    return _KELVIN.join(part.lower() for part in s.split(_KELVIN))


def normalize(address: str) -> str:
    """The comparison form of an address: lower case (a KELVIN SIGN stays one), quoted
    local part unquoted, domain without trailing dot, an internationalised domain as its
    A-label. "" if not local@domain."""
    a = address.strip(" \t")  # only ASCII blanks: `bob@x\x0b` is not bob@x
    local, at, domain = a.rpartition("@")
    if not at or not local or not domain:
        return ""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    domain = a_label(_lower(domain.rstrip(".")))
    if not domain:
        return ""
    return f"{_lower(local)}@{domain}"


def a_label(domain: str) -> str:
    """A lower-case domain in ASCII: itself if ASCII, else its A-label, or "" when Python's
    IDNA2003 codec would map it onto another name (nameprep: ß to "ss", ZWJ and soft hyphen
    dropped, fullwidth folded, U+3002 read as a dot) -- an RFC 5890 reader sees another
    domain there (boß.test is xn--bo-fka.test, not boss.test), so it is never owned."""
    if domain.isascii():
        return domain
    try:
        ace = domain.encode("idna").decode("ascii")
        back = ace.encode("ascii").decode("idna")
    except UnicodeError:
        return ""
    return ace if back == domain else ""


def owned_set(user: str, owned: Iterable[str]) -> frozenset[str]:
    """The user's addresses in comparison form (a user named like an address owns it)."""
    out = {normalize(a) for a in owned}
    if "@" in user:
        out.add(normalize(user))
    out.discard("")
    return frozenset(out)


def may_send_as(address: str, user: str, owned: Iterable[str]) -> bool:
    """True when `address` is one of `user`'s addresses (see the module docstring)."""
    want = normalize(address)
    return bool(want) and want in owned_set(user, owned)


def header_fields(header_section: bytes, names: tuple[bytes, ...] = _CHECKED
                  ) -> list[tuple[bytes, str]]:
    """(lower-case name, unfolded value) of the fields called `names`, in order. The value
    is decoded as UTF-8 (RFC 6532) with undecodable bytes kept as surrogates, so they
    never compare equal to an owned address."""
    out: list[tuple[bytes, str]] = []
    cur: list[bytes] | None = None
    name = b""
    for line in header_section.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):  # RFC 5322 2.2.3 folding
            if cur is not None:
                cur.append(line)
            continue
        if cur is not None:
            out.append((name, b" ".join(cur).decode("utf-8", "surrogateescape")))
            cur = None
        m = _FIELD.match(line)
        if m and m.group(1).lower() in names:
            name = m.group(1).lower()
            cur = [line[m.end():]]
    if cur is not None:
        out.append((name, b" ".join(cur).decode("utf-8", "surrogateescape")))
    return out


def plain_mailbox(value: str) -> str | None:
    """The address of a field value both stdlib parsers (`email.headerregistry` and
    `email.utils.getaddresses`) read as exactly that one mailbox: `a@b.c`, `<a@b.c>`,
    `Name Words <a@b.c>`, `"Smith, Bob J." <a@b.c>`: plain ASCII without comments,
    encoded words, or an @ in the name (property-tested against both); None for anything
    else, which needs the parsers."""
    m = _PLAIN_MAILBOX.fullmatch(value)
    return (m.group(1) or m.group(2)) if m else None


def header_mailboxes(header_section: bytes) -> tuple[list[tuple[str, str]], str]:
    """(field label, mailbox address as written) of every From:/Sender: mailbox, and ""
    or the problem that keeps the header from being vouched for."""
    return _mailboxes(header_fields(header_section))


def _mailboxes(fields: list[tuple[bytes, str]]) -> tuple[list[tuple[str, str]], str]:
    """header_mailboxes() of the From:/Sender: fields already split out."""
    if sum(len(v) for _n, v in fields) > MAX_FIELDS_CHARS:
        return [], f"From:/Sender: longer than {MAX_FIELDS_CHARS} characters"
    found: list[tuple[str, str]] = []
    for name, value in fields:
        label = "From:" if name == b"from" else "Sender:"
        a = plain_mailbox(value)
        if a is not None:  # what each of the two parsers reads: this one address
            found += [(label, a), (label, a)]
            continue
        addrs, problem = _parsed_mailboxes(label, value)
        found += [(label, a) for a in addrs]
        if problem:
            return found, problem
    return found, "" if any(n == b"from" for n, _ in fields) else NO_FROM


def _parsed_mailboxes(label: str, value: str) -> tuple[list[str], str]:
    """The addresses of one field value as both stdlib parsers read it (the union), and
    "" or the problem (with the addresses read before it)."""
    try:
        parsed = _REGISTRY(label[:-1], value)
    except Exception:  # the stdlib parser failing on hostile input: not vouched for
        return [], f"{label} not parsable"
    if any(isinstance(d, InvalidHeaderDefect) for d in parsed.defects):
        return [], f"{label} not parsable"
    addrs = [a.addr_spec for a in parsed.addresses]  # type: ignore[attr-defined]
    addrs += [a for _n, a in email.utils.getaddresses([value])]
    if not addrs:
        return [], f"{label} holds no address"
    for i, a in enumerate(addrs):
        if not normalize(a) or a.startswith("=?"):
            return addrs[:i], f"{label} holds something that is not an address"
    # What a reader is shown besides the mailboxes: an address in a display name (quoted
    # or encoded: `"ceo@x" <bob@y>`), a comment (`<bob@y>(<ceo@x>)`) or a group name.
    # Each must be the user's too, so a signature never vouches for a field that shows
    # someone else's address.
    if ":" in value:
        addrs += [m for m in _ANGLE_COLON.findall(_QUOTED_OR_LITERAL.sub("", value))
                  if ":" in _QUOTED_OR_LITERAL.sub("", m)]
    mailboxes = {normalize(a) for a in addrs}
    names = [a.display_name for a in parsed.addresses]  # type: ignore[attr-defined]
    names += [g.display_name or "" for g in parsed.groups]  # type: ignore[attr-defined]
    shown, unknown = _as_shown(value)
    if shown is None:
        return [], f"{label} not parsable"
    texts = [value.replace("\\", ""), *names, shown]
    if unknown:  # a charset label Python lacks: what each likely charset would show
        texts += [_as_shown(value, c)[0] or "" for c in _UNKNOWN_CHARSET_READINGS]
    if _UNDECODED.search(value):
        raw = value.encode("utf-8", "surrogateescape")
        texts += [raw.decode(c, "replace") for c in _FALLBACK_CHARSETS]
    texts += [_ODD_BLANK.sub("", t) for t in texts if _ODD_BLANK.search(t)]
    texts = list(dict.fromkeys(texts))  # the shown value is most often the value itself
    for text in texts:
        addrs += [t for t in _SHOWN_ADDRESS.findall(text) if normalize(t) not in mailboxes]
    reordered = _BIDI.search(shown) is not None
    for text in texts:
        spaced = _PUNCT.sub(" ", text)
        squeezed = _AT_GAP.sub("", spaced)
        if squeezed != spaced:  # else its addresses are the ones just read
            addrs += [t for t in _SHOWN_ADDRESS.findall(squeezed)
                      if (reordered or _DOTTED.search(t)) and normalize(t) not in mailboxes]
    return addrs, ""


def _as_shown(value: str, unknown: str = "latin-1") -> tuple[str | None, bool]:
    """`value` with each run of encoded-words replaced by what a reader shows for it
    (RFC 2047 6.2: decoded, the white space between adjacent encoded-words dropped), or
    None when one cannot be decoded. Replaced in place, wherever it stands: readers
    decode an encoded-word glued to other text too (`ceo=?q?=40x?=` shows "ceo@x"). A
    charset Python does not know is read as `unknown` (Latin-1: its ASCII, an `@`, still
    shows); the flag says whether there was one (readers know labels Python does not:
    x-gbk, x-sjis, windows-31j, cn-big5, windows-949, ucs-2, unicodefffe, ...), or bytes
    the named charset does not hold (read as `unknown` too when that is not Latin-1).
    UTF-16 and UTF-32 without a byte order mark are big-endian to RFC 2781 4.3 readers,
    little-endian to Python and WHATWG ones: both readings are shown, side by side."""
    met_unknown = False

    def shown(m: re.Match[str]) -> str:
        nonlocal met_unknown
        text = ""
        for data, charset in email.header.decode_header(m.group()):
            raw = data if isinstance(data, bytes) else data.encode("ascii", "replace")
            try:
                codec = codecs.lookup((charset or "ascii").partition("*")[0]).name
            except LookupError:
                met_unknown = True
                text += raw.decode(unknown, "replace")
                continue
            try:
                text += raw.decode(codec)
            except UnicodeDecodeError:  # bytes outside the label's charset: readers
                met_unknown = True  # use a superset (WHATWG: GBK for gb2312, ...)
                text += raw.decode(codec if unknown == "latin-1" else unknown, "replace")
            if codec in ("utf-16", "utf-32"):
                text += " " + raw.decode(codec + "-be", "replace")
        return text
    try:
        return _EW_RUN.sub(shown, value), met_unknown
    except HeaderParseError:
        return None, met_unknown


def header_verdict(header_section: bytes, user: str, owned: Iterable[str]) -> str:
    """"" when every From:/Sender: mailbox of the header section is the user's, else why
    not (e.g. "From: <ceo@probe.test> not owned by bob")."""
    return _assess(header_section, user, owned_set(user, owned))[0]


def _assess(header_section: bytes, user: str, mine: frozenset[str]) -> tuple[str, str]:
    """(header_verdict(), the From: domain): the domain, in comparison form, shared by
    every mailbox of the one From: field when the verdict is "" and every line of the
    section is a `name:` field or a fold of one (_FIRST_LINE, _ODD_LINE), else ""."""
    fields = header_fields(header_section)
    found, problem = _mailboxes(fields)
    for label, a in found:
        if normalize(a) not in mine:
            return f"{label} <{a}> not owned by {user}", ""
    if problem or sum(n == b"from" for n, _ in fields) != 1 \
            or not _FIRST_LINE.match(header_section) or _ODD_LINE.search(header_section):
        return problem, ""
    domains = {normalize(a).rpartition("@")[2] for label, a in found if label == "From:"}
    return "", domains.pop() if len(domains) == 1 else ""


@dataclass(frozen=True, slots=True)
class Owner:
    """An authenticated user and the addresses it may send as (comparison form): what the
    spool's accept path checks a message's From:/Sender: against."""

    user: str
    addresses: frozenset[str]

    @classmethod
    def of(cls, user: str, owned: Iterable[str]) -> Owner:
        return cls(user, owned_set(user, owned))

    def verdict(self, header_section: bytes) -> str:
        """header_verdict() for this user: "" (all owned) or why not."""
        return _assess(header_section, self.user, self.addresses)[0]

    def assess(self, header_section: bytes) -> tuple[str, str]:
        """(verdict(), the From: domain): the one domain of the one From: field's
        mailboxes when the verdict is "" (every mailbox the user's) and the section is
        one the DKIM signer splits into the same fields (no obs-optional `name :`, no
        line that is neither a field nor a fold), else "". The same parse: what the
        accept path tells the DKIM signer, whose key for that domain is then looked up
        without parsing the header again (dkim/signer.py `bind`)."""
        return _assess(header_section, self.user, self.addresses)
