"""SASL server exchanges for SMTP AUTH: PLAIN (RFC 4616) and LOGIN, sans-I/O.

Owns: decoding what the client sends after `AUTH <mech> [initial-response]` (RFC 4954 4)
into (authzid, username, password), and the challenges to send back. It does no I/O and
verifies nothing: the session sends `334 <base64(challenge)>` while `challenge` is not None,
feeds each client line to `feed()`, and once `done` hands the credentials to the
Authenticator.

Passwords are octets: RFC 4616 2 says passwd SHOULD be UTF-8, but legacy (Latin-1)
passwords from sasldb or saslauthd setups are not, and must still verify. A password that
is not UTF-8 is kept as a str with surrogate escapes (PEP 383: decode "surrogateescape"),
which `passwords.raw()` and the backends turn back into exactly the client's bytes.
Names (authcid, authzid) must be UTF-8.

Failure policy: every problem is a `SaslError` carrying the SMTP reply to send and a short
`reason` for the maillog (never the payload); all are permanent for this AUTH command
(5yz) and the client may try again. The exception text never echoes the client's payload
(it may hold a password).
"""

from __future__ import annotations

import base64
import binascii
import unicodedata

from authrelay.types import Reply

# RFC 4616 2: authcid and authzid are at most 255 octets. Passwords are bounded by the
# AUTH line length limit of the SMTP layer (limits.max_auth_line_length).
MAX_NAME_OCTETS = 255

MECHANISMS = ("PLAIN", "LOGIN")


class SaslError(Exception):
    """A failed exchange; `.code`, `.enhanced`, `.text` are the SMTP reply to send."""

    def __init__(self, code: int, enhanced: str, text: str, reason: str = "",
                 username: str = "") -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.reason = reason or text.lower()  # for the maillog: no client data in it
        self.username = username  # the user a refused login named (the maillog's), or ""

    @property
    def reply(self) -> Reply:
        return Reply(self.code, self.enhanced, self.text)


def _cancelled() -> SaslError:
    # RFC 4954 4: "*" cancels; the server MUST reject the AUTH command with 501.
    return SaslError(501, "5.0.0", "Authentication cancelled", "cancelled by the client")


def _undecodable(reason: str = "not base64") -> SaslError:
    return SaslError(501, "5.5.2", "Cannot decode response", reason)


def _malformed(reason: str = "malformed response") -> SaslError:
    return SaslError(501, "5.5.2", "Malformed authentication response", reason)


def _bad_credentials(username: str) -> SaslError:
    # RFC 4954 6: 535 5.7.8 is the reply for credentials that are not accepted.
    return SaslError(535, "5.7.8", "Authentication credentials invalid",
                     "authorization identity differs from the user", username)


def _decode_b64(line: str) -> bytes:
    # RFC 4954 4: "=" is an empty response (an initial response of zero length).
    if line == "=":
        return b""
    try:
        # validate=True: reject characters outside the base64 alphabet instead of
        # silently skipping them (binascii would accept "a!b=" otherwise).
        return base64.b64decode(line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _undecodable() from None


def _utf8(raw: bytes) -> str:
    """A name: UTF-8 or refused."""
    try:
        return raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise _undecodable("user name is not UTF-8") from None


def _octets(raw: bytes) -> str:
    """A password: any octets; non-UTF-8 bytes as surrogate escapes (see module doc)."""
    return raw.decode("utf-8", "surrogateescape")


# Unicode categories no user name holds: controls (C1 too: U+009B is a terminal's CSI),
# format characters (U+202E right-to-left override, U+200B zero width space), surrogates,
# private use, unassigned, line and paragraph separators (auth/userdb.py refuses them in
# a new user's name for the same reasons).
HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def hidden_character(name: str) -> bool:
    """Whether `name` holds a character of a HIDDEN category (ASCII: C0 controls, DEL)."""
    if name.isascii():
        return any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    return any(unicodedata.category(c) in HIDDEN for c in name)


def _check_name(name: str) -> None:
    """A username or authzid: 1..255 octets, no control or invisible characters.

    Control characters (NUL, CR, LF, TAB...) would let a client forge log lines or
    inject fields into backend protocols that are line- or tab-delimited (Dovecot's).
    C1 controls and format characters no stored user holds, but a backend that ignores
    part of the name (saslauthd behind PAM drops the realm: `alice@<CSI>2J` is alice)
    let them in, and the account, named so, was printed raw to the admin's terminal
    (`authrelay user suspended`, `queue list`) and into the containment notice.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_OCTETS:
        raise _malformed("empty or over-long user name")
    if hidden_character(name):
        raise _malformed("control character in the user name")


class SaslExchange:
    """One AUTH exchange. Raises SaslError from __init__ or feed() when it fails."""

    def __init__(self, mechanism: str, initial_response: str | None) -> None:
        self.mechanism = mechanism.upper()
        if self.mechanism not in MECHANISMS:
            # RFC 4954 6: 504 5.5.4 for a mechanism we do not offer.
            raise SaslError(504, "5.5.4", "Unrecognized authentication type",
                            "unknown mechanism")
        self.authzid = ""
        self.username = ""
        self.password = ""
        self.done = False
        self.challenge: bytes | None = None
        self._step = 0
        if initial_response is not None:
            initial_response = initial_response.strip()
            if initial_response == "*":
                raise _cancelled()
        if self.mechanism == "PLAIN":
            if initial_response is None:
                self.challenge = b""  # RFC 4616 / 4954: empty challenge, "334 "
            else:
                self._plain(_decode_b64(initial_response))
        else:  # LOGIN (draft-murchison-sasl-login): Username:, then Password:
            if initial_response is None:
                self.challenge = b"Username:"
            else:
                self._login_username(_decode_b64(initial_response))

    # ------------------------------------------------------------------ input
    def feed(self, line: str) -> None:
        """One client line (without CRLF): base64 text, or "*" to cancel."""
        if self.done or self.challenge is None:
            raise RuntimeError("SASL exchange already complete")
        line = line.strip()
        if line == "*":
            self.challenge = None
            raise _cancelled()
        raw = _decode_b64(line)
        if self.mechanism == "PLAIN":
            self._plain(raw)
        elif self._step == 0:
            self._login_username(raw)
        else:
            self._login_password(raw)

    # ------------------------------------------------------------------ mechanisms
    def _plain(self, raw: bytes) -> None:
        # RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
        self.challenge = None
        parts = raw.split(b"\x00")
        if len(parts) != 3:  # also catches a NUL inside any field
            raise _malformed("PLAIN message without exactly two NULs")
        authzid, username = _utf8(parts[0]), _utf8(parts[1])
        password = _octets(parts[2])
        _check_name(username)
        if authzid:
            _check_name(authzid)
        # RFC 4616 2: passwd = 1*SAFE; an empty password is a malformed message.
        if not password:
            raise _malformed("empty password")
        # We do not support proxy authorization (acting as another user): RFC 4616 2
        # lets the server refuse an authzid it will not grant.
        if authzid and authzid != username:
            raise _bad_credentials(username)
        self.authzid, self.username, self.password = authzid, username, password
        self.done = True

    def _login_username(self, raw: bytes) -> None:
        name = _utf8(raw)
        if "\x00" in name:
            self.challenge = None
            raise _malformed()
        try:
            _check_name(name)
        except SaslError:
            self.challenge = None
            raise
        self.username = name
        self._step = 1
        self.challenge = b"Password:"

    def _login_password(self, raw: bytes) -> None:
        self.challenge = None
        password = _octets(raw)
        if not password or "\x00" in password:
            raise _malformed()
        self.password = password
        self.done = True

    def __repr__(self) -> str:  # never show the password
        return (f"<SaslExchange {self.mechanism} user={self.username!r} "
                f"done={self.done}>")
