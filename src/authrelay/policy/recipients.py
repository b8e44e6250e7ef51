"""Local recipients: which local parts of the `local_domains` exist (Postfix relay_recipient_maps).

Owns `[relay] local_recipients_file`: the list of the valid recipients of the local domains,
so mail from anyone to an unknown local part is refused at RCPT (550 5.1.1) instead of
being relayed on, refused by the next hop and bounced to a forged sender (backscatter).
Not configured: every local part of a local domain is accepted, as before.

The file: one entry a line; blank lines and lines whose first non-blank character is `#`
are skipped; an entry is `local@domain` (one address) or `@domain` (any local part of
that domain); anything after the first run of white space is ignored (the value column
of a Postfix `relay_recipients` file, `user@example.org OK`). Known as well: `postmaster`
at every local domain (RFC 5321 4.5.1), the [aliases] names (config table and
`aliases_file`) at `hostname`, where aliases rewrite them (aliases.py), and the users'
own addresses, asked of the user store at RCPT (`candidates`, the session's await).

Comparison (the one ownership.normalize uses for sender ownership): the local part
case-insensitively, a quoted one by its content (`"bob"@x` is `bob@x`); the domain
without its trailing dot, as its A-label, so `bücher.example` and `xn--bcher-kva.example`
are one domain whichever form the file or the RCPT uses; a domain IDNA2003 maps onto
another (`boß`) never matches.

Contract: `load(cfg) -> LocalRecipients | None` (None: no file configured) reads the file
(a regular file of at most MAX_FILE_BYTES, at most MAX_ENTRIES entries); `parse(text,
source)`; `LocalRecipients.known(addr)` is O(1) (two set lookups). `problems(cfg, table)`
names what check-config warns about (a local domain without any entry, an entry outside
the local domains).
Failure policy: RecipientsError, whose text names the file and the line or the OS error
(the admin's fault): `serve` does not start with it, a SIGHUP reload fails whole and the
running list stays (daemon.py). Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from authrelay import aliases
from authrelay.address import Address, AddressError, parse_mailbox
from authrelay.config import Config, read_config_bytes
from authrelay.policy.ownership import a_label, normalize

# Bounds: the file is read whole into every receiving process (some 100 bytes of memory
# an entry), so its size is capped; lookups are set lookups whatever the size.
MAX_FILE_BYTES = 16 << 20
MAX_ENTRIES = 200_000
MAX_LINE = 1000  # octets (RFC 5321 4.5.3.1.3: a path is at most 256)


class RecipientsError(Exception):
    """The local recipients file cannot be used; the text says which file and why."""


def key(addr: Address) -> str:
    """An address's comparison form (see the module docstring); "" for a literal."""
    if addr.is_literal:
        return ""
    return normalize(f"{addr.local}@{addr.domain_key}")


@dataclass(frozen=True, slots=True)
class LocalRecipients:
    """The known recipients: addresses in comparison form, domains (A-labels) whose every
    local part is known, and the file they came from (for messages)."""

    addresses: frozenset[str]
    domains: frozenset[str]
    source: str

    def known(self, addr: Address) -> bool:
        """Whether `addr` (at a local domain) is a known recipient of the list."""
        k = key(addr)
        if not k:
            return False
        local, _, domain = k.rpartition("@")
        # RFC 5321 4.5.1: postmaster is accepted at every domain we accept mail for.
        return local == "postmaster" or k in self.addresses or domain in self.domains

    def __len__(self) -> int:
        return len(self.addresses) + len(self.domains)


def candidates(addr: Address) -> tuple[str, ...]:
    """The spellings a user store may hold `addr` under (its addresses are stored
    lower-cased with the domain as the admin typed it; a user named like an address owns
    it, names matching exactly): the address as sent, lower-cased, and with the domain as
    A-label and as U-label."""
    k = key(addr)
    if not k:
        return ()
    local, _, ace = k.rpartition("@")
    out = [f"{addr.local}@{addr.domain_key}", k]
    try:
        out.append(f"{local}@{ace.encode('ascii').decode('idna')}")
    except UnicodeError:
        pass  # not an IDNA A-label: the other spellings are all there is
    return tuple(dict.fromkeys(out))


def _entry(text: str) -> tuple[bool, str]:
    """(True, A-label) for `@domain`, (False, key) for an address; ValueError saying why
    when it is neither."""
    try:
        addr = parse_mailbox(("x" + text) if text.startswith("@") else text)
    except AddressError as e:
        raise ValueError(e.reply.text.lower()) from None
    if addr.is_literal:
        raise ValueError("an address literal is never at a local domain")
    if text.startswith("@"):
        ace = a_label(addr.domain_key)
        if not ace:
            raise ValueError("a domain IDNA2003 maps onto another name")
        return True, ace
    k = key(addr)
    if not k:
        raise ValueError("a domain IDNA2003 maps onto another name")
    return False, k


def parse(text: str, source: str) -> LocalRecipients:
    """The list in `text` (the file's contents); RecipientsError naming `source` and the
    first bad line."""
    addresses: set[str] = set()
    domains: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line.encode("utf-8", "surrogateescape")) > MAX_LINE:
            raise RecipientsError(f"{source}: line {n}: longer than {MAX_LINE} octets")
        entry = line.split(None, 1)[0]
        try:
            is_domain, k = _entry(entry)
        except ValueError as e:
            raise RecipientsError(f"{source}: line {n}: {entry!r}: {e}") from None
        (domains if is_domain else addresses).add(k)
        if len(addresses) + len(domains) > MAX_ENTRIES:
            raise RecipientsError(f"{source}: more than {MAX_ENTRIES} entries")
    return LocalRecipients(frozenset(addresses), frozenset(domains), source)


def load(cfg: Config) -> LocalRecipients | None:
    """The list `[relay] local_recipients_file` names, with the [aliases] names at
    `hostname` added; None when the key is unset (any local part is accepted)."""
    path = cfg.relay.local_recipients_file
    if not path:
        return None
    try:
        raw = read_config_bytes(path, MAX_FILE_BYTES)
    except OSError as e:  # strerror, or which refusal: not a regular file, too large
        raise RecipientsError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        # utf-8-sig: a byte order mark (an editor's, Notepad's) is not part of the first
        # entry, which would otherwise silently never match.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecipientsError(f"{path}: line {line}: not UTF-8") from None
    table = parse(text, path)
    return LocalRecipients(table.addresses | _alias_keys(cfg), table.domains, path)


def _alias_keys(cfg: Config) -> frozenset[str]:
    """The [aliases] names at `hostname`: aliases.py rewrites mail for them there."""
    names = aliases.load(cfg)[0]
    out = {normalize(f"{name}@{cfg.hostname}") for name in names if "@" not in name}
    out.discard("")
    return frozenset(out)


def problems(cfg: Config, table: LocalRecipients) -> list[str]:
    """What check-config warns about: a local domain no entry names (every recipient
    there but postmaster is refused), an entry at a domain that is not local (never
    consulted: mail there is relayed only for authenticated and trusted clients)."""
    local = {a for a in (a_label(d) for d in cfg.relay.local_domains) if a}
    used = set(table.domains) | {k.rpartition("@")[2] for k in table.addresses}
    out = [f"local domain {d}: no entry in {table.source}: every recipient there but "
           "postmaster is refused" for d in sorted(local - used)]
    out += [f"{table.source}: entries at {d}, which is not in local_domains (not used)"
            for d in sorted(used - local) if d != a_label(cfg.hostname.lower().rstrip("."))]
    return out


def open_domains(cfg: Config, table: LocalRecipients | None) -> list[str]:
    """The local domains that accept any local part (no list, or `@domain` in it)."""
    if table is None:
        return list(cfg.relay.local_domains)
    return [d for d in cfg.relay.local_domains if a_label(d) in table.domains]

