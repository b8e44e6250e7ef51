"""Types that cross module boundaries: `Reply`, `DeliveryResult`, `BeforeEnd`, `Taken`.

Every layer speaks "transient vs permanent" (RFC 5321 4.2.1: 4yz vs 5yz) with an RFC 3463
enhanced status code, so a result can travel from the outbound client to a bounce or a
maillog line without being re-interpreted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# Courier.deliver's `before_end` (from the scheduler): called just before each end-of-data
# dot; None when the dot may go, else what to await first (the in-flight journal's begin
# line of the attempt written, bounded by the journal: inflight.begun).
BeforeEnd = Callable[[], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, RFC 3463 enhanced code, text (may hold several lines)."""

    code: int
    enhanced: str
    text: str

    def lines(self) -> bytes:
        """Wire form; a multi-line text gives 'code-' continuation lines (RFC 5321 4.2.1)."""
        if "\n" not in self.text:  # one line (most replies): _all_lines' bytes, one format
            if self.enhanced:
                return f"{self.code} {self.enhanced} {self.text}\r\n".encode("utf-8", "replace")
            return f"{self.code} {self.text}\r\n".encode("utf-8", "replace")
        return self._all_lines()

    def _all_lines(self) -> bytes:
        """`lines()` for any text, line by line."""
        parts = self.text.split("\n")
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            prefix = f"{self.code}{sep}{self.enhanced} " if self.enhanced else f"{self.code}{sep}"
            out.append(f"{prefix}{part}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")

    @property
    def permanent(self) -> bool:
        return self.code >= 500


# Characters of a DeliveryResult's text kept (Postfix keeps 2048 octets of a reply): more
# than any real server's reply, far less than the 1 MB delivery/wire.py reads of one.
MAX_TEXT = 16384
TRUNCATED = " [...] (reply truncated)"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one delivery attempt for one recipient."""

    code: int
    enhanced: str
    text: str
    permanent: bool
    remote: str = ""  # "mx.example.org [192.0.2.1]:25" when a server answered
    # The next hop took our RFC 3461 DSN parameters: success notices are its job now.
    dsn_passed: bool = False
    # Outbound TLS of the attempt (delivery/tlspolicy.py): verified | trusted | untrusted |
    # anonymous | none, and the policy that applied (dane, mta-sts, verify, may...); ""
    # when no connection was made.
    tls: str = ""
    tls_policy: str = ""
    # A next hop's 5xx reply to RCPT that says the recipient itself is bad (no such
    # mailbox, address or domain, mailbox disabled: policy/containment.refuses_recipient):
    # what containment counts as `refused`; the DSN's reason is the reply as it came.
    recipient_refused: bool = False
    # The courier's connection failure (refused, unreachable, connect timeout): this
    # host did not answer. On a recipient's final result: no host of the attempt did
    # (one that answered leaves its own reply), what marks a destination dead
    # (scheduler._judge_destination); a next hop's own "4.4.1" reply never sets it.
    unanswered: bool = False

    def __post_init__(self) -> None:
        # A next hop's reply text is kept to MAX_TEXT characters (a hostile one may send
        # 1 MB per reply, one per recipient: kept whole, 1000 recipients held gigabytes
        # in memory, in the spool state, in maillog lines and in the bounce).
        if len(self.text) > MAX_TEXT:
            object.__setattr__(self, "text", self.text[:MAX_TEXT] + TRUNCATED)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def reply(self) -> str:
        """The reply as a recipient's `last_reply` keeps it (the maillog's, the DSN's)."""
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ").strip()

    @classmethod
    def sent(cls, code: int, enhanced: str, text: str, remote: str = "") -> DeliveryResult:
        return cls(code, enhanced, text, False, remote)

    @classmethod
    def temp(cls, text: str, enhanced: str = "4.4.1", code: int = 451,
             remote: str = "") -> DeliveryResult:
        return cls(code, enhanced, text, False, remote)

    @classmethod
    def perm(cls, text: str, enhanced: str = "5.0.0", code: int = 550,
             remote: str = "") -> DeliveryResult:
        return cls(code, enhanced, text, True, remote)

    def stamped(self, tls: str, tls_policy: str, dsn_passed: bool) -> DeliveryResult:
        """`dataclasses.replace(self, tls=, tls_policy=, dsn_passed=)` in one direct
        construction (every result of a delivery is stamped: replace() cost 6.6 us a
        call, issue 22). Every field is passed: test_delivery_result_stamped_keeps_every_field."""
        return DeliveryResult(self.code, self.enhanced, self.text, self.permanent, self.remote,
                              dsn_passed, tls, tls_policy, self.recipient_refused,
                              self.unanswered)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


# Courier.deliver's `taken` (from the scheduler): called once per transaction whose
# end-of-data dot the next hop answered 2xx, with its recipients' results, before the
# delivery goes on (another transaction, another host) and before deliver() returns: a
# delivery cut later (a stop, a crash) still knows who has the message (inflight.py).
Taken = Callable[[dict[str, DeliveryResult]], None]
