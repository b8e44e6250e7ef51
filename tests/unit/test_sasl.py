"""SASL PLAIN (RFC 4616) and LOGIN exchanges as SMTP AUTH drives them (RFC 4954)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authrelay.auth import passwords
from authrelay.auth.sasl import HIDDEN, SaslError, SaslExchange


def b64(raw: bytes | str) -> str:
    if isinstance(raw, str):
        raw = raw.encode()
    return base64.b64encode(raw).decode()


def err(exc: pytest.ExceptionInfo[SaslError]) -> tuple[int, str]:
    return exc.value.code, exc.value.enhanced


# ----------------------------------------------------------------------------- PLAIN

def test_plain_initial_response() -> None:
    ex = SaslExchange("PLAIN", b64("\0alice\0s3cret"))
    assert ex.done and ex.challenge is None
    assert (ex.authzid, ex.username, ex.password) == ("", "alice", "s3cret")


def test_plain_mechanism_name_is_case_insensitive() -> None:
    assert SaslExchange("plain", b64("\0a\0b")).done


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    ex = SaslExchange("PLAIN", None)
    assert ex.challenge == b"" and not ex.done
    ex.feed(b64("\0alice\0pw"))
    assert ex.done and ex.challenge is None
    assert (ex.username, ex.password) == ("alice", "pw")


def test_plain_authzid_equal_to_user_is_accepted() -> None:
    ex = SaslExchange("PLAIN", b64("alice\0alice\0pw"))
    assert ex.done and ex.authzid == "alice"


def test_plain_authzid_other_user_is_refused() -> None:
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", b64("root\0alice\0pw"))
    assert err(e) == (535, "5.7.8")
    assert e.value.text == "Authentication credentials invalid"


def test_plain_utf8_credentials() -> None:
    ex = SaslExchange("PLAIN", b64("\0jürgen\0pässwörd€".encode()))
    assert (ex.username, ex.password) == ("jürgen", "pässwörd€")


def test_plain_password_may_contain_spaces_and_tabs() -> None:
    ex = SaslExchange("PLAIN", b64("\0alice\0a b\tc"))
    assert ex.password == "a b\tc"


def test_empty_initial_response_equals_sign() -> None:
    # RFC 4954 4: "=" is a zero-length initial response; for PLAIN that is malformed.
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", "=")
    assert err(e) == (501, "5.5.2")


@pytest.mark.parametrize("payload", [
    b"alice\0pw",                 # two parts
    b"\0alice\0pw\0",             # four parts
    b"\0ali\0ce\0pw",             # NUL inside the user name
    b"\0\0pw",                    # empty user
    b"\0alice\0",                 # empty password (RFC 4616: 1*SAFE)
    b"",                          # nothing
    b"\0al\nice\0pw",             # control character in the user name
    b"\0" + b"a" * 256 + b"\0pw",  # user name over 255 octets
])
def test_plain_malformed(payload: bytes) -> None:
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", b64(payload))
    assert err(e) == (501, "5.5.2")


def test_plain_malformed_in_continuation() -> None:
    ex = SaslExchange("PLAIN", None)
    with pytest.raises(SaslError) as e:
        ex.feed(b64("nonuls"))
    assert err(e) == (501, "5.5.2")


def test_plain_invalid_utf8() -> None:
    # A user name must be UTF-8 ...
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", b64(b"\0al\xffice\0pw"))
    assert err(e) == (501, "5.5.2") and e.value.reason == "user name is not UTF-8"
    # ... a password is octets: a legacy Latin-1 one is kept byte for byte.
    ex = SaslExchange("PLAIN", b64(b"\0alice\0caf\xe9\xc3("))
    assert ex.done and passwords.raw(ex.password) == b"caf\xe9\xc3("


def test_login_latin1_password_kept_as_bytes() -> None:
    ex = SaslExchange("LOGIN", None)
    ex.feed(b64(b"alice"))
    ex.feed(b64(b"m\xfcller"))
    assert ex.done and passwords.raw(ex.password) == b"m\xfcller"
    # Hashing and verifying use the raw bytes: the Latin-1 password verifies, its UTF-8
    # spelling (other bytes) does not.
    h = passwords.hash_password(ex.password)
    assert passwords.verify_password(h, b"m\xfcller")
    assert not passwords.verify_password(h, "müller")


@pytest.mark.parametrize("bad", ["not base64!", "AGFsaWNlAHB", "a", "====", "YWxp\x00Y2U="])
def test_bad_base64(bad: str) -> None:
    # "AGFsaWNlAHB" is valid alphabet but lacks padding: strict decoding refuses it.
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", bad)
    assert err(e) == (501, "5.5.2")
    assert e.value.text == "Cannot decode response"


def test_non_ascii_line_is_undecodable() -> None:
    ex = SaslExchange("PLAIN", None)
    with pytest.raises(SaslError) as e:
        ex.feed("AGFsaWNlAHB3ü=")
    assert err(e) == (501, "5.5.2")


def test_cancel_plain() -> None:
    ex = SaslExchange("PLAIN", None)
    with pytest.raises(SaslError) as e:
        ex.feed("*")
    assert err(e) == (501, "5.0.0")
    assert e.value.text == "Authentication cancelled"
    assert not ex.done


def test_cancel_as_initial_response() -> None:
    with pytest.raises(SaslError) as e:
        SaslExchange("LOGIN", "*")
    assert err(e) == (501, "5.0.0")


def test_unknown_mechanism() -> None:
    for mech in ("CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2", ""):
        with pytest.raises(SaslError) as e:
            SaslExchange(mech, None)
        assert err(e) == (504, "5.5.4")
        assert e.value.text == "Unrecognized authentication type"


def test_error_reply_wire_form() -> None:
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", "!!")
    assert e.value.reply.lines() == b"501 5.5.2 Cannot decode response\r\n"


def test_error_never_echoes_the_payload() -> None:
    with pytest.raises(SaslError) as e:
        SaslExchange("PLAIN", b64("root\0alice\0hunter2"))
    assert "hunter2" not in str(e.value)
    ex = SaslExchange("PLAIN", b64("\0alice\0hunter2"))
    assert "hunter2" not in repr(ex)


def test_feed_after_done_is_a_bug() -> None:
    ex = SaslExchange("PLAIN", b64("\0a\0b"))
    with pytest.raises(RuntimeError):
        ex.feed(b64("\0a\0b"))


# ----------------------------------------------------------------------------- LOGIN

def test_login_two_challenges() -> None:
    ex = SaslExchange("LOGIN", None)
    assert ex.challenge == b"Username:"
    ex.feed(b64("alice"))
    assert ex.challenge == b"Password:" and not ex.done
    ex.feed(b64("s3cret"))
    assert ex.done and ex.challenge is None
    assert (ex.authzid, ex.username, ex.password) == ("", "alice", "s3cret")


def test_login_initial_response_is_the_username() -> None:
    ex = SaslExchange("LOGIN", b64("alice@example.org"))
    assert ex.challenge == b"Password:"
    ex.feed(b64("pw"))
    assert ex.done and ex.username == "alice@example.org"


def test_login_cancel_at_password() -> None:
    ex = SaslExchange("LOGIN", None)
    ex.feed(b64("alice"))
    with pytest.raises(SaslError) as e:
        ex.feed("*")
    assert err(e) == (501, "5.0.0")


@pytest.mark.parametrize("user", [b"", b"a\0b", b"\xff\xfe", b"a\r\nMAIL FROM:<x>"])
def test_login_bad_username(user: bytes) -> None:
    ex = SaslExchange("LOGIN", None)
    with pytest.raises(SaslError) as e:
        ex.feed(b64(user) if user else "=")
    assert err(e) == (501, "5.5.2")


def test_login_empty_initial_response() -> None:
    with pytest.raises(SaslError) as e:
        SaslExchange("LOGIN", "=")
    assert err(e) == (501, "5.5.2")


@pytest.mark.parametrize("pw", [b"", b"a\0b"])  # b"\xc3" is a valid (Latin-1) password now
def test_login_bad_password(pw: bytes) -> None:
    ex = SaslExchange("LOGIN", None)
    ex.feed(b64("alice"))
    with pytest.raises(SaslError) as e:
        ex.feed(b64(pw) if pw else "")
    assert err(e) == (501, "5.5.2")


def test_login_bad_base64() -> None:
    ex = SaslExchange("LOGIN", None)
    with pytest.raises(SaslError) as e:
        ex.feed("%%%")
    assert err(e) == (501, "5.5.2")


# ----------------------------------------------------------------------------- properties

_names = st.text(  # names a user can have: no control or invisible characters
    alphabet=st.characters(blacklist_categories=tuple(HIDDEN)), min_size=1, max_size=60)
_pw = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
              min_size=1, max_size=80)


@given(_names, _pw)
def test_plain_round_trip(user: str, pw: str) -> None:
    ex = SaslExchange("PLAIN", b64(f"\0{user}\0{pw}".encode()))
    assert (ex.username, ex.password) == (user, pw)


@given(_names, _pw)
def test_login_round_trip(user: str, pw: str) -> None:
    ex = SaslExchange("LOGIN", None)
    ex.feed(b64(user.encode()))
    ex.feed(b64(pw.encode()))
    assert (ex.username, ex.password) == (user, pw)


@given(st.binary(max_size=300))
def test_plain_any_bytes_either_parse_or_sasl_error(raw: bytes) -> None:
    try:
        ex = SaslExchange("PLAIN", b64(raw) if raw else "=")
    except SaslError as e:
        assert e.code in (501, 535)
    else:
        assert ex.done and ex.username and ex.password


@pytest.mark.slow
@given(st.text(max_size=50))
def test_any_line_either_parses_or_sasl_error(line: str) -> None:
    ex = SaslExchange("LOGIN", None)
    try:
        ex.feed(line)
    except SaslError as e:
        assert (e.code, e.enhanced) in ((501, "5.5.2"), (501, "5.0.0"))
