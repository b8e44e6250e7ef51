"""RFC 3464 DSNs, checked with Python's email parser."""

from __future__ import annotations

import email
import email.policy
import sys

import pytest

from authrelay.scheduler.bounce import make_bounce, notice_id, should_notify, status_of
from authrelay.spool.envelope import FAILED, Envelope, Recipient, new_queue_id

HEADERS = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
           b"Subject: quarterly numbers\r\nMessage-ID: <m1@example.org>\r\n\r\n")


def _env(sender: str = "alice@example.org") -> Envelope:
    return Envelope(
        queue_id="QID123", sender=sender, received_at=1_700_000_000.0, envid="ENV42",
        recipients=[
            Recipient("bob@example.net", state=FAILED, attempts=1, last_code=550,
                      last_reply="550 5.1.1 <bob@example.net>: user unknown"),
            Recipient("carol@example.com", state=FAILED, attempts=3, last_code=451,
                      last_reply="451 4.4.1 connection refused", orcpt="rfc822;carol@old.example"),
        ],
    )


def _parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_failed_dsn_structure_and_fields() -> None:
    env = _env()
    benv, data = make_bounce(env, env.recipients, HEADERS, "relay.example.org",
                             remote={"bob@example.net": "mx1.example.net [192.0.2.1]:25"})
    assert benv.sender == "" and benv.is_bounce
    assert [r.address for r in benv.recipients] == ["alice@example.org"]
    assert benv.size == len(data)
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")

    msg = _parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].startswith("MAILER-DAEMON@relay.example.org")
    assert msg["To"] == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "bob@example.net" in parts[0].get_payload(decode=True).decode()

    # message/delivery-status: the parser gives [per-message, per-recipient...] blocks.
    blocks = parts[1].get_payload()
    assert len(blocks) == 3
    per_msg = blocks[0]
    assert per_msg["Reporting-MTA"] == "dns; relay.example.org"
    assert per_msg["Original-Envelope-Id"] == "ENV42"
    assert per_msg["Arrival-Date"] and "2023" in per_msg["Arrival-Date"]
    bob, carol = blocks[1], blocks[2]
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: user unknown"
    assert bob["Remote-MTA"] == "dns; mx1.example.net"
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Original-Recipient"] == "rfc822;carol@old.example"
    assert carol["Status"] == "4.4.1"  # expired on a transient error: the real reason
    assert carol["Remote-MTA"] is None

    orig = parts[2].get_payload()
    assert "Subject: quarterly numbers" in orig
    assert "Message-ID: <m1@example.org>" in orig


def test_delayed_dsn() -> None:
    env = _env()
    r = Recipient("carol@example.com", attempts=2, last_code=451,
                  last_reply="451 4.4.1 connection refused")
    _, data = make_bounce(env, [r], HEADERS, "relay.example.org", "delayed",
                          will_retry_until=env.received_at + 5 * 86400)
    msg = _parse(data)
    assert msg["Subject"].startswith("Delayed Mail")
    rcpt = msg.get_payload()[1].get_payload()[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert rcpt["Will-Retry-Until"]
    assert "WARNING ONLY" in msg.get_payload()[0].get_payload()


def test_a_delay_warning_never_says_a_recipient_not_tried_yet_failed() -> None:
    """A delay warning names every pending recipient (scheduler._send_owed), also one
    for another destination not tried yet, which has no reply: part 1 said 'delivery
    failed' for it, under 'THIS IS A WARNING ONLY'. Now 'not delivered yet, still
    queued'; its fields have no Diagnostic-Code or Last-Attempt-Date, as before."""
    env = _env()
    tried = Recipient("carol@example.com", attempts=2, last_code=451,
                      last_reply="451 4.4.1 connection refused")
    waiting = Recipient("dan@example.net")
    _, data = make_bounce(env, [tried, waiting], HEADERS, "relay.example.org", "delayed",
                          will_retry_until=env.received_at + 5 * 86400)
    msg = _parse(data)
    human = msg.get_payload()[0].get_payload()
    assert "<carol@example.com>: 451 4.4.1 connection refused" in human
    assert "<dan@example.net>: not delivered yet, still queued" in human
    assert "failed" not in human
    fields = msg.get_payload()[1].get_payload()[2]
    assert (fields["Action"], fields["Status"]) == ("delayed", "4.0.0")
    assert fields["Diagnostic-Code"] is None and fields["Last-Attempt-Date"] is None


def test_never_for_null_sender_or_bounce() -> None:
    env = _env(sender="")
    with pytest.raises(ValueError):
        make_bounce(env, env.recipients, HEADERS, "h")
    env = _env()
    env.is_bounce = True
    with pytest.raises(ValueError):
        make_bounce(env, env.recipients, HEADERS, "h")
    assert not should_notify(env, env.recipients[0], "failed")
    assert not should_notify(_env(sender=""), None, "failed")


def test_notify_parameter_honoured() -> None:
    env = _env()
    r = Recipient("x@y.example")
    assert should_notify(env, r, "failed") and should_notify(env, r, "delayed")
    r.notify = "NEVER"
    assert not should_notify(env, r, "failed")
    r.notify = "SUCCESS,DELAY"
    assert not should_notify(env, r, "failed") and should_notify(env, r, "delayed")
    r.notify = "FAILURE"
    assert should_notify(env, r, "failed") and not should_notify(env, r, "delayed")


def test_status_fallbacks_and_injection() -> None:
    assert status_of(Recipient("a@b", last_code=550, last_reply="550 no such user"),
                     "failed") == "5.0.0"
    assert status_of(Recipient("a@b", last_code=421, last_reply="421 busy"),
                     "failed") == "4.4.7"
    env = _env()
    evil = Recipient("bob@example.net", attempts=1, last_code=550,
                     last_reply="550 5.7.1 no\r\nAction: delivered")
    _, data = make_bounce(env, [evil], HEADERS, "relay.example.org")
    rcpt = _parse(data).get_payload()[1].get_payload()[1]
    assert rcpt["Action"] == "failed"  # a remote reply cannot forge DSN fields


def test_a_status_of_non_ascii_digits_is_no_status_and_keeps_the_report_ascii() -> None:
    """A next hop's "550 5.\u0661.1" (an Arabic-Indic one): str's \\d took it for a digit,
    so the DSN's Status: field was "5.\u0661.1" and, not ASCII, made the report
    message/global-delivery-status (8bit), which a next hop's reply never does."""
    r = Recipient("bob@example.net", attempts=1, last_code=550,
                  last_reply="550 5.\u0661.1 no such user")
    assert status_of(r, "failed") == "5.0.0"
    _, data = make_bounce(_env(), [r], HEADERS, "relay.example.org")
    assert b"Status: 5.0.0\r\n" in data and b"global-delivery-status" not in data
    assert data.isascii()


@pytest.mark.parametrize(("remote", "name"), [
    ("mx1.example.net [192.0.2.1]:25", "mx1.example.net"),
    ("smtp.provider.example:587", "smtp.provider.example"),  # a smart host not reached
    ("192.0.2.7:25", "192.0.2.7"),
    ("2001:db8::7:587", "2001:db8::7"),
])
def test_remote_mta_is_a_name_without_a_port(remote: str, name: str) -> None:
    """RFC 3464 2.3.5: Remote-MTA names the host (mta-name-type dns). A host that failed
    before answering (connection refused, timed out) is known as "host:port": the port
    was in the field."""
    env = _env()
    _, data = make_bounce(env, env.recipients[:1], HEADERS, "relay.example.org",
                          remote={"bob@example.net": remote})
    rcpt = _parse(data).get_payload()[1].get_payload()[1]
    assert rcpt["Remote-MTA"] == f"dns; {name}"


def test_long_remote_reply_is_folded_within_998_octets() -> None:
    """RFC 5322 2.1.1: no line over 998 octets. A next hop's multi-line reply (here 10
    lines of 300, and one unbreakable 5000-character word; wire.py takes up to 256 lines
    of 4096) used to become one Diagnostic-Code line and one part-1 line of thousands of
    octets, which a receiving MTA may refuse or split, and the sender is then never told
    (no DSN about a DSN). Folded, the field still reads back as the whole reply."""
    reply = "550 5.7.1 " + " ".join(f"line{i} " + "x" * 300 for i in range(10)) \
        + " " + "y" * 5000
    env = _env()
    r = Recipient("bob@example.net", attempts=1, last_code=550, last_reply=reply)
    _, data = make_bounce(env, [r], HEADERS, "relay.example.org")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    parts = _parse(data).get_payload()
    rcpt = parts[1].get_payload()[1]
    assert rcpt["Status"] == "5.7.1" and rcpt["Action"] == "failed"
    diag = "".join(rcpt["Diagnostic-Code"].split())
    assert diag == "smtp;" + "".join(reply.split())
    human = parts[0].get_payload(decode=True).decode()
    assert "".join(reply.split()) in "".join(human.split())
    wide = Recipient("bob@example.net", attempts=1, last_code=550,
                     last_reply="550 5.1.1 " + "ü" * 600)  # 1200 octets, one word
    _, data = make_bounce(env, [wide], HEADERS, "relay.example.org")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    short = Recipient("bob@example.net", attempts=1, last_code=550,
                      last_reply="550 5.1.1 " + "z" * 900)  # up to 998: as it came
    _, data = make_bounce(env, [short], HEADERS, "relay.example.org")
    assert f"Diagnostic-Code: smtp; 550 5.1.1 {'z' * 900}\r\n".encode() in data


# --------------------------------------------------------------------------- RFC 6533

def _global_groups(data: bytes) -> tuple[email.message.Message, list[str], list[dict]]:
    """Parse a DSN by its raw parts: (message, part content types, field groups of the
    status part, each a dict). Python's email package does not split the groups of
    message/global-delivery-status, so this reads RFC 6533 3 / RFC 3464 2.1 itself."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    boundary = msg.get_boundary()
    assert boundary
    raw_parts = data.split(b"--" + boundary.encode())[1:-1]
    types, groups = [], []
    for raw in raw_parts:
        head, _, body = raw.strip(b"\r\n").partition(b"\r\n\r\n")
        ctype = next(ln.split(b":", 1)[1].strip().decode() for ln in head.split(b"\r\n")
                     if ln.lower().startswith(b"content-type:"))
        types.append(ctype)
        if "delivery-status" in ctype:
            text = body.decode("utf-8")  # strict: the part must be valid UTF-8
            for block in text.strip("\r\n").split("\r\n\r\n"):
                fields = {}
                for line in block.split("\r\n"):
                    name, _, value = line.partition(":")
                    fields[name] = value.strip()
                groups.append(fields)
    return msg, types, groups


def _utf8_env() -> Envelope:
    return Envelope(
        queue_id="QIDU", sender="ålice@example.org", received_at=1_700_000_000.0,
        smtputf8=True, body_8bit=True,
        recipients=[
            Recipient("bjørn@example.net", state=FAILED, attempts=1, last_code=553,
                      last_reply="553 5.6.7 mx.example.net does not support SMTPUTF8",
                      orcpt="utf-8;bj\\x{F8}rn@old.example"),
            Recipient("bob@example.com", state=FAILED, attempts=1, last_code=550,
                      last_reply="550 5.1.1 user unknown"),
        ],
    )


UTF8_HEADERS = "From: Ålice <ålice@example.org>\r\nSubject: grüße\r\n\r\n".encode()


def test_utf8_dsn_is_rfc6533_global() -> None:
    env = _utf8_env()
    benv, data = make_bounce(env, env.recipients, UTF8_HEADERS, "relay.example.org")
    msg, types, groups = _global_groups(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert types == ["text/plain; charset=utf-8", "message/global-delivery-status",
                     "message/global-headers"]
    per_message, bjorn, bob = groups
    assert per_message["Reporting-MTA"] == "dns; relay.example.org"
    assert bjorn["Final-Recipient"] == "utf-8; bjørn@example.net"
    assert bjorn["Original-Recipient"] == "utf-8;bjørn@old.example"  # \x{F8} decoded
    assert (bjorn["Action"], bjorn["Status"]) == ("failed", "5.6.7")
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"  # ASCII keeps rfc822
    assert "grüße".encode() in data  # the header section returned as is
    # The bounce goes to a UTF-8 address: its envelope needs SMTPUTF8 (RFC 6531).
    assert benv.smtputf8 and benv.body_8bit
    assert benv.recipients[0].address == "ålice@example.org"


def test_utf8_dsn_full_return_is_message_global() -> None:
    env = _utf8_env()
    full = UTF8_HEADERS + "Hej Bjørn.\r\n".encode()
    _, data = make_bounce(env, env.recipients[:1], UTF8_HEADERS, "relay.example.org",
                          original_message=full)
    _, types, _ = _global_groups(data)
    assert types[1:] == ["message/global-delivery-status", "message/global"]


def test_ascii_dsn_keeps_rfc3464_types() -> None:
    env = _env()
    benv, data = make_bounce(env, env.recipients, HEADERS, "relay.example.org")
    _, types, groups = _global_groups(data)
    assert types[1:] == ["message/delivery-status", "text/rfc822-headers"]
    assert groups[1]["Final-Recipient"] == "rfc822; bob@example.net"
    assert not benv.smtputf8


def test_a_returned_message_is_not_walked_byte_by_byte_in_python() -> None:
    """make_bounce runs on the scheduler's event loop. It used to look for 8-bit octets
    in a RET=FULL message (up to 10 MB) byte by byte in Python, holding the loop (every
    session and delivery of the process) ~0.6 s per 10 MB bounce. Measured without a
    clock: the Python-level trace events it makes must not grow with the message."""
    env = _env()
    env.ret = "FULL"
    r = Recipient("bob@example.net", attempts=1, last_code=550, last_reply="550 5.1.1 no")

    def events(size: int) -> int:
        message = HEADERS + b"\r\n" + (b"y" * 78 + b"\r\n") * (size // 80)
        count = 0

        def tracer(frame: object, event: str, arg: object) -> object:
            nonlocal count
            count += 1
            return tracer

        sys.settrace(tracer)
        try:
            make_bounce(env, [r], HEADERS, "relay.example.org", now=1.0,
                        original_message=message)
        finally:
            sys.settrace(None)
        return count

    events(1 << 14)  # first calls set up lazily (the random module's state)
    # The same up to what varies from call to call (the random queue id's own loop);
    # byte by byte, 1 MiB makes millions of events.
    assert events(1 << 20) < events(1 << 14) + 1000


@pytest.mark.parametrize("reply", [
    "550 5.1.1 no \ufffd\ufffd such user",  # undecodable octets (delivery/wire.py)
    "550 5.1.1 Benutzer unbekannt: Grüße",  # UTF-8 text outside an SMTPUTF8 transaction
])
def test_a_next_hops_non_ascii_reply_keeps_an_ascii_report_ascii(reply: str) -> None:
    """An ASCII message's report stays message/delivery-status, 7bit, whatever octets a
    broken or hostile next hop answered (was message/global-delivery-status, 8bit)."""
    env = _env()
    env.recipients[0].last_reply = reply
    benv, data = make_bounce(env, env.recipients, HEADERS, "relay.example.org")
    assert data.isascii() and not benv.body_8bit
    parts = _parse(data).get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    bob = parts[1].get_payload()[1]
    expected = {"\ufffd": "550 5.1.1 no ?? such user",
                "ü": "550 5.1.1 Benutzer unbekannt: Gr\\x{FC}\\x{DF}e"}
    assert bob["Diagnostic-Code"] == "smtp; " + next(
        v for k, v in expected.items() if k in reply)
    # An internationalized report keeps a UTF-8 reply as it is, "?" for lost octets.
    uenv = _utf8_env()
    uenv.recipients[1].last_reply = "550 5.1.1 Grüße \ufffd"
    _, udata = make_bounce(uenv, uenv.recipients, UTF8_HEADERS, "relay.example.org")
    assert "Diagnostic-Code: smtp; 550 5.1.1 Grüße ?".encode() in udata


def test_a_success_notices_id_is_derived_from_its_message_and_recipients() -> None:
    """The same message and recipients give the same id (a crash recovery finds the
    notice the dead run committed: scheduler._sent_before_crash), in any order; other
    recipients or another message another one; an id sorted with the message's arrival."""
    env = _env()
    bob, carol = env.recipients
    qid = notice_id(env, [bob, carol])
    assert qid == notice_id(_env(), [carol, bob]) and qid.isalnum()
    assert len({qid, notice_id(env, [bob]), notice_id(env, [carol])}) == 3
    other = _env()
    other.queue_id = "QID124"
    assert notice_id(other, [bob, carol]) != qid
    benv, _ = make_bounce(env, [bob], HEADERS, "relay.example.org", "relayed",
                          queue_id=notice_id(env, [bob]))
    assert benv.queue_id == notice_id(env, [bob])
    assert len(qid) == len(new_queue_id()) and qid < new_queue_id()  # (its arrival: 2023)


def test_a_recipient_whose_orcpt_names_another_address_says_what_it_was_expanded_from(
        ) -> None:
    """Part 1 names the address the sender wrote when it is not the failed one (an alias
    expanded, its ORCPT kept: spool/submit.py), in Postfix's words; an ORCPT naming the
    same address, another address type, or none adds nothing."""
    env = Envelope(queue_id="QID9", sender="alice@example.org", recipients=[
        Recipient("nobody@example.net", state=FAILED, last_reply="550 5.1.1 no such user",
                  orcpt="rfc822;root@relay.example.org"),
        Recipient("Bob@example.net", state=FAILED, last_reply="550 5.1.1 gone",
                  orcpt="rfc822;bob@example.net"),
        Recipient("zoë@example.net", state=FAILED, last_reply="550 5.1.1 gone",
                  orcpt="utf-8;ro\\x{F6}t@relay.example.org"),
        Recipient("x4@example.net", state=FAILED, last_reply="550 5.1.1 gone",
                  orcpt="x400;c+3Dus"),
        Recipient("carol@example.net", state=FAILED, last_reply="550 5.1.1 gone"),
    ])
    _, data = make_bounce(env, env.recipients, HEADERS, "relay.example.org")
    human = _parse(data).get_payload()[0].get_payload(decode=True).decode()
    lines = [ln for ln in human.splitlines() if ln.startswith("<")]
    assert lines == [
        "<nobody@example.net> (expanded from <root@relay.example.org>): "
        "550 5.1.1 no such user",
        "<Bob@example.net>: 550 5.1.1 gone",
        "<zoë@example.net> (expanded from <roöt@relay.example.org>): 550 5.1.1 gone",
        "<x4@example.net>: 550 5.1.1 gone",
        "<carol@example.net>: 550 5.1.1 gone",
    ]


def test_a_clients_orcpt_holding_free_text_is_not_put_in_the_human_part() -> None:
    """A client's ORCPT is any xtext: a quoted local part holding a sentence (a stranger
    on port 25 forging the sender) must not come out of part 1 in our words; the
    machine-readable Original-Recipient still carries it, as RFC 3464 2.3.1 asks."""
    phish = ('"Your+20mailbox+20is+20full:+20log+20in+20at+20https://evil.example/'
             'keep+20within+2024h"@example.net')
    env = Envelope(queue_id="QID9", sender="alice@example.org", recipients=[
        Recipient("bob@example.net", state=FAILED, last_reply="550 5.1.1 gone",
                  orcpt=f"rfc822;{phish}"),
        Recipient("carol@example.net", state=FAILED, last_reply="550 5.1.1 gone",
                  orcpt="rfc822;" + "a" * 250 + "@example.net"),
        Recipient("dave@example.net", state=FAILED, last_reply="550 5.1.1 gone",
                  orcpt="utf-8;x\\x{202E}y@example.net"),
    ])
    _, data = make_bounce(env, env.recipients, HEADERS, "relay.example.org")
    report = _parse(data)
    human = report.get_payload()[0].get_payload(decode=True).decode()
    lines = [ln for ln in human.splitlines() if ln.startswith("<")]
    assert lines == ["<bob@example.net>: 550 5.1.1 gone",
                     "<carol@example.net>: 550 5.1.1 gone",
                     "<dave@example.net>: 550 5.1.1 gone"]
    assert "evil.example" not in human
    assert b"Original-Recipient: rfc822;\"Your mailbox is full" in data
