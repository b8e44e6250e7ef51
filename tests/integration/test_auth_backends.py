"""saslauthd and Dovecot auth backends against the real daemons, on private sockets.

saslauthd's sasldb mechanism always reads /etc/sasldb2 (its path is compiled in), so the
test runs saslauthd in a private mount namespace where a test-made sasldb is bind-mounted
over /etc/sasldb2: the host's file is never touched. Dovecot runs with a private config
(base_dir in a temp dir, passwd-file passdb, no protocols) exposing only auth-client.

Also: a backend that is down, never answers, or answers garbage gives BackendUnavailable
(TEMPFAIL from the Authenticator) within the timeout, never a hang or a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from support import ci, daemons

from authrelay.auth.authenticator import AuthResult, make_authenticator
from authrelay.auth.backends import BackendUnavailable, DovecotBackend, SaslauthdBackend
from authrelay.config import from_dict

pytestmark = [pytest.mark.external, pytest.mark.slow]

USERS = {  # name -> password; "user@realm" is stored in sasldb under that realm
    "alice": "s3cret",
    "bob@example.org": "pässwörd with spaces",
}
# A legacy password that is not UTF-8 (Latin-1 "café"): the backends get its exact bytes.
LATIN1_USER, LATIN1_PW = "carol", b"caf\xe9"


# ----------------------------------------------------------------------------- saslauthd

@pytest.fixture(scope="module")
def saslauthd() -> Iterator[Path]:
    # Missing parts fail under CI (test.sh installs sasl2-bin and CI runs as root), skip
    # elsewhere: never a silent pass.
    for tool, package in (("saslauthd", "sasl2-bin"), ("saslpasswd2", "sasl2-bin"),
                          ("unshare", "util-linux")):
        ci.require_tool(tool, package)
    ci.require_root("saslauthd test needs root for its private mount namespace")
    ci.require(Path("/etc/sasldb2").exists(),
               "/etc/sasldb2 missing: nothing to bind-mount the test sasldb over "
               "(sasl2-bin creates it)")
    tmp = Path(tempfile.mkdtemp(prefix="ar-sasl-"))
    db = tmp / "sasldb2"
    for user, pw in USERS.items():
        name, _, realm = user.rpartition("@")
        args = ["saslpasswd2", "-f", str(db), "-p", "-c"]
        args += ["-u", realm, name] if name else [user]
        subprocess.run(args, input=pw.encode(), check=True, timeout=30)
    subprocess.run(["saslpasswd2", "-f", str(db), "-p", "-c", LATIN1_USER], input=LATIN1_PW,
                   check=True, timeout=30)
    mux = tmp / "mux"
    mux.mkdir()
    log = tmp / "saslauthd.log"
    script = (f"mount --bind {db} /etc/sasldb2 && "
              f"exec saslauthd -a sasldb -m {mux} -n 1 -d")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 script], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        daemons.wait_accepting(mux / "mux", proc, log, "saslauthd", timeout=20)
        yield mux / "mux"
    finally:
        daemons.stop(proc, group=True, grace=10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.root
async def test_saslauthd_accepts_and_rejects(saslauthd: Path) -> None:
    be = SaslauthdBackend(str(saslauthd), timeout=10)
    assert await be.check("alice", "s3cret") is True
    assert await be.check("alice", "S3cret") is False
    assert await be.check("nobody", "s3cret") is False
    # user@realm: sent as login + realm, like the Cyrus library does.
    assert await be.check("bob@example.org", "pässwörd with spaces") is True
    assert await be.check("bob@example.net", "pässwörd with spaces") is False


@pytest.mark.root
@pytest.mark.parametrize("cls", ["saslauthd", "dovecot"])
async def test_latin1_password_passes_through_as_bytes(cls: str, request) -> None:
    """A non-UTF-8 password, as the SASL layer hands it on (a str with surrogate escapes,
    or bytes), reaches the backend byte for byte; its UTF-8 spelling is another password."""
    sock = request.getfixturevalue(cls)
    be = (SaslauthdBackend if cls == "saslauthd" else DovecotBackend)(str(sock), timeout=10)
    assert await be.check(LATIN1_USER, LATIN1_PW) is True
    assert await be.check(LATIN1_USER, LATIN1_PW.decode("utf-8", "surrogateescape")) is True
    assert await be.check(LATIN1_USER, "café") is False
    auth = make_authenticator(from_dict({"auth": {"backend": f"{cls}:{sock}"}}))
    try:
        assert await auth.verify(LATIN1_USER, LATIN1_PW.decode("utf-8", "surrogateescape")) \
            is AuthResult.OK
    finally:
        auth.close()


@pytest.mark.root
async def test_saslauthd_a_login_ending_in_an_at_sign_is_not_the_bare_user(
        saslauthd: Path) -> None:
    """`alice@` went to saslauthd as login alice with an empty realm, which sasldb reads
    as its default realm: it logged in as alice, yet counted here as an account of its
    own (`alice@`: its own AUTH lockout budget and containment counts), so a suspended
    alice sent on as `alice@`. An empty realm is no realm: the name goes whole."""
    be = SaslauthdBackend(str(saslauthd), timeout=10)
    assert await be.check("alice", USERS["alice"]) is True
    assert await be.check("alice@", USERS["alice"]) is False
    assert await be.check("bob@example.org", USERS["bob@example.org"]) is True


@pytest.mark.root
async def test_saslauthd_concurrent_checks(saslauthd: Path) -> None:
    be = SaslauthdBackend(str(saslauthd), timeout=20)
    results = await asyncio.gather(*(be.check("alice", "s3cret" if i % 2 else "no")
                                     for i in range(8)))
    assert results == [bool(i % 2) for i in range(8)]


@pytest.mark.root
async def test_saslauthd_via_authenticator(saslauthd: Path) -> None:
    auth = make_authenticator(from_dict({"auth": {"backend": f"saslauthd:{saslauthd}"}}))
    try:
        assert await auth.verify("alice", "s3cret") is AuthResult.OK
        assert await auth.verify("alice", "wrong") is AuthResult.BAD
        assert auth.addresses("bob@example.org") == {"bob@example.org"}
    finally:
        auth.close()


# ----------------------------------------------------------------------------- Dovecot

DOVECOT_CONF = """\
base_dir = {tmp}/run
state_dir = {tmp}/state
log_path = {tmp}/dovecot.log
instance_name = authrelay-test-{pid}
protocols =
ssl = no
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {tmp}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  {auth_user}
  unix_listener auth-client {{
    mode = 0600
  }}
}}
{extra}
"""


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Path]:
    yield from _dovecot("")


@pytest.fixture(scope="module")
def dovecot_local_part() -> Iterator[Path]:
    """A Dovecot that logs users in by the local part of the name given (a common
    virtual-user setup): `alice@anything` is alice."""
    yield from _dovecot("auth_username_format = %Ln\n")


@pytest.fixture(scope="module")
def dovecot_failure_delay() -> Iterator[Path]:
    """A Dovecot answering each failed login after its default auth_failure_delay (2 s;
    a right password at once)."""
    yield from _dovecot("auth_failure_delay = 2 secs\n")


def _dovecot(settings: str) -> Iterator[Path]:
    binary = ci.require_tool("dovecot", "dovecot-core")  # fails under CI, skips elsewhere
    tmp = Path(tempfile.mkdtemp(prefix="ar-dc-"))
    (tmp / "run").mkdir()
    (tmp / "state").mkdir()
    (tmp / "passwd").write_bytes("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items())
                                 .encode() + f"{LATIN1_USER}:{{PLAIN}}".encode() + LATIN1_PW
                                 + b"\n")
    if os.geteuid() == 0:
        auth_user, extra = "user = root", ""
    else:  # unprivileged: every Dovecot process runs as us
        import getpass

        me = getpass.getuser()
        auth_user = ""
        extra = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
    conf = tmp / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(tmp=tmp, pid=os.getpid(), auth_user=auth_user,
                                        extra=extra + settings))
    log = tmp / "stdout.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        sock = tmp / "run" / "auth-client"
        daemons.wait_accepting(sock, proc, log, "dovecot", timeout=20)
        yield sock
    finally:
        daemons.stop(proc, group=True, grace=10)
        shutil.rmtree(tmp, ignore_errors=True)


async def test_dovecot_accepts_and_rejects(dovecot: Path) -> None:
    be = DovecotBackend(str(dovecot), timeout=10)
    # disable_plaintext_auth = yes: accepted only because we say the session is secured.
    assert await be.check("alice", "s3cret") is True
    assert await be.check("alice", "wrong") is False
    assert await be.check("nobody", "s3cret") is False
    assert await be.check("bob@example.org", "pässwörd with spaces") is True


async def test_dovecot_user_with_tab_cannot_inject_fields(dovecot: Path) -> None:
    # The credentials travel base64-encoded: a tab in them is data, not a field separator.
    be = DovecotBackend(str(dovecot), timeout=10)
    assert await be.check("alice\tuser=bob@example.org", "s3cret") is False


async def test_dovecot_concurrent_checks(dovecot: Path) -> None:
    be = DovecotBackend(str(dovecot), timeout=20)
    results = await asyncio.gather(*(be.check("alice", "s3cret" if i % 2 else "no")
                                     for i in range(10)))
    assert results == [bool(i % 2) for i in range(10)]


async def test_dovecot_via_authenticator(dovecot: Path) -> None:
    auth = make_authenticator(from_dict({"auth": {"backend": f"dovecot:{dovecot}"}}))
    try:
        assert await auth.verify("bob@example.org", "pässwörd with spaces") is AuthResult.OK
        assert await auth.verify("bob@example.org", "pässwörd") is AuthResult.BAD
        assert auth.addresses("alice") == set()
    finally:
        auth.close()


# ----------------------------------------------------------------------------- down / garbled

BACKENDS = [SaslauthdBackend, DovecotBackend]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ar-be-"))  # short: unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(handler, path=str(path))


async def _expect_unavailable(be: SaslauthdBackend | DovecotBackend) -> None:
    # The outer guard only keeps a broken implementation from hanging the suite.
    async with asyncio.timeout(30):
        with pytest.raises(BackendUnavailable):
            await be.check("alice", "s3cret")


@pytest.mark.parametrize("cls", BACKENDS)
async def test_missing_socket(cls, sockdir: Path) -> None:
    await _expect_unavailable(cls(str(sockdir / "does-not-exist"), timeout=1))


@pytest.mark.parametrize("cls", BACKENDS)
async def test_not_a_socket(cls, sockdir: Path) -> None:
    (sockdir / "file").write_text("x")
    await _expect_unavailable(cls(str(sockdir / "file"), timeout=1))


@pytest.mark.parametrize("cls", BACKENDS)
async def test_socket_that_never_answers(cls, sockdir: Path) -> None:
    held: list[asyncio.StreamWriter] = []
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await release.wait()  # accept, read nothing, answer nothing
        writer.close()

    srv = await _serve(sockdir / "s", silent)
    try:
        await _expect_unavailable(cls(str(sockdir / "s"), timeout=0.3))
        assert held  # it really connected and then timed out
    finally:
        release.set()
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize("cls", BACKENDS)
async def test_socket_that_closes_at_once(cls, sockdir: Path) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    srv = await _serve(sockdir / "s", rude)
    try:
        await _expect_unavailable(cls(str(sockdir / "s"), timeout=5))
    finally:
        srv.close()
        await srv.wait_closed()


def _saslauthd_answer(answer: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(4):  # login, password, service, realm
            n = int.from_bytes(await reader.readexactly(2), "big")
            await reader.readexactly(n)
        writer.write(answer)
        await writer.drain()
        writer.close()
    return handler


@pytest.mark.root
@pytest.mark.parametrize("answer", [
    b"\x00\x05MAYBE",          # neither OK nor NO
    b"\x00\x10OK",             # length longer than what follows
    b"\x00",                   # half a length
])
async def test_saslauthd_garbled(answer: bytes, sockdir: Path) -> None:
    srv = await _serve(sockdir / "s", _saslauthd_answer(answer))
    try:
        await _expect_unavailable(SaslauthdBackend(str(sockdir / "s"), timeout=5))
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.root
async def test_saslauthd_wire_format(sockdir: Path) -> None:
    seen: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fields = []
        for _ in range(4):
            n = int.from_bytes(await reader.readexactly(2), "big")
            fields.append(await reader.readexactly(n))
        seen.append(fields)
        writer.write(b"\x00\x02NO")
        await writer.drain()
        writer.close()

    srv = await _serve(sockdir / "s", handler)
    try:
        be = SaslauthdBackend(str(sockdir / "s"), timeout=5)
        assert await be.check("bob@example.org", "pw") is False
        assert await be.check("alice", "p\u00e4") is False
    finally:
        srv.close()
        await srv.wait_closed()
    assert seen == [[b"bob", b"pw", b"smtp", b"example.org"],
                    [b"alice", "p\u00e4".encode(), b"smtp", b""]]


_DOVECOT_HELLO = (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\n"
                  b"COOKIE\t00\nDONE\n")


def _dovecot_answer(hello: bytes, answer: bytes | None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(hello)
        await reader.readuntil(b"\n")  # VERSION
        await reader.readuntil(b"\n")  # CPID
        if answer is not None:
            line = await reader.readuntil(b"\n")
            req_id = line.split(b"\t")[1]
            writer.write(answer.replace(b"{id}", req_id))
        await writer.drain()
        writer.close()
    return handler


@pytest.mark.parametrize("hello,answer", [
    (b"HELLO\n", None),                                           # not Dovecot
    (b"VERSION\t2\t0\n" + _DOVECOT_HELLO[13:], None),             # other major version
    (_DOVECOT_HELLO.replace(b"MECH\tPLAIN", b"MECH\tCRAM-MD5"), None),  # PLAIN disabled
    (_DOVECOT_HELLO, b"FAIL\t{id}\tuser=alice\ttemp\n"),          # temporary failure
    (_DOVECOT_HELLO, b"FAIL\t{id}\tcode=temp_fail\n"),
    (_DOVECOT_HELLO, b"CONT\t{id}\t\n"),                          # PLAIN needs one step
    (_DOVECOT_HELLO, b"WHAT\t{id}\n"),
    (_DOVECOT_HELLO, b"OK\t{id}" + b"x" * 70000 + b"\n"),         # oversized line
    (_DOVECOT_HELLO, b"OK\t{id}\xff\xfe\n"),                      # not UTF-8
    (_DOVECOT_HELLO, b""),                                        # closes before answering
])
async def test_dovecot_garbled(hello: bytes, answer: bytes | None, sockdir: Path) -> None:
    srv = await _serve(sockdir / "s", _dovecot_answer(hello, answer))
    try:
        await _expect_unavailable(DovecotBackend(str(sockdir / "s"), timeout=5))
    finally:
        srv.close()
        await srv.wait_closed()


async def test_dovecot_answer_for_our_id_only(sockdir: Path) -> None:
    # A line for another request id is skipped; ours decides.
    srv = await _serve(sockdir / "s", _dovecot_answer(
        _DOVECOT_HELLO, b"OK\t999999\tuser=x\nFAIL\t{id}\tuser=alice\n"))
    try:
        assert await DovecotBackend(str(sockdir / "s"), timeout=5).check("alice", "x") is False
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize("kind", ["saslauthd", "dovecot"])
async def test_authenticator_tempfails_when_backend_down(kind: str, sockdir: Path) -> None:
    cfg = from_dict({"auth": {"backend": f"{kind}:{sockdir / 'gone'}",
                              "backend_timeout": "1s"}})
    auth = make_authenticator(cfg)
    try:
        assert await auth.verify("alice", "s3cret") is AuthResult.TEMPFAIL
    finally:
        auth.close()


def test_dovecot_spellings_are_one_account(dovecot: Path, tmp_path: Path) -> None:
    """Dovecot lower-cases login names (auth_username_format %Lu), so `alice`, `ALICE`
    and `Alice` log in to one account; the relay counts, suspends and queues by the user
    Dovecot names (`user=` in its OK), so a suspended alice cannot send on as `Alice`."""
    from smtpclient import RawClient, client_ctx, plain

    r = RelayProcess(tmp_path, {"auth": {"backend": f"dovecot:{dovecot}"},
                                "limits": {"containment": {"notify": "admin@local.test",
                                                           "messages": 2}}},
                     users={}).start()

    def send(user: str) -> list[int]:
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd(f"AUTH PLAIN {plain(user, USERS['alice'])}").code == 235
            codes = [c.cmd("MAIL FROM:<alice@example.org>").code]
            if codes[0] == 250:
                codes.append(c.cmd("RCPT TO:<bob@example.net>").code)
                assert c.cmd("DATA").code == 354
                c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
                codes.append(c.reply().code)
            return codes

    try:
        assert send("alice") == [250, 250, 250]
        assert send("ALICE") == [250, 250, 250]
        line = r.wait_log(r"warning=user suspended")
        assert "sasl_username=alice, threshold=messages, count=2" in line
        assert send("Alice") == [450]
        assert "alice resumed" in r.cli("user", "resume", "alice").stdout
    finally:
        r.stop()


def test_a_dovecot_login_owns_only_the_account_dovecot_named(dovecot_local_part: Path,
                                                             tmp_path: Path) -> None:
    """Dovecot with `auth_username_format = %Ln` lets `alice@bank.test` in as alice: the
    login's domain is never checked. Under `sender_policy = "own"` that login owned
    alice@bank.test (a user named like an address owns it), so alice sent as
    alice@anything, envelope and From:. Ownership now goes by the account Dovecot named."""
    r = RelayProcess(tmp_path, {"auth": {"backend": f"dovecot:{dovecot_local_part}",
                                         "sender_policy": "own"}}, users={}).start()
    port = r.ports["submissions"]
    try:
        assert _send_one(port, "alice@bank.test", USERS["alice"], "alice@bank.test") == 553
        assert _send_one(port, "ALICE@BANK.TEST", USERS["alice"], "alice@bank.test") == 553
        line = r.wait_log(r"reject=553 5\.7\.1 <alice@bank\.test>")
        assert "sasl_username=alice@bank.test" in line
        # From: is judged by the same owner: the null sender gets past MAIL, not DATA.
        assert _send_one(port, "alice@bank.test", USERS["alice"], "") == 550
        assert "reason=From: <alice@bank.test> not owned by alice" in r.maillog()
        assert "Traceback" not in r.log.read_text()
    finally:
        r.stop()


def _send_one(port: int, login: str, password: str, sender: str) -> int:
    """One message over 465 as `login`: the reply to MAIL if refused, else to the dot."""
    from smtpclient import RawClient, client_ctx, plain

    with RawClient(port, tls=client_ctx()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd(f"AUTH PLAIN {plain(login, password)}").code == 235
        code = c.cmd(f"MAIL FROM:<{sender}>").code
        if code == 250:
            assert c.cmd("RCPT TO:<carol@example.net>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(f"From: <{sender or login}>\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"
                   .encode())
            code = c.reply().code
        return code


def _lockout_relay(tmp_path: Path, backend: str) -> RelayProcess:
    """A relay on `backend` whose per-user AUTH lockout comes at 3 failures, long before
    the per-address one or the per-connection limit."""
    return RelayProcess(tmp_path, {"auth": {"backend": backend, "max_failures_per_user": 3,
                                            "max_failures_per_ip": 100, "failure_delay": 0},
                                   "limits": {"max_auth_failures": 10,
                                              "connection_rate_per_ip": 0}},
                        users={}).start()


def _login(r: RelayProcess, user: str, password: str, source: str) -> tuple[int, str]:
    """AUTH PLAIN over 465 from the loopback address `source`: (code, enhanced code)."""
    from smtpclient import RawClient, client_ctx, plain

    with RawClient(r.ports["submissions"], tls=client_ctx(), source=source) as c:
        c.reply()
        c.cmd("EHLO client.test")
        rep = c.cmd(f"AUTH PLAIN {plain(user, password)}")
        return rep.code, rep.text[:5]


@pytest.mark.root
@pytest.mark.parametrize("cls", ["saslauthd", "dovecot"])
def test_backend_spellings_share_one_lockout(cls: str, request, tmp_path: Path) -> None:
    """saslauthd and Dovecot decide name matching themselves (Dovecot lower-cases by
    default; PAM with Active Directory ignores case), so a guesser must not get a lockout
    budget per spelling: failures as `alice`, `ALICE` and `Alice` count for one account,
    and past `max_failures_per_user` AUTH for alice from an address she never logged in
    from is refused unchecked, whatever the spelling."""
    r = _lockout_relay(tmp_path, f"{cls}:{request.getfixturevalue(cls)}")

    def auth(user: str, password: str, source: str) -> tuple[int, str]:
        return _login(r, user, password, source)

    try:
        for spelling in ("alice", "ALICE", "Alice"):
            assert auth(spelling, "wrong", "127.0.1.7")[0] == 535, spelling
        assert auth("alice", USERS["alice"], "127.0.2.8") == (454, "4.7.0")
        assert auth("aLiCe", USERS["alice"], "127.0.2.9") == (454, "4.7.0")
    finally:
        r.stop()


def _nat_lockout_relay(tmp_path: Path, backend: str, **auth: object) -> RelayProcess:
    """serve on `backend` whose lockout locks an address at its first wrong guess and
    a user's network at its second (`auth`: more [auth] keys)."""
    return RelayProcess(tmp_path, {"auth": {"backend": backend,
                                            "max_failures_per_ip": 1,
                                            "max_failures_per_user": 2,
                                            "failure_delay": 0.05, **auth},
                                   "limits": {"max_auth_failures": 10,
                                              "connection_rate_per_ip": 0}},
                        users={}).start()


def test_a_known_networks_checks_answered_late_still_count(dovecot_failure_delay: Path,
                                                           tmp_path: Path) -> None:
    """Past the NAT's lockout alice is still checked there (Lockout.SPARED), but a check
    not done by the lockout's answer was counted nowhere; Dovecot answers every wrong
    password 2 s late (its auth_failure_delay) and a right one at once, so each guess of
    alice's password there was late, uncounted and answered 454, and the right one got
    235: guessing without end. Now a late check's wrong answer, once in, counts as a guess
    of her network: past max_failures_per_user of them even her right password is
    refused there (454)."""
    nat = "127.0.0.50"
    r = _nat_lockout_relay(tmp_path, f"dovecot:{dovecot_failure_delay}")
    try:
        assert _login(r, "alice", USERS["alice"], nat)[0] == 235  # known there
        assert _login(r, "nosuchuser", "wrong", nat)[0] == 535  # the NAT is locked
        assert _login(r, LATIN1_USER, "wrong", nat) == (454, "4.7.0")  # unchecked
        for i in range(3):
            assert _login(r, "alice", f"wrong{i}", nat) == (454, "4.7.0")
        # each counted (then logged) once Dovecot's late answer is in
        r.wait_for(lambda: r.maillog().count("sasl_username=alice, reason=known network "
                                             "past the lockout") == 3,
                   what="the three late wrong answers counted")
        assert "check not done in time" not in r.maillog()
        assert _login(r, "alice", USERS["alice"], nat) == (454, "4.7.0")
        r.wait_log(r"reject=454 4\.7\.0 Too many authentication failures, try again "
                   r"later, relay=unknown \[127\.0\.0\.50\], sasl_method=PLAIN, "
                   r"sasl_username=alice$")
        assert _login(r, "alice", USERS["alice"], "127.0.1.9")[0] == 235  # elsewhere
    finally:
        r.stop()


def test_dovecot_exempt_and_resume_name_the_account(dovecot: Path, tmp_path: Path) -> None:
    """What an admin types for a Dovecot user (`[limits.containment] exempt`, `user
    resume`) names the account as the session counts it, in any spelling."""
    def relay(exempt: list[str], where: Path) -> RelayProcess:
        return RelayProcess(where, {"auth": {"backend": f"dovecot:{dovecot}"},
                                    "limits": {"containment": {
                                        "notify": "admin@local.test", "messages": 2,
                                        "exempt": exempt}}}, users={}).start()

    def send(r: RelayProcess, user: str = "alice") -> int:
        sender = user if "@" in user else f"{user}@example.org"
        return _send_one(r.ports["submissions"], user, USERS[user], sender)

    (tmp_path / "a").mkdir()
    r = relay(["Alice"], tmp_path / "a")
    try:
        assert [send(r) for _ in range(2)] == [250, 250]
        assert [send(r, "bob@example.org") for _ in range(2)] == [250, 250]
        r.wait_log(r"warning=user suspended.*sasl_username=bob@example.org")
        assert "sasl_username=alice, threshold" not in r.maillog()  # exempt
        assert send(r) == 250
    finally:
        r.stop()
    (tmp_path / "b").mkdir()
    r = relay([], tmp_path / "b")
    try:
        assert [send(r) for _ in range(2)] == [250, 250]
        r.wait_log(r"warning=user suspended.*sasl_username=alice, threshold")
        assert send(r) == 450
        assert "ALICE resumed" in r.cli("user", "resume", "ALICE").stdout
        assert send(r) == 250
    finally:
        r.stop()


# A saslauthd as PAM with sssd / Active Directory answers it: login names in any case.
# (sasldb, which the real saslauthd above uses, compares them exactly.) Same wire
# protocol: four counted strings in, one counted "OK ..."/"NO ..." out.
CASELESS_SASLAUTHD = r"""
import os, socket, struct, sys, time
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1]); srv.listen(16)
hold = sys.argv[3] if len(sys.argv) > 3 else ""  # answers wait while this file exists
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    while hold and os.path.exists(hold):
        time.sleep(0.01)
    try:
        with c, c.makefile("rb") as f:
            def counted():
                return f.read(struct.unpack(">H", f.read(2))[0])
            login, password, _service, _realm = counted(), counted(), counted(), counted()
            ok = login.lower() == b"alice" and password == sys.argv[2].encode()
            answer = b"OK" if ok else b"NO authentication failed"
            c.sendall(struct.pack(">H", len(answer)) + answer)
    except (OSError, struct.error):
        continue  # the client gave up waiting
"""


def test_saslauthd_caseless_spellings_are_one_account(sockdir: Path, tmp_path: Path) -> None:
    """saslauthd names no account; behind a case-insensitive PAM `alice`, `ALICE` and
    `Alice` are one user, so they are one account here (the lower-case login): a
    suspended alice must not send on as `Alice`, and `user resume ALICE` lifts it."""
    with _caseless_saslauthd(sockdir) as sock:
        r = RelayProcess(tmp_path, {"auth": {"backend": f"saslauthd:{sock}"},
                                    "limits": {"containment": {"notify": "admin@local.test",
                                                               "messages": 2}}},
                         users={}).start()

        def send(user: str) -> int:
            return _send_one(r.ports["submissions"], user, USERS["alice"],
                             "alice@example.org")

        try:
            assert [send("alice"), send("ALICE")] == [250, 250]
            line = r.wait_log(r"warning=user suspended")
            assert "sasl_username=alice, threshold=messages, count=2" in line
            assert send("Alice") == 450
            assert "ALICE resumed" in r.cli("user", "resume", "ALICE").stdout
            assert send("aLICE") == 250
        finally:
            r.stop()


def test_a_known_users_checks_made_late_by_a_backlog_do_not_lock_her_out(
        sockdir: Path, tmp_path: Path) -> None:
    """Past the NAT's lockout alice is still checked there (Lockout.SPARED) if the check is
    done by the lockout's answer; one not done was counted as a wrong guess of her
    network whatever its outcome, so a client elsewhere that filled the hashing pool (or
    slowed the backend) turned her right passwords into guesses there: past
    max_failures_per_user of them she was locked out of her own network (454) once the
    backlog was gone. Now a late check's outcome counts: the right password nothing."""
    nat = "127.0.0.51"
    hold = sockdir / "hold"
    with _caseless_saslauthd(sockdir, hold) as sock:
        r = _nat_lockout_relay(tmp_path, f"saslauthd:{sock}")
        try:
            assert _login(r, "alice", USERS["alice"], nat)[0] == 235  # known there
            assert _login(r, "nosuchuser", "wrong", nat)[0] == 535  # the NAT is locked
            hold.touch()  # the backend's answers wait: every check is late
            for _ in range(2):
                assert _login(r, "alice", USERS["alice"], nat) == (454, "4.7.0")
            hold.unlink()
            r.wait_for(lambda: r.maillog().count("sasl_username=alice, reason=known "
                                                 "network, check not done in time") == 2,
                       what="the two late checks' lines")
            assert _login(r, "alice", USERS["alice"], nat)[0] == 235
        finally:
            r.stop()


def test_a_known_networks_check_the_backend_never_answers_counts_nowhere_and_leaks_nothing(
        sockdir: Path, tmp_path: Path) -> None:
    """Past the NAT's lockout alice is checked there (Lockout.SPARED); her checks go to a
    saslauthd that takes the connection and never answers (held until the end). Each is
    answered as the lockout at its due time (454 4.7.0), then given up at the backend's
    own bound (backend_timeout: the request's whole exchange; the session's wait for the
    late outcome, backend_timeout + 5 s, is never the one that ends it here), one line
    each `known network, check not done in time`, and counted nowhere: with the network's
    limit at 2 failures, the right password gets in afterwards. The worker's connections
    to the backend are closed while the backend still holds its end: the process's
    descriptors back to their count before the checks."""
    nat = "127.0.0.53"
    hold = sockdir / "hold"
    with _caseless_saslauthd(sockdir, hold) as sock:
        r = _nat_lockout_relay(tmp_path, f"saslauthd:{sock}", backend_timeout="1s")
        try:
            assert r.proc is not None
            assert _login(r, "alice", USERS["alice"], nat)[0] == 235  # known there
            assert _login(r, "nosuchuser", "wrong", nat)[0] == 535  # the NAT is locked
            fd_dir = f"/proc/{r.proc.pid}/fd"
            fds = len(os.listdir(fd_dir))
            hold.touch()  # the backend answers nothing from here on
            for _ in range(3):
                assert _login(r, "alice", USERS["alice"], nat) == (454, "4.7.0")
            r.wait_for(lambda: r.maillog().count("sasl_username=alice, reason=known "
                                                 "network, check not done in time") == 3,
                       what="the three unanswered checks' lines")
            r.wait_for(lambda: len(os.listdir(fd_dir)) <= fds,
                       what="the backend connections closed")
            assert "authentication failed" not in r.maillog().split(
                "check not done in time", 1)[1]
            hold.unlink()
            assert _login(r, "alice", USERS["alice"], nat)[0] == 235  # nothing counted
        finally:
            r.stop()


@contextlib.contextmanager
def _caseless_saslauthd(sockdir: Path, hold: Path | None = None) -> Iterator[Path]:
    """CASELESS_SASLAUTHD on sockdir/mux for alice's password: its socket (`hold`: its
    answers wait while that file exists)."""
    import sys

    sock = sockdir / "mux"
    fake = subprocess.Popen([sys.executable, "-c", CASELESS_SASLAUTHD, str(sock),
                             USERS["alice"]] + ([str(hold)] if hold else []),
                            stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert fake.stdout is not None and fake.stdout.readline() == b"ready\n"
        yield sock
    finally:
        fake.kill()
        fake.wait(10)


def test_a_dovecot_account_s_lockout_holds_for_every_spelling_dovecot_maps_to_it(
        dovecot_local_part: Path, tmp_path: Path) -> None:
    """Dovecot with `auth_username_format = %Ln` takes `alice@x1`, `alice@x2`... for alice,
    but the lockout counted each spelling apart (the account of a Dovecot login was its
    lower-case name), so a guesser spreading over spellings never reached
    `max_failures_per_user`. Failures count against the account Dovecot names (its
    FAIL's `user=` too), and that account's lockout holds for a spelling of its own."""
    r = _lockout_relay(tmp_path, f"dovecot:{dovecot_local_part}")

    def auth(user: str, password: str, source: str) -> tuple[int, str]:
        return _login(r, user, password, source)

    try:
        assert auth("alice@home.test", USERS["alice"], "127.0.3.1")[0] == 235
        for i in range(3):
            assert auth(f"alice@x{i}.test", "wrong", "127.0.1.7")[0] == 535
        assert auth("alice@x9.test", USERS["alice"], "127.0.2.8") == (454, "4.7.0")
        assert auth("alice", USERS["alice"], "127.0.2.9") == (454, "4.7.0")
        # Aimed at the guesser: from a network alice logged in from, any spelling works.
        assert auth("alice@office.test", USERS["alice"], "127.0.3.2")[0] == 235
        line = r.wait_log(r"reject=454 4\.7\.0 .*sasl_username=alice@x9\.test")
        assert "relay=unknown [127.0.2.8]" in line
    finally:
        r.stop()


def test_the_notice_s_resume_commands_quote_the_account(sockdir: Path, tmp_path: Path) -> None:
    """The containment notice tells the admin what to type: `authrelay user resume USER
    --delete-held`. USER is the account the session counted, for saslauthd the login name
    as the client sent it, shell characters and blanks included (PAM without `saslauthd
    -r` ignores the realm: `alice@x; touch PWNED;` logs in as alice): pasted, that line
    ran the client's command as the admin. The name is quoted for a POSIX shell now, so
    the line pasted resumes exactly that account."""
    import email
    import email.policy
    import shlex

    login = "alice@x; touch PWNED; $(id)`id`"
    with _caseless_saslauthd(sockdir) as sock:
        r = RelayProcess(tmp_path, {"auth": {"backend": f"saslauthd:{sock}"},
                                    "limits": {"containment": {"notify": "admin@local.test",
                                                               "messages": 1}}},
                         users={}).start()
        try:
            assert _send_one(r.ports["submissions"], login, USERS["alice"],
                             "alice@example.org") == 250
            r.wait_log(r"warning=user suspended")

            def notice() -> str | None:
                for path in r.queued():
                    msg = email.message_from_bytes(r.message_bytes(path),
                                                   policy=email.policy.default)
                    if "suspended" in str(msg["Subject"]):
                        return str(msg.get_body().get_content())  # type: ignore[union-attr]
                return None

            body = r.wait_for(notice, what="the admin notice queued")
            commands = [shlex.split(ln) for ln in body.splitlines()
                        if ln.strip().startswith("authrelay user resume")]
            assert commands == [["authrelay", "user", "resume", login.lower(), "--delete-held",
                                 "#", "spam:", "drop", "the", "held", "mail"],
                                ["authrelay", "user", "resume", login.lower(), "--release",
                                 "#", "a", "false", "alarm:", "send", "it"]], body
            assert "resumed" in r.cli(*commands[0][1:4]).stdout
        finally:
            r.stop()


def test_a_login_name_with_a_c1_control_or_a_bidi_override_is_refused(
        sockdir: Path, tmp_path: Path) -> None:
    """The SASL names check refused C0 controls only: behind a saslauthd that ignores the
    realm (PAM without -r), `alice@x<U+009B>2J<U+202E>` logged in as alice and became an
    account of that name, printed raw by `authrelay user suspended` (U+009B is a
    terminal's CSI: the admin's screen cleared) and in the containment notice. A name
    with a control or invisible character (the categories `user add` refuses) is now
    501 5.5.2 before any backend is asked, with its maillog line; alice still logs in."""
    login = "alice@x\u009b2J\u202e"
    with _caseless_saslauthd(sockdir) as sock:
        r = RelayProcess(tmp_path, {"auth": {"backend": f"saslauthd:{sock}"}},
                         users={}).start()
        try:
            assert _login(r, login, USERS["alice"], "127.0.1.1") == (501, "5.5.2")
            assert _login(r, "alice@x\u2028y", USERS["alice"], "127.0.1.1") == (501, "5.5.2")
            assert _login(r, "alice", USERS["alice"], "127.0.1.1")[0] == 235
            line = r.wait_log(r"reject=501 5\.5\.2 .*reason=control character")
            assert "\u009b" not in line and "\u202e" not in line
            assert r.cli("user", "suspended").stdout == ""
        finally:
            r.stop()
