"""policy/ownership.py: which From:/Sender: mailboxes a user may send as (issue 17)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authrelay.dkim.signer import HeaderSyntaxError, from_domain, split_fields
from authrelay.policy import ownership
from authrelay.policy.ownership import Owner, header_verdict, may_send_as, normalize

OWNED = {"bob@other.test"}

OWNED_HEADERS = [
    b"From: bob@other.test\r\n",
    b"From: Bob <BOB@Other.Test>\r\n",
    b"From: Bob\r\n <bob@other.test>\r\n",  # folded
    b'From: "bob"@other.test\r\n',  # quoted local part
    b'From: "Smith, Bob" <bob@other.test>\r\n',
    b"From: =?UTF-8?B?Qm9i?= <bob@other.test>\r\n",
    b"From: b\xc3\xb6b <bob@other.test>\r\n",  # RFC 6532 UTF-8 display name
    b"From: team: bob@other.test;\r\n",  # a group of one
    b"From: bob@other.test (Bob at home)\r\n",  # a comment is not a mailbox
    b'From: "bob@other.test" <bob@other.test>\r\n',  # the address as its own name
    b"From: =?utf-8?q?bob=40other.test?= <bob@other.test>\r\n",
    b"From: bob@other.test\r\nSender: bob@other.test\r\n",
    b"Subject: x\r\nfrom: bob@other.test\r\nTo: a@b\r\n",
    b"From: =?utf-8?q?Bob?= =?iso-8859-1?q?_M=FCller?= <bob@other.test>\r\n",
    b"From: =?x-unknown?q?Bob?= =?utf-8?q?_at_home?= <bob@other.test>\r\n",
    b"From: bob@other.test (=?utf-8?q?bob=40other.test?=)\r\n",
    b'From: "Bob\xc2\xa0Smith" <bob@other.test>\r\n',  # NBSP inside a display name
]

NOT_OWNED = [
    (b"From: ceo@probe.test\r\n", "From: <ceo@probe.test> not owned by bob"),
    (b'From: "bob@other.test" <ceo@probe.test>\r\n', "From: <ceo@probe.test> not owned"),
    (b"From: =?utf-8?q?bob=40other.test?= <ceo@probe.test>\r\n", "<ceo@probe.test>"),
    (b"From: ceo@probe.test\r\nSender: bob@other.test\r\n", "From: <ceo@probe.test>"),
    (b"From: bob@other.test\r\nSender: ceo@probe.test\r\n", "Sender: <ceo@probe.test>"),
    (b"From: bob@other.test\r\nFrom: ceo@probe.test\r\n", "From: <ceo@probe.test>"),
    (b"From: bob@other.test, ceo@probe.test\r\n", "From: <ceo@probe.test>"),
    (b"From: bob@other.test <ceo@probe.test>\r\n", "From: not parsable"),
    (b"From: =?utf-8?q?ceo=40probe.test?=\r\n", "From: not parsable"),
    (b"From: undisclosed:;\r\n", "not an address"),
    (b"From: bob@other.test@probe.test\r\n", "From: not parsable"),
    (b"Subject: no from\r\n", "no From: field"),
    (b"", "no From: field"),
    (b"Sender: ceo@probe.test\r\n", "Sender: <ceo@probe.test> not owned"),
    (b"Sender: bob@other.test\r\n", "no From: field"),
    # obs-optional WSP before the colon (RFC 5322 4.5.3): still a From: field here
    (b"From : ceo@probe.test\r\nFrom: bob@other.test\r\n", "From: <ceo@probe.test>"),
    (b"From: \xff@other.test\r\n", "not owned"),  # not UTF-8: never equal to an owned one
    (b"From: bob@other.test.evil\r\n", "not owned"),
    # an address shown beside the mailbox (display name, encoded word, comment) is what a
    # reader sees: it must be the user's too
    (b'From: "ceo@probe.test" <bob@other.test>\r\n', "From: <ceo@probe.test> not owned"),
    (b"From: =?utf-8?q?ceo=40probe.test?= <bob@other.test>\r\n", "<ceo@probe.test>"),
    (b"From: <bob@other.test>(<ceo@probe.test>)\r\n", "From: <ceo@probe.test> not owned"),
    (b"From: bob@other.test (ceo@probe.test)\r\n", "From: <ceo@probe.test> not owned"),
    (b"Sender: ceo@probe.test <bob@other.test>\r\nFrom: bob@other.test\r\n", "Sender:"),
    (b'From: "ceo\xef\xbc\xa0probe.test" <bob@other.test>\r\n', "not owned"),  # fullwidth @
    (b"From: bob@other.test\x0b\r\n", "not owned"),  # only ASCII blanks are trimmed
    # adjacent encoded-words are shown joined, the blanks between them dropped (RFC 2047
    # 6.2): "ceo@probe.test" on screen (email.headerregistry reads "ceo @probe.test")
    (b"From: =?utf-8?q?ceo?= =?utf-8?q?=40probe.test?= <bob@other.test>\r\n",
     "From: <ceo@probe.test> not owned"),
    (b"From: =?utf-8?q?ceo?=\r\n =?utf-8?b?QHByb2JlLnRlc3Q=?= <bob@other.test>\r\n",
     "From: <ceo@probe.test> not owned"),
    (b"From: =?utf-8?q?ceo?= =?utf-8?q?=40probe.test?= : bob@other.test;\r\n",
     "From: <ceo@probe.test> not owned"),  # as a group's name
    (b"From: bob@other.test (=?utf-8?q?ceo=40probe.test?=)\r\n",  # in a comment
     "From: <ceo@probe.test> not owned"),
    (b"From: =?x-unknown?q?ceo?= =?utf-8?q?=40probe.test?= <bob@other.test>\r\n",
     "From: <ceo@probe.test> not owned"),
    # an encoded-word glued to a word: lenient readers (most) decode it all the same
    (b"From: ceo=?utf-8?q?=40probe.test?= <bob@other.test>\r\n",
     "From: <ceo@probe.test> not owned"),
    (b"From: bob@other.test (ceo=?utf-8?b?QHByb2Jl?=.test)\r\n",
     "From: <ceo@probe.test> not owned"),
    # blanks drawn narrow or not at all around the @ (hair space, narrow NBSP, NBSP, a
    # C0 separator): "ceo@probe.test" on screen
    (b'From: "ceo\xe2\x80\x8a@\xe2\x80\x8aprobe.test" <bob@other.test>\r\n',
     "From: <ceo@probe.test> not owned"),
    (b'From: "ceo\xe2\x80\xaf@probe.test" <bob@other.test>\r\n', "<ceo@probe.test> not owned"),
    (b'From: "ceo@\xc2\xa0probe.test" <bob@other.test>\r\n', "<ceo@probe.test> not owned"),
    (b'From: "ceo\x1f@probe.test" <bob@other.test>\r\n', "<ceo@probe.test> not owned"),
    (b"From: =?utf-8?q?ceo=E2=80=89=40probe.test?= <bob@other.test>\r\n",  # thin space
     "<ceo@probe.test> not owned"),
]


@pytest.mark.parametrize("head", OWNED_HEADERS)
def test_owned(head: bytes) -> None:
    assert header_verdict(head + b"\r\n", "bob", OWNED) == ""
    assert Owner.of("bob", OWNED).verdict(head) == ""


@pytest.mark.parametrize(("head", "why"), NOT_OWNED)
def test_not_owned(head: bytes, why: str) -> None:
    got = header_verdict(head + b"\r\n", "bob", OWNED)
    assert why in got, got


def test_a_user_named_like_an_address_owns_it() -> None:
    assert header_verdict(b"From: Bob@Example.org\r\n\r\n", "bob@example.org", ()) == ""
    assert may_send_as("BOB@example.org.", "bob@example.org", ())
    assert not may_send_as("alice@example.org", "bob@example.org", ())
    assert not may_send_as("", "bob", OWNED)


def test_normalize() -> None:
    assert normalize('"Bob"@Other.Test.') == "bob@other.test"
    assert normalize("x@b\u00fccher.test") == "x@xn--bcher-kva.test"
    assert normalize("no-at-sign") == ""


@pytest.mark.parametrize("domain", [
    "bo\u00df.test",  # IDNA2003 maps to "boss.test"; RFC 5890's A-label is xn--bo-fka.test
    "b\u200dob.test",  # ZWJ: dropped by IDNA2003 (bob.test), invalid there under RFC 5891
    "b\u00adob.test",  # soft hyphen: dropped by nameprep, another name to other readers
    "bob\u3002test",  # ideographic full stop read as a dot
    "\uff42ob.test",  # fullwidth b
])
def test_a_domain_idna2003_maps_onto_an_owned_one_is_not_owned(domain: str) -> None:
    """Python's "idna" codec is IDNA2003 (nameprep): it maps ß to "ss", drops ZWJ and soft
    hyphen, folds fullwidth letters. A reader that follows RFC 5890/5891 (IDNA2008) sees
    another domain (boß.test is xn--bo-fka.test, a name of its own), so such a From: is
    not vouched for, and the signer does not pick the mapped domain either."""
    owned = {"bob@boss.test", "bob@bob.test"}
    head = f"From: bob@{domain}\r\n".encode()
    assert normalize(f"bob@{domain}") == ""
    assert header_verdict(head + b"\r\n", "bob", owned) != ""
    d, why = from_domain([(b"From", f" bob@{domain}\r\n".encode())])
    assert d is None, (d, why)


_PARTS = st.sampled_from([
    b"From: ", b"Sender: ", b"From : ", b"X: ", b"\r\n", b"\r\n ", b" ", b"<", b">", b'"',
    b"\\", b",", b";", b"g:", b"(", b")", b"=?utf-8?q?", b"?=", b"[", b"]", b"@", b".",
    b"bob@other.test", b"ceo@probe.test", b"BOB@Other.Test", b"bob", b"probe.test",
    b"\xc3\xa9", b"\xff"])


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(st.lists(_PARTS, max_size=30).map(b"".join))
def test_owned_means_the_signer_never_picks_another_domain(head: bytes) -> None:
    """Whatever the header, the verdict never raises, and when it says "owned" the DKIM
    signer's own reading (signer.split_fields, its From: domain) is bob's domain or
    none: the two parsers cannot be played against each other."""
    msg = head + b"\r\n\r\nbody\r\n"
    if header_verdict(msg, "bob", OWNED):
        return
    try:
        fields = split_fields(msg)
    except HeaderSyntaxError:  # as Signer._decide: a header it cannot split is never signed
        return
    domain, _why = from_domain(fields)
    assert domain in (None, "other.test"), (msg, domain)


TWO_DOMAINS = {"bob@other.test", "bob@second.test", "bob@b\u00fccher.test"}


@pytest.mark.parametrize(("head", "want"), [
    (b"From: bob@other.test\r\n", ("", "other.test")),
    (b"From: Bob <BOB@Other.Test>\r\nSender: bob@second.test\r\n", ("", "other.test")),
    (b'From: "Smith, Bob" <bob@second.test>\r\n', ("", "second.test")),
    (b"From: bob@b\xc3\xbccher.test\r\n", ("", "xn--bcher-kva.test")),  # the A-label
    (b"From: bob@other.test, bob@second.test\r\n", ("", "")),  # two domains
    (b"From: bob@other.test\r\nFrom: bob@other.test\r\n", ("", "")),  # two From: fields
    (b"Sender: bob@other.test\r\n", (ownership.NO_FROM, "")),
    (b"From: ceo@probe.test\r\n", ("From: <ceo@probe.test> not owned by bob", "")),
    (b"From: bob@other.test\r\nSender: ceo@probe.test\r\n",
     ("Sender: <ceo@probe.test> not owned by bob", "")),
    # owned, but a line of the section is neither a `name:` field nor a fold: no domain,
    # the signer's own parse decides (it reads an obs-optional `From :` as OpenDKIM does,
    # refuses the other lines: "message not parsable"; the last two it reads, but are
    # left to it all the same)
    (b"From : bob@other.test\r\n", ("", "")),  # obs-optional: dkimpy drops the line
    (b"From\t: bob@other.test\r\n", ("", "")),
    (b"Sender : bob@second.test\r\nFrom: bob@other.test\r\n", ("", "")),
    (b"From: bob@other.test\r\njunk line\r\n", ("", "")),
    (b"From bob@other.test Mon\r\nFrom: bob@other.test\r\n", ("", "")),  # mbox line
    (b"From: bob@other.test\r\n\r\nX: y\r\n", ("", "")),  # an empty line inside
    (b"From: Bob\r\n <bob@other.test>\r\nSubject: a\r\n\tb\r\n", ("", "other.test")),
])
def test_assess_names_the_from_domain_only_when_all_is_owned(
        head: bytes, want: tuple[str, str]) -> None:
    """`Owner.assess`: the verdict, and the one domain of the one From: field (what the
    DKIM signer then looks a key up for without parsing the header again)."""
    owner = Owner.of("bob", TWO_DOMAINS)
    assert owner.assess(head + b"\r\n") == want
    assert owner.verdict(head + b"\r\n") == want[0]


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(_PARTS, st.sampled_from([b"bob@second.test", b"Bob@Second.Test",
                                                    b"bob@b\xc3\xbccher.test"])),
                max_size=30).map(b"".join))
def test_assessed_domain_is_the_one_the_signer_reads(head: bytes) -> None:
    """Whatever the header, when `assess` names a From: domain (all owned; the accept
    path then decides "no key" from it alone) the signer's own reading of the same header
    (signer.split_fields, its From: domain) is exactly that domain: a message is never
    left unsigned for one domain while the signer would have signed it for another, and
    the accept path's `dkim=none` note is the one the signer's parse gives (not "message
    not parsable")."""
    section = head + b"\r\n"  # as the cleanup gives it: the message's fields, no body
    msg = section + b"\r\nbody\r\n"
    verdict, domain = Owner.of("bob", TWO_DOMAINS).assess(section)
    assert verdict == header_verdict(section, "bob", TWO_DOMAINS)
    if not domain:
        return
    assert verdict == ""
    fields = split_fields(msg)  # splits (else Signer._decide notes not parsable)
    assert from_domain(fields) == (domain, ""), (msg, domain)


# The plain-mailbox shortcut (header_mailboxes reads `Name <local@domain>`-shaped values
# with one regex): whatever the value, it must answer what the two parsers answer.
_ATEXT = st.text("abcXYZ019_+-", min_size=1, max_size=6)
_LABELS = st.text("abz09-", min_size=1, max_size=6)
_SIMPLE_ADDR = st.builds(lambda loc, dom, tld: f"{'.'.join(loc)}@{'.'.join(dom)}.{tld}",
                         st.lists(_ATEXT, min_size=1, max_size=3),
                         st.lists(_LABELS, min_size=1, max_size=3), _LABELS)
_WSP = st.sampled_from(["", " ", "\t", "  ", " \t"])
_NAME = st.lists(st.text("aZ09", min_size=1, max_size=5), max_size=3).map(" ".join)
_NEAR_SIMPLE = st.one_of(
    st.builds(lambda w1, a, w2: f"{w1}{a}{w2}", _WSP, _SIMPLE_ADDR, _WSP),
    st.builds(lambda w1, n, w2, a, w3: f"{w1}{n}{w2}<{a}>{w3}", _WSP, _NAME, _WSP,
              _SIMPLE_ADDR, _WSP),
    # and values a character or a word away from those shapes: quotes, commas, dots,
    # @, <, (, an address or an encoded word as the display name
    st.builds(lambda a, i, c: a[:i] + c + a[i:], _SIMPLE_ADDR,
              st.integers(0, 12), st.sampled_from(list('"(),.@<>:; \\[]=?é'))),
    st.builds(lambda n, w, a: f"{n}{w}<{a}>", st.one_of(
        _SIMPLE_ADDR, st.text(st.sampled_from(list('aZ0 .@"(),:;\\=?é\t')), max_size=12)),
        _WSP, _SIMPLE_ADDR),
    st.text(st.sampled_from(list('ab.@<> "(),-_+\t:;')), max_size=25),
    # quoted display names: everyday ones (the shortcut takes them) and near misses
    st.builds(lambda w1, q, w2, a, w3: f'{w1}"{q}"{w2}<{a}>{w3}', _WSP,
              st.text(st.sampled_from(list("aZ0 .,'_-@\"\\=?()<>:;\t\u00e9")), max_size=14),
              _WSP, _SIMPLE_ADDR, _WSP),
)


def _slow_mailboxes(head: bytes) -> tuple[list[tuple[str, str]], str]:
    """header_mailboxes without the shortcut: every value through both parsers."""
    found: list[tuple[str, str]] = []
    fields = ownership.header_fields(head)
    for name, value in fields:
        label = "From:" if name == b"from" else "Sender:"
        addrs, problem = ownership._parsed_mailboxes(label, value)
        found += [(label, a) for a in addrs]
        if problem:
            return found, problem
    return found, "" if any(n == b"from" for n, _ in fields) else ownership.NO_FROM


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(_NEAR_SIMPLE, _NEAR_SIMPLE)
def test_plain_mailbox_shortcut_reads_what_both_parsers_read(v1: str, v2: str) -> None:
    head = f"From: {v1}\r\nSender: {v2}\r\n\r\n".encode()
    assert ownership.header_mailboxes(head) == _slow_mailboxes(head), head


def test_plain_mailbox_shortcut_taken_and_declined() -> None:
    fast = ownership.plain_mailbox
    for v in ("bob@other.test", " Bob Smith <bob@other.test> ", "<b.o-b+x@a-1.other.test>",
              '"Bob" <bob@other.test>', '"Smith, Bob J." <bob@other.test>',
              '"O\'Neil-Smith_2" <bob@other.test>', '"" <bob@other.test>'):
        assert fast(v) == v.strip(" <>").rpartition("<")[2], v
    for v in ('"ceo@bank.test" <bob@other.test>', '"a\\"b" <bob@other.test>',
              '"=?utf-8?q?x?=" <bob@other.test>', '"B\u00f6b" <bob@other.test>',
              '"Bob" "Smith" <bob@other.test>', "bob@other.test (x)", "a@b.test, c@d.test",
              "bob@other.test <ceo@probe.test>", "=?utf-8?q?x?= <a@b.test>", "bob@localhost",
              "bob@other.test.", "b\u00f6b <bob@other.test>", "bob@other.test\n"):
        assert fast(v) is None, v


# bob owns bob@mine.test; bank.test is not his. Each of these shows a bank.test address
# to a reader (after unfolding, unescaping quoted-pairs, dropping routes) while every
# mailbox the parsers read is bob's: never vouched for.
MINE = {"bob@mine.test"}
SHOWN_NOT_OWNED = [
    # a folded quoted name: `ceo@ bank.test` once unfolded, `ceo@bank.test` to a reader
    # that drops the fold whole; blanks (or invisible characters) beside the @ likewise
    b'From: "ceo@\r\n bank.test" <bob@mine.test>\r\n',
    b'From: "ceo@\r\n\tbank.test" <bob@mine.test>\r\n',
    b'From: "ceo\r\n @bank.test" <bob@mine.test>\r\n',
    b'From: "ceo @ bank.test" <bob@mine.test>\r\n',
    b'From: "ceo" "@bank.test" <bob@mine.test>\r\n',
    b'From: "ceo@" bank.test <bob@mine.test>\r\n',
    b'From: "ceo\t@bank.test" <bob@mine.test>\r\n',
    b'From: "ceo\xe2\x80\x8b @bank.test" <bob@mine.test>\r\n',  # ZWSP then a space
    b"From: bob@mine.test (ceo @ bank.test)\r\n",
    b"From: =?utf-8?q?ceo_=40_bank.test?= <bob@mine.test>\r\n",
    b'From: "ceo @ bank\xef\xbc\x8etest" <bob@mine.test>\r\n',  # fullwidth full stop
    b'From: "ceo @ bank\xe2\x80\xa4test" <bob@mine.test>\r\n',  # one dot leader
    b'From: "ceo @ bank\xef\xb9\x92test" <bob@mine.test>\r\n',  # small full stop
    b'From: "ceo @ bank\xc2\xb7test" <bob@mine.test>\r\n',  # middle dot
    # raw bytes that are not UTF-8, shown in a legacy fallback charset: a fullwidth @
    b'From: "ceo\xa3\xc0bank.test" <bob@mine.test>\r\n',  # GBK, EUC-KR
    b"From: ceo\x81\x97bank.test <bob@mine.test>\r\n",  # Shift_JIS
    b'From: "ceo\xa2Ibank.test" <bob@mine.test>\r\n',  # Big5
    b"From: bob@mine.test (ceo\xa1\xf7bank.test)\r\n",  # EUC-JP, in a comment
    # an encoded-word's charset label readers know and Python does not (WHATWG labels)
    b"From: =?x-gbk?b?Y2Vvo8BiYW5rLnRlc3Q=?= <bob@mine.test>\r\n",
    b"From: =?x-sjis?b?Y2VvgZdiYW5rLnRlc3Q=?= <bob@mine.test>\r\n",
    b"From: ceo=?x-gbk?b?o8A=?=bank.test <bob@mine.test>\r\n",
    b"From: =?unicode?b?YwBlAG8AIP9iAGEAbgBrAC4AdABlAHMAdAA=?= <bob@mine.test>\r\n",  # UTF-16LE
    # bytes outside the named charset, inside its superset (readers decode gb2312 as
    # GBK): A9 88 is U+FE6B SMALL COMMERCIAL AT in GBK, nothing in GB2312
    b"From: =?gb2312?b?Y2VvqYhiYW5rLnRlc3Q=?= <bob@mine.test>\r\n",
    b'Sender: "ceo@\r\n bank.test" <bob@mine.test>\r\nFrom: bob@mine.test\r\n',
    b'From: "ceo@\r\n bank.test": bob@mine.test;\r\n',  # a group's name
    # punctuation beside the @ is drawn as text: an escaped quote shows ceo"@bank.test
    b'From: "ceo\\"@bank.test" <bob@mine.test>\r\n',
    b'From: "ceo@\\"bank.test" <bob@mine.test>\r\n',
    b'From: "ceo\\"@bank.test": bob@mine.test;\r\n',
    b"From: \"'ceo'@bank.test\" <bob@mine.test>\r\n",
    b'From: "(ceo)@bank.test" <bob@mine.test>\r\n',
    b'From: "<ceo>@bank.test" <bob@mine.test>\r\n',
    b'From: "ceo@(bank.test)" <bob@mine.test>\r\n',
    b'From: "ceo,@bank.test" <bob@mine.test>\r\n',
    b"From: bob@mine.test ((ceo)@bank.test)\r\n",
    b'Sender: "ceo\\"@bank.test" <bob@mine.test>\r\nFrom: bob@mine.test\r\n',
    # an obs-route (RFC 5322 4.4): both parsers drop it, some readers show bank.test
    b"From: <@bank.test:bob@mine.test>\r\n",
    b"From: Bob <@bank.test:bob@mine.test>\r\n",
    b"From: <(x)@bank.test:bob@mine.test>\r\n",
    b"From: <((x))@bank.test:bob@mine.test>\r\n",
    b"From: team: <@bank.test:bob@mine.test>;\r\n",
    b"From: bob@mine.test\r\nSender: <@bank.test:bob@mine.test>\r\n",
    # UTF-16/32 without a byte order mark: big-endian to an RFC 2781 reader (Python's
    # codec reads it little-endian: CJK text, no @)
    b"From: =?utf-16?b?AGMAZQBvAEAAYgBhAG4AawAuAHQAZQBzAHQ=?= <bob@mine.test>\r\n",
    b"From: =?UTF16?B?AGMAZQBvAEAAYgBhAG4AawAuAHQAZQBzAHQ=?= <bob@mine.test>\r\n",
    b"From: =?utf-32?b?AAAAYwAAAGUAAABvAAAAQAAAAGIAAABhAAAAbgAAAGsAAAAuAAAAdAAAAGUAAABzAAAAdA==?="
    b" <bob@mine.test>\r\n",
    # a right-to-left override or isolate: drawn reversed, `ceo @ bank.test`
    b'From: "\xe2\x80\xaetset.knab @ oec" <bob@mine.test>\r\n',
    b'From: "\xe2\x81\xa7tset.knab @ oec\xe2\x81\xa9" <bob@mine.test>\r\n',
    b"From: =?utf-8?q?=E2=80=AEtset=2Eknab_=40_oec?= <bob@mine.test>\r\n",
]


@pytest.mark.parametrize("head", SHOWN_NOT_OWNED)
def test_an_address_a_reader_shows_must_be_owned(head: bytes) -> None:
    got = header_verdict(head + b"\r\n", "bob", MINE)
    assert "not owned by bob" in got, got


# Everyday From: forms (mail clients, mailing software, SMTPUTF8 names): always signed.
EVERYDAY = [
    b"From: bob@mine.test\r\n",
    b"From: <bob@mine.test>\r\n",
    b"From: Bob <bob@mine.test>\r\n",
    b'From: "Bob Smith" <bob@mine.test>\r\n',
    b'From: "Smith, Bob" <bob@mine.test>\r\n',
    b"From: bob@mine.test (Bob)\r\n",
    b"From: bob@mine.test (Bob Smith)\r\n",
    b"From: Bob Smith\r\n <bob@mine.test>\r\n",
    b'From: "Smith,\r\n Bob" <bob@mine.test>\r\n',
    b"From: Dr. Bob Smith <bob@mine.test>\r\n",  # obs-phrase
    b"From: Bob J. Smith <bob@mine.test>\r\n",
    b'From: "Bob \\"The Builder\\" Smith" <bob@mine.test>\r\n',
    b"From: \"O'Brien, Bob\" <bob@mine.test>\r\n",
    b'From: "Bob Smith (Sales)" <bob@mine.test>\r\n',
    b'From: "Bob @ Home" <bob@mine.test>\r\n',
    b'From: "Bob @ Acme Corp." <bob@mine.test>\r\n',
    b"From: Bob (at home) <bob@mine.test>\r\n",
    b"From: =?utf-8?q?Bob_Smith?= <bob@mine.test>\r\n",
    b"From: =?UTF-8?B?Qm9iIFNtaXRo?= <bob@mine.test>\r\n",
    b"From: =?iso-8859-1?q?Bob_M=FCller?= <bob@mine.test>\r\n",
    b"From: =?utf-8?q?J=C3=BCrgen?=\r\n =?utf-8?q?_M=C3=BCller?= <bob@mine.test>\r\n",
    b"From: Bob M\xc3\xbcller <bob@mine.test>\r\n",  # SMTPUTF8 (RFC 6532)
    b'From: "Jos\xc3\xa9 Garc\xc3\xada" <bob@mine.test>\r\n',
    b"From: \xe5\xbc\xa0\xe4\xbc\x9f <bob@mine.test>\r\n",
    b"From: \xd0\x91\xd0\xbe\xd0\xb1 <bob@mine.test>\r\n",
    b'From: "bob@mine.test" <bob@mine.test>\r\n',
    b"From: Bob <bob@mine.test>\r\nSender: bob@mine.test\r\n",
    b"From: Bob <bob@mine.test>\r\nSender: Bob Smith <bob@mine.test>\r\n",
    b'From: "bob" <bob@mine.test>\r\n',
    b'From: "bob"@mine.test\r\n',
    b"From: Team: Bob <bob@mine.test>;\r\n",
    b"From: <bob@mine.test>(Bob)\r\n",
    b"From: Bob Smith (@bobsmith) <bob@mine.test>\r\n",
    b'From: "Pere Gal\xc2\xb7la @ Home" <bob@mine.test>\r\n',  # a middle dot in a name
    b"From: J\xfcrgen M\xfcller <bob@mine.test>\r\n",  # raw Latin-1, not UTF-8
    b"From: =?x-gbk?b?1cXOsA==?= <bob@mine.test>\r\n",  # a GBK name, a label Python lacks
    b"From: =?windows-31j?q?Bob?= <bob@mine.test>\r\n",
    b"From: =?gb2312?b?1cXOsA==?= <bob@mine.test>\r\n",
    b"From: \xd5\xc5\xce\xb0 <bob@mine.test>\r\n",  # raw GBK
    b'From: "\x93\x63\x92\x86" <bob@mine.test>\r\n',  # raw Shift_JIS
    b'From: "Bob (bob@mine.test)" <bob@mine.test>\r\n',
    b'From: "Re: <a:b>" <bob@mine.test>\r\n',  # a colon in a quoted name's brackets
    b"From: =?utf-16?b?AEIAbwBi?= <bob@mine.test>\r\n",  # "Bob", UTF-16 without BOM
    b"From: =?utf-16?b?//5CAG8AYgA=?= <bob@mine.test>\r\n",  # "Bob", little-endian BOM
    # a Hebrew name with a right-to-left mark, one in an isolate
    b'From: "\xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d \xe2\x80\x8f" <bob@mine.test>\r\n',
    b'From: "\xe2\x81\xa7\xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d\xe2\x81\xa9 Bob" <bob@mine.test>\r\n',
]


@pytest.mark.parametrize("head", EVERYDAY)
def test_everyday_from_forms_stay_owned(head: bytes) -> None:
    assert header_verdict(head + b"Subject: x\r\n\r\n", "bob", MINE) == ""
    assert Owner.of("bob", MINE).assess(head + b"\r\n") == ("", "mine.test")


def test_long_from_sender_values_are_not_vouched_for() -> None:
    """The stdlib parsers' time grows with the square of a value's length on comments,
    dots, quoted strings: From:/Sender: values over MAX_FIELDS_CHARS (unfolded, in all)
    are not vouched for, before either parser sees them; up to it, they are read."""
    limit = ownership.MAX_FIELDS_CHARS
    pad = "(x)" * ((limit - len(" bob@mine.test ")) // 3)  # the value: " bob@... (x)..."
    assert limit - 3 < len(" bob@mine.test " + pad) <= limit
    assert header_verdict(f"From: bob@mine.test {pad}\r\n\r\n".encode(), "bob", MINE) == ""
    for head in (f"From: bob@mine.test {pad}(x)\r\n",
                 "From: bob@mine.test" + "\r\n (x)" * 700 + "\r\n",  # folded
                 f"From: bob@mine.test {pad[:1200]}\r\nSender: bob@mine.test {pad[:900]}\r\n",
                 "From: bob@mine.test\r\n" * 200):
        got = header_verdict(head.encode() + b"\r\n", "bob", MINE)
        assert got == f"From:/Sender: longer than {limit} characters", got
