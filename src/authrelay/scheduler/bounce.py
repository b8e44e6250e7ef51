"""Delivery status notifications (bounces and delay warnings), RFC 3464.

Owns the DSN message format. Contract: `make_bounce(env, failed, original_headers,
hostname, action)` returns a new Envelope (null sender, `is_bounce=True`, one recipient:
the original envelope sender) and the message bytes (CRLF line ends, ready to spool):
a multipart/report; report-type=delivery-status (RFC 6522) with
  1. a text/plain human explanation, a line per recipient: `<ADDR>: REPLY`, or
     `<ADDR> (expanded from <ORCPT's address>): REPLY` when its ORCPT names another
     address (an alias's target, spool/submit.py; Postfix's words),
  2. message/delivery-status (RFC 3464 2.2/2.3): Reporting-MTA, Arrival-Date, and per
     recipient Final-Recipient, Action, Status (RFC 3463 enhanced code), Diagnostic-Code,
     Remote-MTA when known, Last-Attempt-Date (and Will-Retry-Until for `delayed`),
  3. text/rfc822-headers: the original message's header section (RET=HDRS by default).
Internationalized mail (RFC 6533): when any address or diagnostic in the report is not
ASCII, part 2 is message/global-delivery-status (UTF-8 allowed, 8bit) and a non-ASCII
address is given as `utf-8; addr` (the utf-8 address type; ORCPT's `\\x{HEX}` escapes
decoded to characters); the returned content of an SMTPUTF8 message (or one whose header
section is not ASCII) is message/global (RET=FULL) or message/global-headers, not
message/rfc822 / text/rfc822-headers. The report stays report-type=delivery-status.
The DSN's own envelope asks for SMTPUTF8 only when its recipient (the original sender)
needs it; otherwise the 8bit parts go as 8BITMIME.
A next hop's reply never makes the report internationalized: undecodable octets in it
are "?", other non-ASCII text `\\x{HEX}` unless the report is so anyway (_diagnostic).
No line of the report is longer than 998 octets (RFC 5322 2.1.1): a longer one (a next
hop's verbose or hostile multi-line reply, up to 1 MB, as Diagnostic-Code and in part 1)
is folded at spaces, an unbreakable run cut.
`should_notify(env, rcpt, action)` says whether a DSN may be sent at all: never to the null
sender and never about a bounce (RFC 3464 2: no DSN about a DSN, so bounces cannot loop),
and RFC 3461 4.1 NOTIFY (NEVER, or a list without FAILURE / DELAY) is honoured.
`make_bounce` raises ValueError if called for a message that must not get one.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from authrelay.address import AddressError, parse_mailbox
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id, queue_id_at

_ENHANCED = re.compile(r"^\s*(\d{3})[ -]([245]\.\d{1,3}\.\d{1,3})\b", re.ASCII)  # "٣" no digit
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _clean(s: str) -> str:
    """One header line: no CR/LF/controls a remote reply could smuggle in."""
    return _CTL.sub(" ", s).strip()


_MAX_LINE = 998  # RFC 5322 2.1.1: octets per line, CRLF excluded
_WRAP = 78  # where a line too long for that is folded (RFC 5322 2.1.1's SHOULD)
_MAX_WORD = 200  # characters of one unbreakable word kept on a line (<= 800 octets UTF-8)


def _fold(line: str) -> str:
    """`line` as it may go into the DSN: unchanged up to 998 octets, else folded at
    spaces into lines of about 78 (the continuations start with a space: header folding
    in part 2, an indented line in part 1). A remote reply can be a single 1 MB word: a
    word longer than 200 characters is cut to fit."""
    if len(line.encode("utf-8")) <= _MAX_LINE:
        return line
    words: list[str] = []
    for word in line.split(" "):
        while len(word) > _MAX_WORD:
            words.append(word[:_MAX_WORD])
            word = word[_MAX_WORD:]
        if word:
            words.append(word)
    out: list[str] = []
    cur = ""
    for word in words:
        if cur and len(cur.encode("utf-8")) + 1 + len(word.encode("utf-8")) > _WRAP:
            out.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    out.append(cur)
    return "\r\n ".join(out)


def _diagnostic(reply: str, utf8: bool) -> str:
    """A next hop's reply as report text. Octets that were not UTF-8 (decoded as U+FFFD,
    delivery/wire.py) carry nothing: "?". Other non-ASCII text stays only in a report
    that is internationalized anyway (`utf8`: RFC 6531 3.7.4.2 lets a server answer in
    UTF-8 only in an SMTPUTF8 transaction); else each such character is `\\x{HEX}`
    (RFC 6533 3's escape), so a broken or hostile hop cannot turn an ASCII message's
    report into message/global-delivery-status (RFC 3464 2.3.6: diagnostics are ASCII)."""
    text = reply.replace("\ufffd", "?")
    if utf8 or text.isascii():
        return text
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def xtext_decode(value: str) -> str:
    """RFC 3461 4: "+XX" stands for the octet XX (hex)."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


_UTF8_ESC = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unitext(value: str) -> str:
    """RFC 6533 3: utf-8-addr-xtext's `\\x{HEX}` escapes as the characters they stand for."""
    def char(m: re.Match[str]) -> str:
        cp = int(m.group(1), 16)
        return chr(cp) if 0x20 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF else "?"
    return _UTF8_ESC.sub(char, value)


def address_field(address: str) -> str:
    """`rfc822; a@b` for an ASCII address, `utf-8; addr` otherwise (RFC 6533 3)."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def original_recipient(orcpt: str) -> str:
    """The ORCPT parameter (xtext, RFC 3461 4.2) as an Original-Recipient value."""
    decoded = xtext_decode(orcpt)
    kind, sep, value = decoded.partition(";")
    if sep and kind.strip().lower() == "utf-8":
        return f"{kind};{_unitext(value)}"
    return decoded


# Part 1's words for a recipient without a reply: a delay warning names the pending
# recipients not tried yet (another destination, not due), which have none.
_NO_REPLY = {"failed": "delivery failed", "delayed": "not delivered yet, still queued",
             "relayed": "relayed"}


def _expanded_from(r: Recipient) -> str:
    """" (expanded from <ADDR>)" when the recipient's ORCPT names another address (an
    alias the sender wrote, spool/submit.py): the words Postfix's bounces use, so the
    reader sees which of their recipients it is; else ""."""
    kind, _, addr = original_recipient(r.orcpt).partition(";")
    addr = addr.strip()
    if kind.strip().lower() not in ("rfc822", "utf-8") or not _plain_mailbox(addr) \
            or addr.lower() == r.address.lower():
        return ""
    return f" (expanded from <{addr}>)"


def _plain_mailbox(addr: str) -> bool:
    """An address the human part may name: a mailbox with a dot-string local part (a
    client's ORCPT is any xtext: a quoted local part, `"Your mailbox is full: log in at
    https://..."@x`, would put a stranger's sentence in our words), no control, format
    (bidi) or blank character, at most 254 characters (RFC 5321 4.5.3.1.3)."""
    if len(addr) > 254 or addr.startswith('"') or any(
            unicodedata.category(c)[0] in "CZ" for c in addr):  # controls, bidi, blanks
        return False
    try:
        parse_mailbox(addr)
    except AddressError:
        return False
    return True


def status_of(r: Recipient, action: str) -> str:
    """The RFC 3463 code for a recipient: from its last reply, else by class."""
    m = _ENHANCED.match(r.last_reply or "")
    if m:
        # An expired message keeps its last transient code (as Postfix does): it says why.
        return m.group(2)
    if action == "delayed":
        return "4.0.0"
    if action == "relayed":
        return "2.0.0"
    if r.last_code and 400 <= r.last_code < 500:
        return "4.4.7"
    return "5.0.0"


def should_notify(env: Envelope, r: Recipient | None, action: str) -> bool:
    if env.sender == "" or env.is_bounce:
        return False
    if r is None or not r.notify:
        return action != "relayed"
    notify = {n.strip().upper() for n in r.notify.split(",")}
    if "NEVER" in notify:
        return False
    if action == "relayed":  # success notices only when asked for (RFC 3461 4.1)
        return "SUCCESS" in notify
    return ("FAILURE" if action == "failed" else "DELAY") in notify


def notice_id(env: Envelope, rcpts: list[Recipient]) -> str:
    """The queue id of the success notice (action relayed) about `rcpts` of `env`: made
    from the message's arrival and a hash of its queue id and those addresses, the same
    each time, so a start recovering a crash (scheduler._sent_before_crash) finds the
    notice the dead run had committed before its journal said so, and does not queue it
    again. A recipient is relayed once: no other notice is about the same ones."""
    key = "\0".join([env.queue_id, "relayed", *sorted(r.address for r in rcpts)])
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return queue_id_at(env.received_at, int.from_bytes(digest[:4], "big"))


def _needs_8bit(b: bytes) -> bool:
    # In C: a returned message (RET=FULL) is up to 10 MB, and this runs on the event loop
    # (byte by byte in Python it held the loop, every session of the process, ~0.6 s).
    return not b.isascii()


def make_bounce(env: Envelope, failed: list[Recipient], original_headers: bytes,
                hostname: str, action: str = "failed", *,
                remote: Mapping[str, str] | None = None, now: float | None = None,
                will_retry_until: float | None = None,
                original_message: bytes | None = None,
                queue_id: str | None = None) -> tuple[Envelope, bytes]:
    """Build a DSN about `failed` recipients of `env`; see module docstring. `queue_id`:
    the DSN's (notice_id), else a new one."""
    if action not in ("failed", "delayed", "relayed"):
        raise ValueError(f"unknown DSN action {action!r}")
    if env.sender == "" or env.is_bounce:
        raise ValueError("no DSN for the null sender or for a bounce (RFC 3464 2)")
    if not failed:
        raise ValueError("no recipients to report")
    remote = remote or {}
    now = time.time() if now is None else now
    qid = queue_id or new_queue_id()
    boundary = f"{qid}.{secrets.token_hex(8)}/{hostname}"
    crlf = "\r\n"

    if action == "failed":
        subject = "Undelivered Mail Returned to Sender"
        human = [
            f"This is the mail system at host {hostname}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please contact your postmaster.",
            "",
            "The mail system",
            "",
        ]
    elif action == "relayed":
        subject = "Successful Mail Delivery Report"
        human = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message was successfully relayed to the destinations below.",
            "The next mail system does not offer delivery status notifications,",
            "so this is the last notice you will get about it (RFC 3461 5.2.2).",
            "",
            "The mail system",
            "",
        ]
    else:
        subject = "Delayed Mail (still being retried)"
        until = _date(will_retry_until) if will_retry_until else "later"
        human = [
            f"This is the mail system at host {hostname}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet. The mail system will keep",
            f"trying until {until}.",
            "",
            "The mail system",
            "",
        ]
    # Internationalized by what the message and its recipients are, never by a reply.
    utf8 = env.smtputf8 or not env.sender.isascii() or any(
        not r.address.isascii() or not original_recipient(r.orcpt).isascii()
        for r in failed)
    for r in failed:
        reply = _clean(_diagnostic(r.last_reply, utf8))
        reply = reply or _NO_REPLY[action]  # a recipient not tried yet (delayed)
        human.append(f"<{r.address}>{_expanded_from(r)}: {reply}")

    status = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Authrelay-Queue-ID: {env.queue_id}",
    ]
    if env.envid:
        status.append(f"Original-Envelope-Id: {_clean(xtext_decode(env.envid))}")
    status.append(f"Arrival-Date: {_date(env.received_at)}")
    for r in failed:
        status.append("")
        if r.orcpt:
            status.append(f"Original-Recipient: {_clean(original_recipient(r.orcpt))}")
        status.append(f"Final-Recipient: {_clean(address_field(r.address))}")
        status.append(f"Action: {action}")
        status.append(f"Status: {status_of(r, action)}")
        rm = remote.get(r.address, "")
        if rm:
            # "mx.example.org [192.0.2.1]:25" -> the name (RFC 3464 2.3.5 mta-name-type
            # dns); a host that failed before it answered is "name-or-ip:port": no port.
            name = rm.split()[0] if " " in rm.strip() else rm.strip().rsplit(":", 1)[0]
            status.append(f"Remote-MTA: dns; {_clean(name)}")
        if r.last_reply:
            status.append(f"Diagnostic-Code: smtp; {_clean(_diagnostic(r.last_reply, utf8))}")
        if r.attempts:  # RFC 3464 2.3.7: this recipient's own last attempt (a delay
            # warning also names recipients tried in earlier passes); `now` for a state
            # saved before the time was kept.
            status.append(f"Last-Attempt-Date: {_date(r.last_attempt or now)}")
        if action == "delayed" and will_retry_until:
            status.append(f"Will-Retry-Until: {_date(will_retry_until)}")

    headers_part = original_headers
    if headers_part and not headers_part.endswith(b"\r\n"):
        headers_part += b"\r\n"
    status_b = (crlf.join(_fold(x) for x in status) + crlf).encode("utf-8")
    human_b = (crlf.join(_fold(x) for x in human) + crlf).encode("utf-8")
    if original_message is not None:  # RET=FULL (RFC 3461 4.3): the whole message back
        headers_part = original_message
        if headers_part and not headers_part.endswith(b"\r\n"):
            headers_part += b"\r\n"
    eightbit = _needs_8bit(headers_part) or _needs_8bit(status_b) or _needs_8bit(human_b)
    # RFC 6533 6: the global forms for internationalized reports and returned messages.
    global_status = _needs_8bit(status_b)
    header_section = (original_message or b"").split(b"\r\n\r\n", 1)[0] \
        if original_message is not None else original_headers
    global_msg = env.smtputf8 or _needs_8bit(header_section)
    status_type = "message/global-delivery-status" if global_status \
        else "message/delivery-status"
    if original_message is not None:
        returned_type = "message/global" if global_msg else "message/rfc822"
    else:
        returned_type = "message/global-headers" if global_msg else "text/rfc822-headers"

    top = [
        f"Date: {formatdate(now, localtime=False)}",
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: {env.sender}",
        f"Subject: {subject}",
        f"Message-ID: <{qid}.{int(now)}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: no auto-reply to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;{crlf}'
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eightbit else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    cte = "8bit" if eightbit else "7bit"
    parts = [
        (crlf.join(top) + crlf).encode("utf-8"),
        f"--{boundary}{crlf}Content-Description: Notification{crlf}"
        f"Content-Type: text/plain; charset=utf-8{crlf}"
        f"Content-Transfer-Encoding: {cte}{crlf}{crlf}".encode(),
        human_b,
        f"{crlf}--{boundary}{crlf}Content-Description: Delivery report{crlf}"
        f"Content-Type: {status_type}{crlf}"
        f"Content-Transfer-Encoding: {'8bit' if global_status else '7bit'}{crlf}{crlf}"
        .encode(),
        status_b,
        (f"{crlf}--{boundary}{crlf}Content-Description: Undelivered Message{crlf}"
         f"Content-Type: {returned_type}{crlf}"
         f"Content-Transfer-Encoding: {cte}{crlf}{crlf}".encode()
         if original_message is not None else
         f"{crlf}--{boundary}{crlf}Content-Description: Undelivered Message Headers{crlf}"
         f"Content-Type: {returned_type}{crlf}"
         f"Content-Transfer-Encoding: {cte}{crlf}{crlf}".encode()),
        headers_part,
        f"{crlf}--{boundary}--{crlf}".encode(),
    ]
    data = b"".join(parts)
    benv = Envelope(
        queue_id=qid,
        sender="",
        recipients=[Recipient(address=env.sender)],
        received_at=now,
        helo=hostname,
        protocol="local",
        listener="bounce",
        size=len(data),
        body_8bit=eightbit,
        smtputf8=not env.sender.isascii(),
        is_bounce=True,
    )
    return benv, data
