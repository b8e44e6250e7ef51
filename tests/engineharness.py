"""A synchronous, in-memory adapter for the sans-I/O SMTP engine (smtpd/protocol.py).

It answers the engine's requests the way the real session adapter would, with in-memory
parts: the relay policy (the real RelayPolicy) and the session's own MAIL/RCPT verdicts
(policy/verdicts.py), a dict of users and one of their addresses, a list as the spool. No
sockets, no event loop, no clock: a whole dialogue runs in microseconds, so tests can run
every dialog script and thousands of Hypothesis examples against the engine alone.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from authrelay import replies
from authrelay.config import from_dict
from authrelay.policy import verdicts
from authrelay.policy.relay import RelayPolicy
from authrelay.smtpd import protocol as p
from authrelay.types import Reply

PASSWORD = "correct horse battery"  # as tests/relayproc.py

BASE_CONFIG: dict[str, Any] = {
    "hostname": "relay.test",
    "state_dir": "/nonexistent",
    "relay": {"local_domains": ["local.test"]},
    "auth": {"failure_delay": 0.1},
}


def make_config(overrides: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v
                            for k, v in BASE_CONFIG.items()}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return from_dict(data)


@dataclass
class Message:
    sender: str
    rcpts: list[str]
    body: bytes


@dataclass
class Harness:
    mode: str = "smtp"
    overrides: dict[str, Any] | None = None
    users: dict[str, str] = field(default_factory=lambda: {"alice": PASSWORD})
    addresses: dict[str, set[str]] = field(default_factory=dict)  # sender_policy "own"
    trusted: bool = False
    auto_tls: bool = True  # finish a STARTTLS handshake at once (False: stay pending)
    tls_available: bool = True
    message_reply: Reply | None = None  # the commit's answer (None: queued, a 250)

    def __post_init__(self) -> None:
        self.cfg = make_config(self.overrides)
        self.policy = RelayPolicy(self.cfg)
        self.eng = p.Engine(self.cfg, mode=self.mode, trusted=self.trusted,
                            auth_available=True, tls_available=self.tls_available,
                            tls_active=self.mode == "submissions")
        self.out = bytearray()
        self.events: list[Any] = []
        self.messages: list[Message] = []
        self.tls_pending = False
        self._body: list[bytes] = []
        self._qid = 0
        self._read = 0  # offset in out of the next unread reply
        self.eng.greet()
        self.run()

    # -------------------------------------------------------------- driving
    def feed(self, data: bytes) -> None:
        self.eng.receive_data(data)
        self.run()

    def send(self, line: str) -> None:
        self.feed(line.encode() + b"\r\n")

    def close_input(self) -> None:
        self.feed(b"")

    def finish_tls(self) -> None:
        assert self.tls_pending, "no STARTTLS pending"
        self.tls_pending = False
        self.eng.tls_started()
        self.run()

    def run(self) -> None:
        eng = self.eng
        while True:
            ev = eng.next_event()
            if ev is p.CONTINUE:
                continue
            if ev is p.NEED_DATA or ev is p.PAUSED or ev is p.CLOSED:
                break
            self.events.append(ev)
            self._handle(ev)
        self.out += eng.data_to_send()

    def _handle(self, ev: Any) -> None:
        eng = self.eng
        if isinstance(ev, p.StartTLS):
            self.tls_pending = True
            if self.auto_tls:
                self.tls_pending = False
                eng.tls_started()
        elif isinstance(ev, p.AuthRequest):
            if ev.refusal is None and self.users.get(ev.username) == ev.password:
                eng.auth_result(p.AuthOutcome.OK)
            else:
                eng.auth_result(p.AuthOutcome.BAD)
        elif isinstance(ev, p.MailRequest):
            user = eng.auth_user
            eng.policy_result(verdicts.mail_verdict(
                self.cfg.auth.sender_policy, ev.transaction.sender.address, user,
                self.addresses.get(user, set())))
        elif isinstance(ev, p.RcptRequest):
            refusal = verdicts.rcpt_verdict(self.policy, ev.address, postmaster=ev.postmaster,
                                            authenticated=bool(eng.auth_user),
                                            trusted=eng.trusted)
            eng.policy_result(refusal, bad_recipient=refusal is not None)
        elif isinstance(ev, p.DataRequest):
            self._body = []
            eng.policy_result(None)
        elif isinstance(ev, p.BodyData):
            self._body += ev.segments
        elif isinstance(ev, p.MessageComplete):
            self._qid += 1
            t = ev.transaction
            self.messages.append(Message(t.sender.text, [r.text for r in t.rcpts],
                                         b"".join(self._body)))
            eng.message_result(self.message_reply or replies.queued(f"Q{self._qid:06d}"))
        elif isinstance(ev, p.Delay):
            eng.resume()

    # -------------------------------------------------------------- reading replies
    def replies(self) -> list[list[str]]:
        """Every reply not read yet, as lists of lines."""
        out: list[list[str]] = []
        while (r := self.next_reply()) is not None:
            out.append(r)
        return out

    def next_reply(self) -> list[str] | None:
        lines: list[str] = []
        pos = self._read
        while True:
            end = self.out.find(b"\r\n", pos)
            if end < 0:
                return None
            line = self.out[pos:end].decode("utf-8", "replace")
            pos = end + 2
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                self._read = pos
                return lines

    def codes(self) -> list[int]:
        return [int(r[-1][:3]) for r in self.replies()]

    @property
    def closed(self) -> bool:
        return self.eng.phase is p.Phase.CLOSED


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def reply_text(r: Reply) -> str:
    return r.lines().decode().rstrip("\r\n")
