"""maillog escaping (issue 17 part 3): no value a client chooses can end a line, add a
field, or make fail2ban's documented filter read an address it chose.

Every event function is called with hostile values in every place a client's data goes
(SASL names, HELO, addresses, the reverse DNS name in `relay=`, remote replies, ENVID,
ORCPT, SNI, PROXY data through warning texts). Each line must stay one line (for
str.splitlines too, which also splits on U+2028, U+0085, FS/GS/RS, VT, FF), hold the same
fields as with a benign value (a quote-aware parser), and the JSON target must parse.
The real fail2ban-regex runs the filter documented in docs/LIMITS.md over the log.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import ci

from authrelay import maillog
from authrelay.maillog import escape
from authrelay.types import Reply

REAL_IP = "192.0.2.7"
R = f"host.example [{REAL_IP}]"
FORGED = "10.9.9.9"

HOSTILE = [
    f"bob, relay=unknown [{FORGED}], sasl_username=root",
    f"reject=535 5.7.8 authentication failed, relay=a [{FORGED}]",
    f"x\r\nNOQUEUE: reject=535 5.7.8 authentication failed, relay=unknown [{FORGED}]",
    f"a\u2028b\u2029c\x85d\x1ce\x0bf\x0cg, relay=x [{FORGED}]",
    f'q"uote", relay=x [{FORGED}], x="',
    "n\x00ul\x7f\x1b[31m",
    "\\x0d\\x0a, relay=\\x5b",  # text that looks like our escapes
    f"\u202eevil\u200b\ufeff [{FORGED}]",
    f"[{FORGED}]",
    f" [{FORGED}]",
]

# Every event with `v` wherever a client's value goes.
EVENTS: list[Callable[[maillog.MailLog, str], None]] = [
    lambda m, v: m.connect(f"{v} [{REAL_IP}]", "submission"),
    lambda m, v: m.tls(f"{v} [{REAL_IP}]", "TLSv1.3", v, 256),
    lambda m, v: m.auth_ok(R, v, v, app=v),
    lambda m, v: m.auth_failed(R, Reply(535, "5.7.8", "x"), v, v, reason=v),
    lambda m, v: m.auth_failed(f"{v} [{REAL_IP}]", "535 5.7.8", "PLAIN", "bob"),
    lambda m, v: m.reject(Reply(550, "5.7.1", "Relaying denied"), R, what=f"<{v}>... ",
                          sasl_username=v, **{"from": f"<{v}>"}),
    lambda m, v: m.reject(Reply(550, "5.7.1", "From: header address not owned by user"), R,
                          "Q1", reason=f"From: <{v}> not owned by {v}"),
    lambda m, v: m.queued("Q1", v, 10, 1, R, "ESMTPSA", v, v, envid=v),
    lambda m, v: m.sent("Q1", v, f"{v} [198.51.100.1]:25", 1.0, 1, "2.0.0", v),
    lambda m, v: m.deferred("Q1", v, f"mx.{v}", 1.0, 1, "4.0.0", v, tls=v, policy=v),
    lambda m, v: m.tls_connection("Q1", f"{v} [198.51.100.1]:25", "verified", v, v, 256,
                                  "dane", reason=v),
    lambda m, v: m.host_failed("Q1", f"{v} [198.51.100.1]:25", v),
    lambda m, v: m.next_host("Q1", v, f"<{v}>,<{v}>", v),
    lambda m, v: m.tls_handshake_failed("Q1", v, v, v),
    lambda m, v: m.tls_not_used("Q1", v, v),
    lambda m, v: m.dkim("Q1", "skipped", reason=v, d=v),
    lambda m, v: m.warning(f"connection closed: PROXY header refused: {v}",
                           f"unknown [{REAL_IP}]", listener=v),
    lambda m, v: m.disconnect(R, v, "ehlo=1 quit=1"),
    lambda m, v: m.tls_failed(f"unknown [{REAL_IP}]", v, "submissions", 0.5),
    lambda m, v: m.event(None, lost=v, relay=R, sni=v, orcpt=v, helo=v),
    lambda m, v: m.expired("Q1", v, v, 1.0, 3, "4.0.0", v),
    lambda m, v: m.bounced("Q1", v, v, 1.0, 3, "5.0.0", v),
    lambda m, v: m.tls_policy_failed("Q1", v, v, v, v),
    lambda m, v: m.removed("Q1", by=v),
    lambda m, v: m.sent_before_crash("Q1", [v, "b@x.test"], v),
    lambda m, v: m.sent_before_crash("Q1", [v, "b@x.test"], v, stop=True),
    lambda m, v: m.sent_at_start("Q1", v, v, 1.0, 2, v),
    lambda m, v: m.notification("Q1", v, "Q2"),
    lambda m, v: m.error(v, "Q1", problem=v),
    lambda m, v: m.daemon(v, listeners=v),
]
# Event methods without a value that can come from outside (queue ids are ours).
NO_CLIENT_VALUE = {"held", "released", "delayed", "flush", "reopen", "tls_from",
                   "then",  # then: no line, a call after the lines before it
                   # keep_owed: no line; write_owed: lines reject()/auth_failed() escaped
                   "keep_owed", "write_owed"}

_KEY = re.compile(r"([A-Za-z_][\w-]*)=")
_NEXT = re.compile(r", (?=[A-Za-z_][\w-]*=)")


def parse(line: str) -> list[tuple[str, str]]:
    """`QID: k=v, k="v", ...` as an admin's parser reads it: a quoted value runs to the
    next double quote, any other to the next `, key=`."""
    qid, sep, rest = line.partition(": ")
    assert sep and qid, line
    out = []
    while rest:
        m = _KEY.match(rest)
        assert m, (line, rest)
        rest = rest[m.end():]
        if rest.startswith('"'):
            end = rest.index('"', 1) + 1
            assert rest[end:end + 2] in ("", ", "), (line, rest)
        else:
            n = _NEXT.search(rest)
            end = n.start() if n else len(rest)
        out.append((m.group(1), rest[:end]))
        rest = rest[end + 2:]
    return out


def lines_of(path: Path) -> list[str]:
    return [ln.split("]: ", 1)[1] for ln in path.read_text().split("\n") if ln]


@pytest.mark.parametrize("event", EVENTS)
def test_hostile_values_keep_one_line_and_the_same_fields(tmp_path: Path, event) -> None:
    benign = maillog.MailLog(f"file:{tmp_path / 'benign.log'}")
    event(benign, "benign")
    benign.flush()
    want = [k for k, _ in parse(lines_of(tmp_path / "benign.log")[0])]
    m = maillog.MailLog(f"file:{tmp_path / 'mail.log'}")
    for v in HOSTILE:
        event(m, v)
    m.flush()
    text = (tmp_path / "mail.log").read_text()
    assert len(text.splitlines()) == len(HOSTILE), text  # str.splitlines: every separator
    for line in lines_of(tmp_path / "mail.log"):
        assert line.isprintable(), line
        assert [k for k, _ in parse(line)] == want, line


@pytest.mark.parametrize("event", EVENTS)
def test_json_lines_parse(tmp_path: Path, event) -> None:
    m = maillog.MailLog(f"file:{tmp_path / 'j.log'}", fmt="json")
    for v in HOSTILE:
        event(m, v)
    m.flush()
    text = (tmp_path / "j.log").read_text()
    assert len(text.splitlines()) == len(HOSTILE), text
    for line in text.splitlines():
        rec = json.loads(line)
        for value in rec.values():
            assert not isinstance(value, str) or value.isprintable(), rec


def test_escape_rules() -> None:
    assert escape("alice@example.org") == "alice@example.org"
    assert escape("[192.0.2.1]") == "[192.0.2.1]"  # a HELO address literal stays readable
    assert escape("caf\u00e9") == "caf\u00e9"  # printable Unicode is kept
    assert escape("") == '""'
    assert escape("John Doe") == '"John Doe"'
    assert escape(f"bob, relay=unknown [{FORGED}], sasl_username=root") == \
        '"bob, relay=unknown \\x5b10.9.9.9\\x5d, sasl_username=root"'
    assert escape("a\r\nb\x00c\\d\"e") == "a\\x0d\\x0ab\\x00c\\x5cd\\x22e"
    assert escape("\u2028\u2029\u200b\u202e\xa0\U000e0001") == \
        "\\u2028\\u2029\\u200b\\u202e\\xa0\\U000e0001"
    assert escape("Too many connections, try again later", "text") == \
        "Too many connections, try again later"  # our prose keeps its commas
    assert escape("x, relay=y", "text") == "x\\x2c relay=y"
    assert escape("evil [1.2.3.4]", "token") == "evil\\x20\\x5b1.2.3.4\\x5d"
    assert escape('a"\u2028', "json") == 'a"\\u2028'


def _fail2ban_filter() -> str:
    """The failregex docs/LIMITS.md gives admins."""
    limits = (Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md").read_text()
    m = re.search(r"`failregex = (.+?)`", limits)
    assert m, "docs/LIMITS.md has no failregex"
    return m.group(1)


@pytest.mark.slow
@pytest.mark.external
def test_fail2ban_reads_only_the_real_client(tmp_path: Path) -> None:
    """fail2ban-regex (the real tool) with the documented filter over a log full of
    forged values: every failed AUTH counts against the client's own address, and no
    line yields an address the client chose."""
    ci.require_tool("fail2ban-regex", "fail2ban")
    log = tmp_path / "mail.log"
    m = maillog.MailLog(f"file:{log}")
    failures = 0
    for v in HOSTILE:
        for event in EVENTS:
            event(m, v)
        m.auth_failed(R, "535 5.7.8", "PLAIN", v)
        failures += 1
    m.flush()
    r = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), _fail2ban_filter()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ips = r.stdout.split()
    assert set(ips) == {REAL_IP}, r.stdout
    # the auth_failed events in EVENTS (two per value) and the extra one per value
    assert len(ips) == 3 * failures, r.stdout


def test_every_event_is_tried_with_hostile_values() -> None:
    """A new event function must join EVENTS above (or say why it carries nothing from
    outside): the escaping is only as good as the events it is tested on."""
    import inspect

    src = inspect.getsource(inspect.getmodule(test_every_event_is_tried_with_hostile_values))
    events = {n for n, _ in inspect.getmembers(maillog.MailLog, inspect.isfunction)
              if not n.startswith("_")}
    missing = {n for n in events - NO_CLIENT_VALUE if f"m.{n}(" not in src}
    assert not missing, missing


_ESC = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def unescape(text: str, *, quoted: bool = True) -> str:
    """README's recipe: drop the quotes, replace each escape by its character.
    `quoted=False` for a JSON value: its quotes are JSON's (json.loads took them off)
    and a double quote in it is the client's own (the "json" context leaves it to JSON)."""
    if quoted and len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return _ESC.sub(lambda m: chr(int(m[1][1:], 16)), text)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@example('""')  # a JSON value with quotes at both ends keeps them
@given(st.text(alphabet=st.characters(codec=None), max_size=40))
def test_escape_is_one_printable_field_and_reversible(s: str) -> None:
    v = escape(s)
    assert v.isprintable() and "\\n" not in v and "\\r" not in v
    if v.startswith('"'):
        assert v.endswith('"') and '"' not in v[1:-1] and "[" not in v and "]" not in v
    else:
        assert not any(c in v for c in ' ,="')
    assert unescape(v) == s
    for context in ("text", "token", "json"):
        e = escape(s, context)
        assert e.isprintable() and unescape(e, quoted=context != "json") == s
        assert context != "token" or not any(c in e for c in ' ,=[]"')
