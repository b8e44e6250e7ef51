"""Envelope: who sent a message, to whom, how it arrived, and per-recipient state.

Owns the envelope record and its JSON form (`"v": 1` in version 1 spool files, `"v": 2`
in version 2; spool/format.py decodes both, strictly for 2). A newer reader must keep
reading every older version; an unknown newer version is refused rather than misread (the
message stays in the queue untouched). A new field needs its type in spool/format.py.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2

# Recipient states. A message leaves the spool only when no recipient is PENDING.
PENDING = "pending"
SENT = "sent"
FAILED = "failed"  # permanently; a bounce has been queued (or suppressed for <>)


@dataclass(slots=True)
class Recipient:
    address: str  # RFC 5321 path without angle brackets, as accepted
    state: str = PENDING
    attempts: int = 0
    last_code: int = 0
    last_reply: str = ""  # "451 4.4.1 connection refused" etc.
    next_attempt: float = 0.0
    notify: str = ""  # RFC 3461 NOTIFY, if given
    orcpt: str = ""  # RFC 3461 ORCPT, if given
    delay_warned: bool = False
    # When it was last tried (Unix time; 0: never, or a state file from before this
    # field). Kept in the state file only: the queue file is written before any attempt.
    last_attempt: float = 0.0


@dataclass(slots=True)
class Envelope:
    queue_id: str
    sender: str  # "" is the null reverse-path
    recipients: list[Recipient] = field(default_factory=list)
    received_at: float = field(default_factory=time.time)
    client_ip: str = ""
    client_port: int = 0
    client_rdns: str = ""  # verified reverse name, "" if unknown
    helo: str = ""
    auth_user: str = ""  # "" when not authenticated
    protocol: str = "ESMTP"  # RFC 3848 WITH value: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
    listener: str = ""  # "submission 127.0.0.1:587"
    size: int = 0  # bytes of the stored message (with our headers)
    body_8bit: bool = False  # BODY=8BITMIME was given, or 8-bit octets were received
    smtputf8: bool = False  # SMTPUTF8 was given
    envid: str = ""  # RFC 3461 ENVID
    ret: str = ""  # RFC 3461 RET (FULL | HDRS)
    is_bounce: bool = False  # a DSN we generated: never bounced itself
    held: bool = False
    # Not stored: the length of the queue file's prepend (our DKIM-Signature fields)
    # at the start of the message as loaded for delivery (spool/store.py fills it in).
    prepend_len: int = 0
    # Not stored: ID.state or ID.state.tmp may exist (False: none at the load, none
    # written since; Spool fills it in): a removal unlinks them only then.
    state_file: bool = field(default=True, compare=False, repr=False)
    # Not stored: every line of the file ends in CRLF, vouched for by the receiving
    # worker that wrote it (its body reader refused bare CR and LF) in its notice to the
    # scheduler, for this very file (its inode); Spool.load_for_delivery fills it in.
    # The courier then skips its line-end check (issue 22). False: checked, as ever.
    lines_checked: bool = field(default=False, compare=False, repr=False)
    # Not stored: the queue file is marked as its maillog `from=` line not written yet
    # (spool/writer.py LOG_OWED_MODE): its mtime, the commit's time; 0.0 when not
    # marked. Spool.load_for_delivery fills it in; the scheduler writes the line when
    # the producer died before it did (Scheduler._log_owed).
    log_owed: float = field(default=0.0, compare=False, repr=False)

    def to_json(self, version: int = FORMAT_VERSION) -> bytes:
        # Hand-built dict: dataclasses.asdict deep-copies recursively and showed up in
        # profiles of the receive path at ~10% of CPU per message.
        d = {f: getattr(self, f) for f in STORED_FIELDS}
        d["recipients"] = [{f: getattr(r, f) for f in _RCPT_FIELDS} for r in self.recipients]
        d["v"] = version
        return _ENCODER.encode(d).encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        rcpts = [Recipient(**r) for r in d.pop("recipients", [])]
        known = set(cls.__dataclass_fields__)
        return cls(recipients=rcpts, **{k: v for k, v in d.items() if k in known})

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def done(self) -> bool:
        return not self.pending


_UNSTORED = ("recipients", "prepend_len", "state_file", "lines_checked", "log_owed")
# The Envelope fields a queue file's envelope stores as plain values (spool/format.py
# types each); `recipients` are stored as their own list, the rest are never stored.
STORED_FIELDS: tuple[str, ...] = tuple(f for f in Envelope.__dataclass_fields__
                                       if f not in _UNSTORED)
# The queue file's recipients: without `last_attempt` (state file only), so a queue
# file stays readable by a version without it (its strict v2 decoder).
_RCPT_FIELDS = tuple(f for f in Recipient.__dataclass_fields__ if f != "last_attempt")

# json.dumps(d, separators=(",", ":"), ensure_ascii=False), its encoder made once: dumps
# builds a JSONEncoder per call when given options (~2-3 us per message committed).
# Stateless, so shared by every thread.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

_B32 = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words
_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # two digits per divmod: half the turns


_rng: tuple[int, random.Random] | None = None


def _reseed() -> None:
    global _rng
    _rng = None


os.register_at_fork(after_in_child=_reseed)


def new_queue_id() -> str:
    """Sortable by arrival (microsecond clock first), unique across processes (random tail).

    The tail comes from a per-process PRNG seeded from the OS once (queue ids need to be
    unique, not secret): an os.urandom() system call per message showed in profiles.
    """
    global _rng
    if _rng is None:  # first use, or first in a forked worker (_reseed)
        pid = os.getpid()
        _rng = (pid, random.Random(int.from_bytes(os.urandom(16), "big") ^ pid))
    return base31((time.time_ns() // 1000) << 30 | _rng[1].getrandbits(30))


def queue_id_at(ts: float, tail: int) -> str:
    """A queue id made from its parts: `ts` (seconds) where new_queue_id() has the clock,
    the low 30 bits of `tail` where it has its random tail (a derived id, the same each
    time it is made from the same parts: bounce.notice_id)."""
    return base31(max(int(ts * 1_000_000), 1) << 30 | tail & 0x3FFFFFFF)


def base31(n: int) -> str:
    """`n` > 0 in the digits of `_B32`, most significant first, no leading zero."""
    out = []
    while n:
        n, r = divmod(n, 961)
        out.append(_PAIRS[r])
    out.reverse()
    s = "".join(out)
    return s[1:] if s[0] == "0" else s
