"""The engine's fast paths (smtpd/protocol.py, address.py) give the bytes of the slow ones.

Each cut of issue 22's per-command cost keeps a slower, obviously right form somewhere:
`Reply.lines()` for the wire form of a reply, the character-by-character rules the
parsers had. Each test here compares the engine's output with that form, over the
constants, edge cases and Hypothesis examples, so a fast path that differs fails.
"""

from __future__ import annotations

from engineharness import Harness, make_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authrelay import address, replies
from authrelay.smtpd import protocol as p
from authrelay.types import Reply


def _wire(h: Harness, r: Reply) -> bytes:
    h.eng.data_to_send()
    h.eng._reply(r)
    return h.eng.data_to_send()


def test_every_constant_reply_and_an_equal_copy_go_out_as_reply_lines() -> None:
    h = Harness()
    constants = [r for r in vars(replies).values() if isinstance(r, Reply)]
    assert len(constants) > 50
    for r in constants:
        assert _wire(h, r) == r.lines(), r
        copy = Reply(r.code, r.enhanced, r.text)  # equal, not the same object
        assert _wire(h, copy) == r.lines(), r
    # a reply the table does not hold: rendered as it is, never a constant's bytes
    odd = Reply(250, "2.0.0", "Ok\nsecond line")
    assert _wire(h, odd) == b"250-2.0.0 Ok\r\n250 2.0.0 second line\r\n"


def _ehlo_reference(eng: p.Engine) -> bytes:
    """The EHLO reply as the engine built it before its keyword lines were cached."""
    lines = [f"{eng.hostname} greets {eng.helo}", "PIPELINING",
             f"SIZE {eng.max_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
    if not eng.tls and eng.tls_available:
        lines.append("STARTTLS")
    elif not eng.auth_user and eng.auth_available:
        lines.append("AUTH " + " ".join(eng.mechanisms))
    lines.append("HELP")
    return Reply(250, "", "\n".join(lines)).lines()


_STATES = st.tuples(st.sampled_from(["smtp", "submission", "submissions"]), st.booleans(),
                    st.booleans(), st.booleans(), st.booleans())
_CONFIGS = [make_config(), make_config({"hostname": "mx.other.example",
                                        "limits": {"max_message_size": 12345},
                                        "auth": {"mechanisms": ["login"]}})]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(min_size=1, max_size=300).filter(lambda s: "\r" not in s and "\n" not in s),
       state=_STATES, which=st.integers(0, len(_CONFIGS) - 1))
@example(name="client.example", state=("smtp", False, True, True, False), which=0)
@example(name="x\x00y\u00e9\u2028", state=("submission", True, True, True, True), which=1)
def test_the_ehlo_greeting_and_quit_replies_are_the_bytes_reply_lines_gives(
        name: str, state: tuple[str, bool, bool, bool, bool], which: int) -> None:
    mode, tls_available, auth_available, tls_active, logged_in = state
    cfg = _CONFIGS[which]
    eng = p.Engine(cfg, mode=mode, tls_available=tls_available,
                   auth_available=auth_available, tls_active=tls_active)
    eng.greet()
    assert eng.data_to_send() == Reply(220, "", f"{cfg.hostname} ESMTP authrelay").lines()
    if logged_in:
        eng.auth_user = "alice"
    eng.receive_data(b"EHLO " + name.encode("utf-8", "surrogatepass") + b"\r\n")
    while eng.next_event() is p.CONTINUE:
        pass
    out = eng.data_to_send()
    if eng.helo is not None:
        assert out == _ehlo_reference(eng)
    else:  # refused: a constant reply
        assert out in (replies.EHLO_SYNTAX.lines(), p._BAD_UTF8.lines())
    eng.receive_data(b"QUIT\r\n")
    while eng.next_event() not in (p.CLOSED, p.NEED_DATA):
        pass
    assert eng.data_to_send() == replies.bye(cfg.hostname).lines()


_PATHISH = st.text(alphabet='<>"\\a@. =', max_size=14)


@settings(max_examples=3000)
@given(arg=_PATHISH)
@example(arg='<"a>b"@c>')
@example(arg='<"a\\">"@c> X=1')
@example(arg='<a\\>b>')
@example(arg='<"unclosed>')
def test_the_end_of_a_path_found_by_find_is_the_one_the_scan_finds(arg: str) -> None:
    assert address._path_end(arg) == address._scan_path_end(arg)
    inner = arg[1:]
    assert bool(inner and inner[0] == '"' and address._QUOTED.fullmatch(inner)) == bool(
        address._QUOTED.fullmatch(inner))


_LIMIT_CONFIGS = [None, {"limits": {"max_auth_line_length": 300}},
                  {"limits": {"max_line_length": 1000, "max_auth_line_length": 700}}]


def _too_long(h: Harness, prefix: bytes, n: int, split: bool) -> bool:
    """Send a line of `n` octets (CRLF included) starting with `prefix`: refused as too
    long? Before it, the engine's own `_line_limit` (the slow form) says where the limit is."""
    line = prefix + b"x" * (n - 2 - len(prefix)) + b"\r\n"
    h.replies()
    if split:
        for k in range(len(line)):
            h.feed(line[k:k + 1])
    else:
        h.feed(line)
    return any(r[-1].startswith("500 5.5.6") for r in h.replies())


def _limit(h: Harness, prefix: bytes) -> int:
    h.eng._buf[:] = prefix
    limit = h.eng._line_limit(h.eng.phase)
    h.eng._buf.clear()
    return limit


def test_lines_are_refused_as_too_long_exactly_past_the_limit_line_limit_gives() -> None:
    for overrides in _LIMIT_CONFIGS:
        for prefix in (b"NOOP ", b"noop ", b"MAIL FROM:<a@b> X=", b"RCPT TO:<a@b> X=",
                       b"AUTH PLAIN ", b"Auth plain ", b"HELP ", b"SASL"):
            for split in (False, True):
                h = Harness(mode="submissions", overrides=overrides)
                h.send("EHLO client.example")
                if prefix == b"SASL":  # a SASL response line (Phase.AUTH_LINE)
                    h.send("AUTH LOGIN")
                    assert h.eng.phase is p.Phase.AUTH_LINE
                limit = _limit(h, prefix)
                for n in (limit - 1, limit, limit + 1, limit + 2):
                    if h.closed:
                        break
                    assert _too_long(h, prefix, n, split) == (n > limit), (overrides, prefix, n)
                    if prefix == b"SASL" and h.eng.phase is not p.Phase.AUTH_LINE:
                        h.send("AUTH LOGIN")
                    elif h.eng.phase is p.Phase.AUTH_LINE:
                        h.send("*")  # cancel an AUTH PLAIN that asked for more


@settings(max_examples=1500)
@given(name=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
       .filter(lambda s: "\r" not in s and "\n" not in s))
@example(name="a\tb")
@example(name="a\x1cb")
@example(name="a\x85b")
@example(name="a\u3000b")
@example(name="a\x00b")
@example(name='a(b)<c>"d;e@f\\g:h')
def test_a_hello_name_is_refused_exactly_when_it_holds_whitespace(name: str) -> None:
    for verb in ("EHLO", "HELO"):
        h = Harness()
        h.send(f"{verb} {name}")
        stripped = name.strip()
        refused = not stripped or any(c.isspace() for c in stripped)
        assert (h.eng.helo is None) == refused, (verb, name)
        if not refused:
            # printable ASCII, less what would give our Received field a structure
            shown = "".join(c if c.isascii() and c.isprintable() and c not in '()<>\\";@'
                            else "?" for c in stripped)
            assert h.eng.helo == shown[:255]


def _labels_ok(d: str) -> bool:
    try:
        address._check_labels(d)
    except address.AddressError:
        return False
    return True


@settings(max_examples=3000)
@given(d=st.text(alphabet="aZ9-.\u00e9_", max_size=20)
       | st.lists(st.text(alphabet="ab-", min_size=60, max_size=66), min_size=1, max_size=3)
       .map(".".join))
@example(d="a" * 63 + ".b")
@example(d="a" * 64 + ".b")
@example(d="-a.b")
@example(d="a-.b")
@example(d="a..b")
@example(d="x.\u00e9.y")
def test_the_one_match_domain_check_accepts_only_what_the_label_check_accepts(d: str) -> None:
    if address._ASCII_DOMAIN.fullmatch(d):
        assert _labels_ok(d), d
    elif d.isascii() and "_" not in d:
        # an ASCII domain it does not match is one the label check refuses too
        assert not _labels_ok(d), d


@settings(max_examples=2000)
@given(code=st.integers(0, 999), enhanced=st.sampled_from(["", "2.0.0", "5.1.3"]) | st.text(),
       text=st.text())
@example(code=250, enhanced="2.0.0", text="Ok: queued as 2N6HBCPW1TGGJTFFH")
@example(code=250, enhanced="", text="relay.test")
@example(code=550, enhanced="5.1.1", text="\ud800 bad \u00e9")
@example(code=250, enhanced="", text="a\nb\n")
def test_a_one_line_reply_renders_as_the_line_by_line_form(
        code: int, enhanced: str, text: str) -> None:
    r = Reply(code, enhanced, text)
    assert r.lines() == r._all_lines()
