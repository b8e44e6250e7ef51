"""The queue file format: encoding, parsing and verification of one `queue/ID` file.

Owns the bytes on disk; no I/O policy (the writer, store and scheduler decide when to
read and write). Two versions are read; version 2 is written.

Version 2 (written since issue 11), Postfix-like: a fixed-size header that the writer
fills in last (as Postfix's cleanup rewrites its size record), so streaming needs no
second pass and a commit cannot half-update it:

    offset 0     header line, exactly HEADER_LEN bytes, space-padded, "\\n" last:
                 `AUTHRELAY-SPOOL 2 env=E pad=P pre=R msg=M sum=crc32:XXXXXXXX`
    HEADER_LEN   envelope JSON (E bytes, `"v": 2`) then "\\n"
    +E+1         P bytes of padding (spaces): room reserved in files that are streamed
                 to disk before the message ends, so header lines computed afterwards
                 (a DKIM signature) can be written without moving the message
    ...          R bytes: the "prepend": header lines (CRLF) added after the body was
                 written; the courier sends them first, `queue show` shows them
    ...          M bytes: the message exactly as to be sent (CRLF, not dot-stuffed) to EOF

The prepend sits directly in front of the message, so `(path, offset of the prepend)`
is the message as to be sent and readers that stream from an offset to EOF need no
change. `sum` is CRC-32 (zlib) of the message bytes, then the prepend, then the envelope
JSON, computed incrementally while writing (~2.7 GB/s; it detects damage, not forgery).
Truncation: the file size must equal HEADER_LEN + E + 1 + P + R + M exactly.

Version 1 (read only): `AUTHRELAY-SPOOL 1 <envlen>\\n` + envelope JSON (`"v": 1`) + "\\n" +
message to EOF. No length or checksum: only parse errors are detected.

Failure policy: every defect raises `CorruptError` (truncated, bad length, checksum
mismatch, missing field, unknown field, wrong field type, no recipients: the file goes to
corrupt/ and is never deleted); a newer version raises `UnsupportedVersion` (the file is
left where it is).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from authrelay.spool.envelope import (
    FAILED,
    PENDING,
    SENT,
    STORED_FIELDS,
    Envelope,
    Recipient,
)

MAGIC = b"AUTHRELAY-SPOOL"
SPOOL_VERSION = 2  # written
READ_VERSIONS = (1, 2)
HEADER_LEN = 128  # version 2 header line, "\n" included
PREPEND_SLOT = 4096  # padding reserved in streamed files for late header lines
MAX_ENVELOPE = 16 * 1024 * 1024  # a sanity bound: larger is corruption, not an envelope
_V1_HEADER_LINE = 64
_HEADER_KEYS = ("env", "pad", "pre", "msg", "sum")
_CHECKSUM = "crc32"
RECEIVING_HEADER = (MAGIC + b" 2 receiving").ljust(HEADER_LEN - 1) + b"\n"


class SpoolError(Exception):
    """A spool file cannot be used."""


class CorruptError(SpoolError):
    """Damaged: truncated, unparsable, wrong checksum. Moved to corrupt/, never deleted."""


class UnsupportedVersion(SpoolError):
    """Written by a newer authrelay: left untouched, never deleted."""


@dataclass(slots=True)
class Layout:
    """Where things are in one queue file (all offsets from the start of the file)."""

    version: int
    env_off: int
    env_len: int
    prepend_off: int  # == msg_off for version 1 (no prepend)
    prepend_len: int
    msg_off: int
    msg_len: int  # -1 for version 1: to EOF
    checksum: int | None  # None for version 1

    @property
    def total(self) -> int:
        return self.msg_off + self.msg_len


def checksum(data: bytes | memoryview, value: int = 0) -> int:
    """Incremental: checksum(b, checksum(a)) == checksum(a + b)."""
    return zlib.crc32(data, value)


def encode_header(*, env_len: int, pad: int, pre: int, msg: int, crc: int) -> bytes:
    line = b"%s %d env=%d pad=%d pre=%d msg=%d sum=%s:%08x" % (
        MAGIC, SPOOL_VERSION, env_len, pad, pre, msg, _CHECKSUM.encode(), crc)
    if len(line) >= HEADER_LEN:  # cannot happen for sizes below 10**15
        raise ValueError("spool header too long")
    return line.ljust(HEADER_LEN - 1) + b"\n"


def encode_v1(env: Envelope, message: bytes) -> bytes:
    """A version 1 file (for tests of the upgrade path only)."""
    ej = env.to_json(version=1)
    return b"%s 1 %d\n%s\n" % (MAGIC, len(ej), ej) + message


def parse_header_line(line: bytes) -> tuple[int, dict[str, str]]:
    """(version, fields) of the first line; fields is empty for version 1."""
    if not line:
        raise CorruptError("empty file")
    if not line.endswith(b"\n"):
        raise CorruptError("truncated header line")
    parts = line.split()
    if len(parts) < 2 or parts[0] != MAGIC:
        raise CorruptError("not a spool file")
    try:
        version = int(parts[1])
    except ValueError:
        raise CorruptError("bad version number") from None
    if version not in READ_VERSIONS:
        raise UnsupportedVersion(f"spool format version {version} (we read "
                                 f"{', '.join(map(str, READ_VERSIONS))})")
    if version == 1:
        if len(parts) != 3:
            raise CorruptError("bad version 1 header")
        return 1, {"env": parts[2].decode("ascii", "replace")}
    if len(line) != HEADER_LEN:
        raise CorruptError(f"header line of {len(line)} bytes, not {HEADER_LEN}")
    fields: dict[str, str] = {}
    for tok in parts[2:]:
        key, eq, value = tok.decode("ascii", "replace").partition("=")
        if not eq:
            raise CorruptError(f"bad header field {key!r}")
        if key not in _HEADER_KEYS:
            raise CorruptError(f"unknown header field {key!r}")
        if key in fields:
            raise CorruptError(f"duplicate header field {key!r}")
        fields[key] = value
    missing = [k for k in _HEADER_KEYS if k not in fields]
    if missing:
        raise CorruptError(f"missing header field(s) {', '.join(missing)}")
    return 2, fields


def _num(fields: dict[str, str], key: str, limit: int) -> int:
    v = fields[key]
    if not v.isdigit() or not v.isascii() or int(v) > limit:
        raise CorruptError(f"bad header field {key}={v!r}")
    return int(v)


def layout_of(version: int, fields: dict[str, str], first_line_len: int) -> Layout:
    if version == 1:
        env_len = _num(fields, "env", MAX_ENVELOPE)
        if env_len == 0:
            raise CorruptError("bad envelope length 0")
        off = first_line_len + env_len + 1
        return Layout(1, first_line_len, env_len, off, 0, off, -1, None)
    env_len = _num(fields, "env", MAX_ENVELOPE)
    pad = _num(fields, "pad", 1 << 30)
    pre = _num(fields, "pre", 1 << 30)
    msg = _num(fields, "msg", 1 << 50)
    if env_len == 0:
        raise CorruptError("bad envelope length 0")
    algo, colon, hexsum = fields["sum"].partition(":")
    if not colon or algo != _CHECKSUM:
        raise CorruptError(f"unknown checksum type {algo!r}")
    try:
        crc = int(hexsum, 16)
    except ValueError:
        raise CorruptError(f"bad checksum {hexsum!r}") from None
    if len(hexsum) != 8 or hexsum != hexsum.lower():  # written lower case: one spelling
        raise CorruptError(f"bad checksum {hexsum!r}")
    pre_off = HEADER_LEN + env_len + 1 + pad
    return Layout(2, HEADER_LEN, env_len, pre_off, pre, pre_off + pre, msg, crc)


# The header line as encode_header() writes it (one space between fields, in this order,
# lower-case checksum): header_layout() reads it with one match; anything else, valid or
# not, goes through parse_header_line() and layout_of().
_WRITTEN = re.compile(rb"%s 2 env=([0-9]+) pad=([0-9]+) pre=([0-9]+) msg=([0-9]+) "
                      rb"sum=%s:([0-9a-f]{8}) *\n" % (re.escape(MAGIC), _CHECKSUM.encode()))


def header_layout(line: bytes) -> Layout:
    """`layout_of(*parse_header_line(line), len(line))`, the same Layout or the same
    error, with the header line as we write it taken in one match (every delivery
    attempt reads one: 12.8 us the general way, issue 22;
    test_spool_format::test_header_layout_equals_the_general_parse)."""
    m = _WRITTEN.fullmatch(line) if len(line) == HEADER_LEN else None
    if m is not None:
        env_len, pad, pre, msg = int(m[1]), int(m[2]), int(m[3]), int(m[4])
        if 0 < env_len <= MAX_ENVELOPE and pad <= 1 << 30 and pre <= 1 << 30 \
                and msg <= 1 << 50:
            pre_off = HEADER_LEN + env_len + 1 + pad
            return Layout(2, HEADER_LEN, env_len, pre_off, pre, pre_off + pre, msg,
                          int(m[5], 16))
    version, fields = parse_header_line(line)
    return layout_of(version, fields, len(line))


def read_layout(f: BinaryIO) -> Layout:
    """Parse the first line of an open file (positioned at 0); no size check here."""
    line = f.readline(max(HEADER_LEN, _V1_HEADER_LINE))
    version, fields = parse_header_line(line)
    return layout_of(version, fields, len(line))


def check_size(lay: Layout, size: int) -> None:
    if lay.version == 1:
        if size < lay.msg_off:
            raise CorruptError("truncated envelope")
        return
    if size != lay.total:
        raise CorruptError(f"file is {size} bytes, its header says {lay.total}"
                           + (" (truncated)" if size < lay.total else ""))


# ------------------------------------------------------------------ envelope codec

_STR, _INT, _NUM, _BOOL = (str,), (int,), (int, float), (bool,)
_ENV_TYPES: dict[str, tuple[type, ...]] = {
    "queue_id": _STR, "sender": _STR, "received_at": _NUM, "client_ip": _STR,
    "client_port": _INT, "client_rdns": _STR, "helo": _STR, "auth_user": _STR,
    "protocol": _STR, "listener": _STR, "size": _INT, "body_8bit": _BOOL,
    "smtputf8": _BOOL, "envid": _STR, "ret": _STR, "is_bounce": _BOOL, "held": _BOOL,
}
_RCPT_TYPES: dict[str, tuple[type, ...]] = {
    "address": _STR, "state": _STR, "attempts": _INT, "last_code": _INT,
    "last_reply": _STR, "next_attempt": _NUM, "notify": _STR, "orcpt": _STR,
    "delay_warned": _BOOL, "last_attempt": _NUM,
}
_ENV_REQUIRED = ("queue_id", "sender", "recipients", "received_at")
_RCPT_REQUIRED = ("address", "state")
_STATES = (PENDING, SENT, FAILED)


def _typed(where: str, key: str, value: Any, types: tuple[type, ...]) -> Any:
    # bool is an int subclass: True must not pass as a port number, nor 1 as a flag.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise CorruptError(f"{where}{key}: wrong type {type(value).__name__}")
    return value


def _known_fields_only() -> None:
    # The codec must cover every dataclass field: a new field added to Envelope without a
    # type here would make every new file "corrupt". Checked once at import.
    env_fields = set(STORED_FIELDS)
    assert env_fields == set(_ENV_TYPES), env_fields ^ set(_ENV_TYPES)
    assert set(Recipient.__dataclass_fields__) == set(_RCPT_TYPES)


_known_fields_only()


def check_recipient_fields(rd: dict[str, Any]) -> dict[str, Any]:
    """The known recipient fields of a state record, type-checked (unknown keys dropped:
    state files are versioned separately). Raises CorruptError."""
    out: dict[str, Any] = {}
    for k, value in rd.items():
        types = _RCPT_TYPES.get(k)
        if types is not None:
            out[k] = _typed("recipient.", k, value, types)
    if "state" in out and out["state"] not in _STATES:
        raise CorruptError(f"recipient.state: unknown {out['state']!r}")
    return out


def decode_envelope(raw: bytes, version: int) -> Envelope:
    """Strict for version 2 (every key known and typed, required keys present); version 1
    is decoded as before, except that a file without recipients is corrupt, not empty."""
    try:
        d = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptError(f"bad envelope: {e}") from None
    if not isinstance(d, dict):
        raise CorruptError("bad envelope: not an object")
    v = d.pop("v", None)
    if version == 1:
        if v != 1:
            if isinstance(v, int) and v > 1:
                raise UnsupportedVersion(f"unsupported envelope format version {v!r}")
            raise CorruptError(f"bad envelope version {v!r}")
        try:
            env = Envelope.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise CorruptError(f"bad envelope: {e}") from None
        if not env.recipients:
            raise CorruptError("envelope has no recipients")
        return env
    if v != 2:
        if isinstance(v, int) and not isinstance(v, bool) and v > 2:
            raise UnsupportedVersion(f"unsupported envelope format version {v!r}")
        raise CorruptError(f"bad envelope version {v!r}")
    missing = [k for k in _ENV_REQUIRED if k not in d]
    if missing:
        raise CorruptError(f"envelope lacks {', '.join(missing)}")
    rl = d.pop("recipients")
    if not isinstance(rl, list) or not rl:
        raise CorruptError("envelope has no recipients")
    # json.loads makes only exact str/int/float/bool/list/dict/None, so an exact type
    # test is _typed()'s rule (bool never an int) without a call per field (issue 22:
    # this runs for every delivery attempt on the master).
    for k, value in d.items():
        types = _ENV_TYPES.get(k)
        if types is None:
            raise CorruptError(f"unknown envelope field {k!r}")
        if type(value) not in types:
            _typed("", k, value, ())
    rcpts = []
    for i, rd in enumerate(rl):
        where = f"recipients[{i}]."
        if not isinstance(rd, dict):
            raise CorruptError(f"{where[:-1]}: not an object")
        missing = [k for k in _RCPT_REQUIRED if k not in rd]
        if missing:
            raise CorruptError(f"{where[:-1]} lacks {', '.join(missing)}")
        for k, value in rd.items():
            types = _RCPT_TYPES.get(k)
            if types is None:
                raise CorruptError(f"unknown recipient field {k!r}")
            if type(value) not in types:
                _typed(where, k, value, ())
        if rd["state"] not in _STATES:
            raise CorruptError(f"{where}state: unknown {rd['state']!r}")
        rcpts.append(Recipient(**rd))
    return Envelope(recipients=rcpts, **d)


def encode_envelope(env: Envelope) -> bytes:
    return env.to_json(version=2)


def iter_file(f: BinaryIO, start: int, length: int, bufsize: int = 1 << 20
              ) -> Iterator[bytes]:
    """`length` bytes from `start` in chunks; raises CorruptError if the file is short."""
    f.seek(start)
    left = length
    while left > 0:
        b = f.read(min(bufsize, left))
        if not b:
            raise CorruptError("truncated while verifying")
        left -= len(b)
        yield b


def verify(lay: Layout, data_at: Any) -> None:
    """Check the checksum of a version 2 file. `data_at(off, n)` yields the bytes."""
    if lay.version == 1 or lay.checksum is None:
        return
    crc = 0
    for part in data_at(lay.msg_off, lay.msg_len):
        crc = checksum(part, crc)
    for part in data_at(lay.prepend_off, lay.prepend_len):
        crc = checksum(part, crc)
    for part in data_at(lay.env_off, lay.env_len):
        crc = checksum(part, crc)
    if crc != lay.checksum:
        raise CorruptError(f"checksum mismatch (header {lay.checksum:08x}, data {crc:08x})")


def split(raw: bytes) -> tuple[bytes, bytes]:
    """(envelope JSON, message as to be sent incl. the prepend) of a whole file's bytes.
    For tests and tools; checks lengths, not the checksum."""
    nl = raw.find(b"\n")
    version, fields = parse_header_line(raw[:nl + 1] if nl >= 0 else raw)
    lay = layout_of(version, fields, nl + 1)
    check_size(lay, len(raw))
    return raw[lay.env_off:lay.env_off + lay.env_len], raw[lay.prepend_off:]
