"""RFC 5321 paths, domains and ESMTP parameters.

Owns the strict parsing of `MAIL FROM:<...>` / `RCPT TO:<...>` arguments (RFC 5321 4.1.2,
4.1.3; RFC 6531 3.3 for SMTPUTF8). Used by smtpd, policy and delivery alike, so it imports
nothing from them.

Security stance (open-relay tricks, sendmail's `A p y` list):
- A source route `<@a,@b:user@c>` is accepted and stripped (RFC 5321 4.1.1.3, C): the
  final domain decides, the route is never used.
- `%`, `!` and a quoted `@` are ordinary local-part characters, never routing: only the
  domain after the last unquoted `@` of the mailbox decides where mail goes.
- `user@a@b` is a syntax error (two unquoted `@`).
- Domains compare case-insensitively and without a trailing dot.
Failure policy: every problem raises `AddressError` carrying the precise SMTP reply.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from authrelay.types import Reply


class AddressError(ValueError):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _err(code: int, enhanced: str, text: str) -> AddressError:
    return AddressError(Reply(code, enhanced, text))


# RFC 5321 4.1.2 atext (RFC 5322 3.2.3) plus, with SMTPUTF8, any non-ASCII (RFC 6531 3.3).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
                    r"[A-Za-z0-9\u0080-\U0010ffff])?)")
# A domain of ASCII LDH labels of 1-63 characters, each passing _LABEL: nearly every one
# a client sends, checked in one match (test_engine_fastpaths: it accepts none that the
# label by label check refuses).
_ASCII_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*"
                           r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")


@dataclass(frozen=True, slots=True)
class Address:
    local: str  # as written; a quoted one whose content needs no quotes unquoted
    domain: str  # as written, without a trailing dot; "[1.2.3.4]" for literals

    @property
    def domain_key(self) -> str:
        """The form domains are compared in: lower case, no trailing dot."""
        return self.domain.lower().rstrip(".")

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def ascii(self) -> bool:
        return (self.local + self.domain).isascii()

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def _parse_domain(text: str) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise _err(501, "5.1.3", "Bad address literal")
        inner = text[1:-1]
        try:
            if inner.lower().startswith("ipv6:"):
                # RFC 5321 4.1.3: IPv6-addr has no zone: ipaddress takes "fe80::1%eth0",
                # whose scope would let a delivery reach a link-local neighbour.
                if "%" in inner:
                    raise ValueError(inner)
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise _err(501, "5.1.3", "Bad address literal") from None
        return text
    d = text[:-1] if text.endswith(".") else text
    if not d or len(d.encode()) > 253:  # octets (RFC 5321 4.5.3.1.2), UTF-8 ones too
        raise _err(501, "5.1.3", "Bad domain syntax")
    if not _ASCII_DOMAIN.fullmatch(d):
        _check_labels(d)
    return d


def _check_labels(d: str) -> None:
    """Each label of `d` has 1-63 characters and passes _LABEL, else AddressError."""
    for lab in d.split("."):
        if not lab or len(lab) > 63 or not _LABEL.fullmatch(lab):
            raise _err(501, "5.1.3", "Bad domain syntax")


def parse_mailbox(text: str) -> Address:
    """Mailbox = Local-part "@" ( Domain / address-literal )  (RFC 5321 4.1.2)."""
    if text.startswith('"'):
        m = _QUOTED.match(text)
        if not m:
            raise _err(501, "5.1.3", "Bad local part syntax")
        local = _plain_local(m.group(0))
        rest = text[m.end():]
    else:
        at = text.find("@")
        if at < 0:
            raise _err(501, "5.1.3", "Address must include a domain")
        local, rest = text[:at], text[at:]
        if not _DOT_STRING.fullmatch(local):
            raise _err(501, "5.1.3", "Bad local part syntax")
    if not rest.startswith("@"):
        raise _err(501, "5.1.3", "Address must include a domain")
    domain_text = rest[1:]
    if "@" in domain_text:  # user@a@b: never guess which domain was meant
        raise _err(501, "5.1.3", "Bad address syntax (more than one @)")
    if len(local.encode()) > 64:
        raise _err(501, "5.1.3", "Local part too long")
    return Address(local, _parse_domain(domain_text))


def _plain_local(quoted: str) -> str:
    """A quoted local part as it is compared everywhere: its content when that is a
    plain dot-string (`"root"`, `"r\\oot"` -> `root`: RFC 5321 4.1.2, the same mailbox
    as the unquoted form, which a sender SHOULD use), else as written. The one place
    this is decided: [aliases], the postmaster rules, ownership and the maillog all see
    `root@host` for `<"root"@host>`."""
    content = re.sub(r"\\(.)", r"\1", quoted[1:-1])
    return content if _DOT_STRING.fullmatch(content) else quoted


def _strip_source_route(path: str) -> str:
    # RFC 5321 4.1.2 A-d-l: "@one,@two:" prefix. Accepted and ignored (Appendix C).
    if not path.startswith("@"):
        return path
    colon = path.find(":")
    if colon < 0:
        raise _err(501, "5.1.3", "Bad source route")
    for hop in path[:colon].split(","):
        if not hop.startswith("@"):
            raise _err(501, "5.1.3", "Bad source route")
        _parse_domain(hop[1:])
    return path[colon + 1:]


@dataclass(frozen=True, slots=True)
class PathArg:
    address: Address | None  # None for the null path <>
    params: dict[str, str | None]

    @property
    def text(self) -> str:
        return "" if self.address is None else str(self.address)


def parse_path_arg(arg: str, *, allow_null: bool) -> PathArg:
    """Parse what follows `FROM:` / `TO:`: `<path> [SP params]`.

    Raises AddressError with 501 5.5.4 / 5.1.x / 5.5.2 replies.
    """
    arg = arg.lstrip(" ")  # some clients send "FROM: <a@b>" (tolerated, as Postfix does)
    if not arg.startswith("<"):
        raise _err(501, "5.5.4", "Syntax: address must be in angle brackets <...>")
    end = _path_end(arg)
    if end < 0:
        raise _err(501, "5.5.4", "Syntax: missing closing >")
    inner = arg[1:end]
    rest = arg[end + 1:]
    if rest and not rest.startswith(" "):
        raise _err(501, "5.5.4", "Syntax: junk after address")
    params = parse_params(rest.strip(" "))
    if inner == "":
        if not allow_null:
            raise _err(501, "5.1.3", "Null recipient not allowed")
        return PathArg(None, params)
    bare = (_plain_local(inner) if inner[0] == '"' and _QUOTED.fullmatch(inner)
            else inner)  # <"Postmaster">
    if not allow_null and bare.lower() == "postmaster":
        # RFC 5321 4.5.1: "RCPT TO:<Postmaster>" (no domain) must be accepted. The domain
        # is left empty; the session decides where the site's postmaster is.
        return PathArg(Address("postmaster", ""), params)
    mailbox = _strip_source_route(inner)
    # RFC 5321 4.5.3.1.3: a path is at most 256 octets with its "<>" -- octets, so an
    # SMTPUTF8 address (RFC 6531 3.3: UTF-8) is measured in its UTF-8 octets too.
    if len(mailbox.encode()) > 254:
        raise _err(501, "5.1.3", "Address too long")
    return PathArg(parse_mailbox(mailbox), params)


def _path_end(arg: str) -> int:
    """The index of the first '>' of `arg` (from 1) outside a quoted string, -1: none.
    Without a quote before it that is the first '>' (test_engine_fastpaths compares this
    with the scan over every string of the characters that matter)."""
    end = arg.find(">", 1)
    if '"' in (arg[1:end] if end >= 0 else arg):
        return _scan_path_end(arg)
    return end


def _scan_path_end(arg: str) -> int:
    """_path_end, character by character."""
    i, in_quote = 1, False
    while i < len(arg):
        c = arg[i]
        if in_quote and c == "\\":
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
        i += 1
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    """esmtp-param *(SP esmtp-param); keys upper-cased (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _PARAM_KEY.fullmatch(key) or (eq and not value):
            # Echoed, so only printable ASCII (RFC 5321 4.2 textstring): a client's
            # control or 8-bit octets are never sent back (terminal escapes, NUL).
            shown = "".join(c if " " < c <= "~" else "?" for c in item[:40])
            raise _err(501, "5.5.4", f"Bad parameter syntax: {shown}")
        if key.upper() in params:  # a repeated parameter is ambiguous: refuse it
            raise _err(501, "5.5.4", f"Duplicate parameter: {key.upper()[:20]}")
        params[key.upper()] = value if eq else None
    return params


def orcpt_of(address: str) -> str:
    """The ORCPT value (RFC 3461 4.2) naming `address`, a recipient as it was received,
    for the copies sent on to other addresses (an alias's targets): `rfc822;` and the
    address as xtext (`+`, `=` and anything outside `!`..`~` as "+XX"), or for a non-ASCII
    address `utf-8;` and the address raw (RFC 6533 3's utf-8-addr-unitext: an SMTPUTF8
    message; made `\\x{HEX}` by orcpt_for_7bit for a 7-bit next hop), its ASCII
    characters that are no QCHAR as `\\x{HEX}`. "" when that is longer than RFC 3461's
    500 characters (the parameter is optional)."""
    if address.isascii():
        atype, escape = "rfc822", "+{:02X}"
    else:
        atype, escape = "utf-8", "\\x{{{:X}}}"
    addr = "".join(c if not c.isascii() or ("!" <= c <= "~" and c not in "+=\\")
                   or (c == "\\" and atype == "rfc822") else escape.format(ord(c))
                   for c in address)
    return f"{atype};{addr}" if len(addr) <= 500 else ""


def orcpt_for_7bit(orcpt: str) -> str:
    """An ORCPT value (as accepted: RFC 3461 4.2 / RFC 6533 3) for a next hop without
    SMTPUTF8: a raw UTF-8 (utf-8-addr-unitext) address in its utf-8-addr-xtext form,
    each non-ASCII character as `\\x{HEX}` (RFC 6533 3 says it MUST be converted so).
    "" when that form would pass RFC 3461's 500 characters: the parameter is optional,
    and a next hop refusing an over-long one would refuse the recipient."""
    if orcpt.isascii():
        return orcpt
    atype, _, addr = orcpt.partition(";")
    out = atype + ";" + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in addr)
    return out if len(out) - len(atype) - 1 <= 500 else ""
