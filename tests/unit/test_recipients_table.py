"""policy/recipients.py and its RCPT verdict: the local recipients list, without sockets
(the server's side, real sockets and SIGHUP: tests/integration/test_local_recipients.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from authrelay import replies
from authrelay.address import Address, parse_mailbox
from authrelay.auth.authenticator import UserDBAuthenticator
from authrelay.auth.realms import RealmLogins
from authrelay.auth.userdb import MemoryUserDB
from authrelay.config import from_dict
from authrelay.policy import recipients as rc
from authrelay.policy import verdicts as v
from authrelay.policy.relay import RelayPolicy

LIST = """\
# the valid recipients of the local domains
known@local.test
Mixed.Case@LOCAL.TEST.   OK
"Quoted"@local.test
@open.test
anna@xn--bcher-kva.example
otto@müller.example
"""
DOMAINS = ["local.test", "open.test", "bücher.example", "xn--mller-kva.example",
           "relay.test", "nolist.test"]


def addr(text: str) -> Address:
    return parse_mailbox(text)


def table(text: str = LIST) -> rc.LocalRecipients:
    return rc.parse(text, "rcpts")


def policy(t: rc.LocalRecipients | None) -> RelayPolicy:
    return RelayPolicy(from_dict({"relay": {"local_domains": DOMAINS}}), t)


@pytest.mark.parametrize("rcpt", [
    "known@local.test", "KNOWN@Local.Test.", "mixed.case@local.test", "quoted@local.test",
    '"known"@local.test', "anyone@open.test", "x@OPEN.test",
    # IDN: the file's A-label reached with the U-label and the other way round
    "anna@bücher.example", "anna@xn--bcher-kva.example", "otto@xn--mller-kva.example",
    "otto@müller.example",
    # RFC 5321 4.5.1: postmaster at every local domain, listed or not
    "postmaster@local.test", "PostMaster@nolist.test"])
def test_known(rcpt: str) -> None:
    assert table().known(addr(rcpt))


@pytest.mark.parametrize("rcpt", [
    "unknown@local.test", "known2@local.test", "anna@local.test", "bob@bücher.example",
    "known@nolist.test", "otto@[127.0.0.1]",
    # KELVIN SIGN lower-cases to 'k': another mailbox to the next hop (SMTPUTF8), which
    # was taken for known@ and relayed on (a stranger's way past the list: backscatter)
    "\u212anown@local.test"])
def test_unknown(rcpt: str) -> None:
    assert not table().known(addr(rcpt))


@pytest.mark.parametrize("line, why", [
    ("not-an-address", "address must include a domain"),
    ("a@b@local.test", "more than one @"),
    ("x@[127.0.0.1]", "address literal"),
    ("@", "bad domain syntax"),
    ("x@boß.test", "maps onto another name"),
    ("x" * 65 + "@local.test", "local part too long"),
])
def test_a_bad_line_is_named(line: str, why: str) -> None:
    with pytest.raises(rc.RecipientsError) as e:
        table(f"# comment\nknown@local.test\n{line}\n")
    assert str(e.value).startswith(f"rcpts: line 3: {line[:20]}") or \
        str(e.value).startswith(f"rcpts: line 3: '{line[:20]}")
    assert why in str(e.value)


def test_entry_and_line_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(rc.RecipientsError, match=r"rcpts: line 1: longer than 1000 octets"):
        table("x" * 1001 + "@local.test\n")
    monkeypatch.setattr(rc, "MAX_ENTRIES", 3)
    table("a@local.test\nb@local.test\n@open.test\n")
    with pytest.raises(rc.RecipientsError, match=r"more than 3 entries"):
        table("a@local.test\nb@local.test\n@open.test\nc@local.test\n")


def _cfg(path: Path, **extra: object) -> object:
    return from_dict({"hostname": "relay.test", **extra,
                      "relay": {"local_domains": DOMAINS,
                                "local_recipients_file": str(path)}})


def test_load_adds_the_aliases_at_hostname(tmp_path: Path) -> None:
    f = tmp_path / "rcpts"
    f.write_text(LIST)
    (tmp_path / "aliases").write_text("webmaster: root\n")
    cfg = from_dict({"hostname": "relay.test", "aliases": {"root": "admin@c.test"},
                     "aliases_file": str(tmp_path / "aliases"),
                     "relay": {"local_domains": DOMAINS, "local_recipients_file": str(f)}})
    t = rc.load(cfg)
    assert t is not None
    for known in ("root@relay.test", "Webmaster@relay.test", "known@local.test"):
        assert t.known(addr(known)), known
    assert not t.known(addr("root@local.test"))  # aliases rewrite at hostname only
    assert not t.known(addr("abuse@relay.test"))
    assert rc.problems(cfg, t) == [
        "local domain nolist.test: no entry in " + str(f)
        + ": every recipient there but postmaster is refused"]
    assert rc.open_domains(cfg, t) == ["open.test"]
    assert rc.open_domains(from_dict({"relay": {"local_domains": ["a.test"]}}), None) \
        == ["a.test"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(rc.RecipientsError,
                       match=rf"^{missing}: cannot read: No such file or directory$"):
        rc.load(from_dict({"relay": {"local_recipients_file": str(missing)}}))
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(rc.MAX_FILE_BYTES + 1)
    with pytest.raises(rc.RecipientsError,
                       match=rf"^{big}: cannot read: larger than {rc.MAX_FILE_BYTES} bytes$"):
        rc.load(from_dict({"relay": {"local_recipients_file": str(big)}}))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never blocks the reader
    with pytest.raises(rc.RecipientsError, match=r"cannot read: not a regular file$"):
        rc.load(from_dict({"relay": {"local_recipients_file": str(fifo)}}))
    latin = tmp_path / "latin"
    latin.write_bytes(b"a@local.test\nj\xf6rg@local.test\n")
    with pytest.raises(rc.RecipientsError, match=rf"^{latin}: line 2: not UTF-8$"):
        rc.load(from_dict({"relay": {"local_recipients_file": str(latin)}}))
    assert rc.load(from_dict({"relay": {"local_domains": ["a.test"]}})) is None


def test_a_byte_order_mark_is_not_part_of_the_first_entry(tmp_path: Path) -> None:
    f = tmp_path / "rcpts"
    f.write_bytes("\ufeffknown@local.test\r\nother@local.test\r\n".encode())
    t = rc.load(from_dict({"relay": {"local_domains": ["local.test"],
                                     "local_recipients_file": str(f)}}))
    assert t is not None
    assert t.known(addr("known@local.test")) and t.known(addr("other@local.test"))


def test_candidates_are_the_spellings_a_user_store_holds() -> None:
    assert rc.candidates(addr("Carol@Bücher.Example")) == (
        "Carol@bücher.example", "carol@xn--bcher-kva.example", "carol@bücher.example")
    assert rc.candidates(addr("x@[127.0.0.1]")) == ()
    db = MemoryUserDB()
    db.add("carol", "pw", ["carol@bücher.example"])
    db.add("Dave@local.test", "pw")
    assert db.owns_address(rc.candidates(addr("CAROL@xn--bcher-kva.example")))
    assert db.owns_address(rc.candidates(addr("Dave@local.test")))
    assert not db.owns_address(rc.candidates(addr("eve@local.test")))


# ------------------------------------------------------------------ the RCPT verdict

def test_verdict_unknown_local_recipient() -> None:
    p = policy(table())
    kw = {"postmaster": False, "authenticated": False, "trusted": False}
    assert not v.needs_owner(p, addr("known@local.test"), **kw)
    assert v.rcpt_verdict(p, addr("known@local.test"), **kw) is None
    unknown = addr("Nobody@local.test")
    assert v.needs_owner(p, unknown, **kw)
    r = v.rcpt_verdict(p, unknown, **kw)
    assert r == replies.unknown_local_recipient("Nobody@local.test")
    assert str(r) == ("550 5.1.1 <Nobody@local.test>: Recipient address rejected: user "
                      "unknown in local recipient table")
    # one of the users' addresses (asked of the user store by the session)
    assert v.rcpt_verdict(p, unknown, **kw, user_owned=True) is None
    # the user store could not be asked: try again later, never a 550
    assert v.rcpt_verdict(p, unknown, **kw, user_owned=None) \
        is replies.RECIPIENT_LOOKUP_TEMPFAIL
    # not local: relaying denied, as before; the list is not asked
    assert v.rcpt_verdict(p, addr("x@remote.test"), **kw) is replies.RELAY_DENIED
    assert not v.needs_owner(p, addr("x@remote.test"), **kw)


@pytest.mark.parametrize("who", [
    {"postmaster": True, "authenticated": False, "trusted": False},
    {"postmaster": False, "authenticated": True, "trusted": False},
    {"postmaster": False, "authenticated": False, "trusted": True}])
def test_verdict_unchanged_for_authenticated_trusted_postmaster(who: dict[str, bool]) -> None:
    p = policy(table())
    for rcpt in ("nobody@local.test", "x@remote.test"):
        assert not v.needs_owner(p, addr(rcpt), **who)
        assert v.rcpt_verdict(p, addr(rcpt), **who) is None


def test_without_a_list_any_local_part_is_accepted() -> None:
    p = policy(None)
    kw = {"postmaster": False, "authenticated": False, "trusted": False}
    assert not v.needs_owner(p, addr("nobody@local.test"), **kw)
    assert v.rcpt_verdict(p, addr("nobody@local.test"), **kw) is None


def test_owns_address_through_the_authenticators() -> None:
    """The user store is asked with candidates(): an address stored with the domain as the
    admin typed it (U-label here) matches an A-label RCPT; with [auth] realms, a user
    stored by its bare name owns NAME@REALM."""
    db = MemoryUserDB()
    db.add("alice", "pw", ["al@bücher.example"])
    auth = UserDBAuthenticator(db, hash_threads=1)
    realms = RealmLogins(auth, ("local.test",))

    async def go() -> None:
        assert await auth.owns_address(rc.candidates(addr("AL@xn--bcher-kva.example")))
        assert not await auth.owns_address(rc.candidates(addr("alice@local.test")))
        assert await realms.owns_address(rc.candidates(addr("Alice@Local.test")))
        assert not await realms.owns_address(rc.candidates(addr("bob@local.test")))
        assert not await realms.owns_address(rc.candidates(addr("alice@other.test")))

    try:
        asyncio.run(go())
    finally:
        auth.close()
