"""Local submission through the running server (state_dir/public/submit.sock).

Every local user can send (root and `nobody`, through runuser), the sender is the user the
kernel names (SO_PEERCRED), not what the command line says, and the server writes the
maillog line (`from=... uid= user=`). With the server down: root queues directly with the
same identity, anyone else gets one line and EX_TEMPFAIL (75) with nothing queued.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from privpython import python_for
from relayproc import RelayProcess

from authrelay.spool.format import split

pytestmark = [pytest.mark.root, pytest.mark.slow]  # runs commands as nobody


@pytest.fixture
def site() -> Iterator[Path]:
    """A directory `nobody` can reach (pytest's temp root is 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix="authrelay-local-"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def relay(site: Path) -> Iterator[RelayProcess]:
    r = RelayProcess(site, {"limits": {"max_message_size": 100_000}})
    os.chmod(r.config, 0o644)
    r.start()
    yield r
    r.stop()


def sendmail(r: RelayProcess, *args: str, stdin: bytes, user: str = "root",
             config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    py = r.python if user == "root" else python_for(user)
    cmd = [py, "-m", "authrelay", "-c", str(config or r.config), "sendmail", *args]
    if user != "root":
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, cwd="/")


def spooled(r: RelayProcess) -> list[tuple[dict, bytes]]:
    out = []
    for f in r.queued():
        ej, msg = split(f.read_bytes())
        out.append((json.loads(ej), msg))
    return out


MSG = b"Subject: local\n\nhello\n"


@pytest.mark.parametrize("user,uid", [("root", 0), ("nobody", 65534)])
def test_every_user_sends_as_themselves(relay: RelayProcess, user: str, uid: int) -> None:
    res = sendmail(relay, "-i", "bob@remote.example", stdin=MSG, user=user)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"" and res.stderr == b""
    [(env, msg)] = spooled(relay)
    assert env["sender"] == f"{user}@relay.test"
    assert f"(authrelay, from userid {uid})".encode() in msg
    assert f"From: {user}@relay.test".encode() in msg or b"From: " in msg
    head = msg.split(b"\r\n\r\n")[0]
    assert f"{user}@relay.test".encode() in head.split(b"From:")[1].split(b"\r\n")[0]
    # The server wrote the line (the maillog target is its stdout here).
    relay.wait_for(lambda: f"from=<{user}@relay.test>" in relay.maillog())
    line = next(ln for ln in relay.maillog().splitlines() if f"from=<{user}@relay.test>" in ln)
    assert f"uid={uid}" in line and f"user={user}" in line and "proto=local" in line
    assert relay.queued()[0].stat().st_uid == os.geteuid()  # written by the server


def test_untrusted_user_cannot_set_the_sender(relay: RelayProcess) -> None:
    res = sendmail(relay, "-f", "ceo@bank.example", "bob@remote.example", stdin=MSG,
                   user="nobody")
    assert res.returncode == 77, res.stderr
    err = res.stderr.decode()
    assert "only trusted users may set the envelope sender" in err
    assert len(err.strip().splitlines()) == 1
    assert relay.queued() == []
    relay.wait_for(lambda: "local submission refused" in relay.maillog())
    # Their own address is fine; root may name any sender (a trusted user).
    res = sendmail(relay, "-f", "nobody@relay.test", "bob@remote.example", stdin=MSG,
                   user="nobody")
    assert res.returncode == 0, res.stderr
    res = sendmail(relay, "-f", "ceo@bank.example", "bob@remote.example", stdin=MSG)
    assert res.returncode == 0, res.stderr
    assert sorted(e["sender"] for e, _ in spooled(relay)) == ["ceo@bank.example",
                                                             "nobody@relay.test"]


def test_trusted_users_may_set_the_sender(site: Path) -> None:
    r = RelayProcess(site, {"trusted_users": ["nobody"]})
    os.chmod(r.config, 0o644)
    r.start()
    try:
        res = sendmail(r, "-f", "app@site.example", "bob@remote.example", stdin=MSG,
                       user="nobody")
        assert res.returncode == 0, res.stderr
        [(env, msg)] = spooled(r)
        assert env["sender"] == "app@site.example"
        assert b"from userid 65534" in msg  # the trace still names who sent it
    finally:
        r.stop()


def test_a_socket_the_start_could_not_make_is_made_once_it_can_be(site: Path) -> None:
    """The master made public/submit.sock at its start only: a failure then (the state
    dir out of inodes, no file descriptor left; here a directory in the socket's place)
    left local users refused (75) for the life of the process, however soon the cause
    went. Now the socket is tried again every LOCAL_RETRY seconds."""
    r = RelayProcess(site, {})
    os.chmod(r.config, 0o644)
    blocker = r.state / "public" / "submit.sock"
    blocker.mkdir(parents=True, mode=0o700)
    (blocker / "x").write_text("")
    os.chmod(r.state, 0o700)
    r.start()
    try:
        r.wait_log(r"error=local submission socket not available: ")
        assert sendmail(r, "bob@remote.example", stdin=MSG, user="nobody").returncode == 75
        shutil.rmtree(blocker)
        r.wait_log(r"warning=local submission socket available again")
        res = sendmail(r, "bob@remote.example", stdin=MSG, user="nobody")
        assert res.returncode == 0, res.stderr
        assert len(spooled(r)) == 1
    finally:
        r.stop()


def test_limits_apply_to_local_users(relay: RelayProcess) -> None:
    big = b"Subject: big\n\n" + (b"y" * 70 + b"\n") * 2000
    res = sendmail(relay, "bob@remote.example", stdin=big, user="nobody")
    assert res.returncode == 65, res.stderr
    assert b"message too big" in res.stderr
    assert relay.queued() == []


def test_client_gone_mid_message_queues_nothing(relay: RelayProcess) -> None:
    sock = relay.state / "public" / "submit.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(json.dumps({"v": 1, "opts": {"recipients": ["bob@remote.example"]}})
                  .encode() + b"\n")
        part = b"Subject: cut\r\n\r\nsome of the body\r\n"
        s.sendall(struct.pack(">I", len(part)) + part)
    relay.wait_for(lambda: "local submission aborted" in relay.maillog())
    assert relay.queued() == [] and relay.unready() == []


def test_a_refused_message_is_one_maillog_line(relay: RelayProcess) -> None:
    """A message the spool refuses (here a NUL) is one maillog line, its queue id's
    `reject=`, as over SMTP. Before, a second line followed it for the same refusal:
    `NOQUEUE: warning=local submission refused: message contains NUL characters`."""
    res = sendmail(relay, "bob@remote.example", stdin=b"Subject: nul\n\na\x00b\n",
                   user="nobody")
    assert res.returncode == 65, res.stderr
    line = relay.wait_log(r": reject=554 5\.6\.0 Message contains NUL characters, "
                          r"relay=local, uid=\d+, user=nobody")
    # a later event's line proves nothing more about the refusal is on its way
    sendmail(relay, "bob@remote.example", stdin=MSG, user="nobody")
    relay.wait_log(r"from=<nobody@")
    log = relay.maillog()
    assert log.count("NUL characters") == 1, log
    assert re.search(r"\]: [0-9A-Z]{17}: reject=", line), line  # the queue id first


def test_bad_request_is_refused(relay: RelayProcess) -> None:
    sock = relay.state / "public" / "submit.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(b'{"v": 1, "opts": {"mode": "p", "config": "/etc/shadow"}}\n')
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile("rb").readline()
    assert json.loads(answer)["code"] == 75
    assert relay.queued() == []


@pytest.mark.parametrize("args", [["-t"], ["bob@remote.example, " + "(" * 3000]],
                         ids=["to-header", "argument"])
def test_an_address_list_nested_too_deep_is_a_data_error(relay: RelayProcess,
                                                          args: list[str]) -> None:
    """A local user's To: (-t) or address list argument of 3,000 nested comments: the
    address parser recursed past Python's limit, the server answered 75 `local error in
    processing` (try again: a cron job's mail retried for ever) with an `error=` line for
    a bug. It is a bad address list: 65, one refusal line, nothing queued."""
    msg = b"To: bob@remote.example " + b"(" * 3000 + b"\nSubject: deep\n\nhi\n"
    res = sendmail(relay, *args, stdin=msg, user="nobody")
    assert res.returncode == 65, res.stderr
    assert b"not an address list (comments nested too deep)" in res.stderr
    relay.wait_for(lambda: "comments nested too deep" in relay.maillog())
    assert "error=" not in relay.maillog()
    assert relay.queued() == []


def test_a_refusal_quotes_a_long_address_in_part(relay: RelayProcess) -> None:
    """A local user's To: (-t) of one address of 90,000 characters (folded lines): the
    refusal quoted it whole, in the client's error and in the maillog line (a line per
    submission as long as the header section, up to 1 MiB: the log's disk filled at the
    rate `nobody` cared to submit). Now its first 256 characters and its length."""
    addr = b"\n ".join([b"a" * 900] * 100) + b"@remote.example"
    res = sendmail(relay, "-t", stdin=b"To: " + addr + b"\nSubject: long\n\nhi\n",
                   user="nobody")
    assert res.returncode == 65, res.stderr[:300]
    length = f"({100 * 900 + 99 + len('@remote.example')} characters)"  # unfolded: blanks
    assert len(res.stderr) < 1000 and length.encode() in res.stderr, res.stderr[:300]
    line = relay.wait_for(lambda: next((ln for ln in relay.maillog().splitlines()
                                        if "bad address" in ln), None))
    assert len(line) < 1000 and length in line, line[:300]
    assert relay.queued() == []


def test_a_request_nested_too_deep_is_a_bad_request(relay: RelayProcess) -> None:
    """A request of 30,000 nested arrays (json raises RecursionError, no ValueError) was
    taken for a bug: `error=local submission: RecursionError: ...` in the maillog, for
    any local user, at will. It is a bad request as any other: a warning that nothing was
    queued, the client told 75, the server serving on."""
    sock = relay.state / "public" / "submit.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(b"[" * 30000 + b"\n")
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile("rb").readline()
    assert json.loads(answer)["code"] == 75
    relay.wait_log(r"warning=local submission aborted: nested too deep")
    assert "error=" not in relay.maillog() and "RecursionError" not in relay.maillog()
    res = sendmail(relay, "bob@remote.example", stdin=MSG, user="nobody")
    assert res.returncode == 0, res.stderr
    assert relay.queued() != []


def test_server_down(site: Path) -> None:
    """nobody: one line, 75, nothing queued. root: queued directly, still as root."""
    r = RelayProcess(site, {"user": "nobody"})
    os.chmod(r.config, 0o644)
    r.start()
    r.stop()  # state made and owned by nobody, no server
    # A DKIM key (of another domain): the signer is on and notes dkim=none for this message
    subprocess.run([r.python, "-m", "authrelay", "-c", str(r.config), "dkim", "keygen",
                    "other.example"], check=True, capture_output=True, timeout=60)
    res = sendmail(r, "bob@remote.example", stdin=MSG, user="nobody")
    assert res.returncode == 75, res.stderr
    err = res.stderr.decode()
    assert "not running" in err and len(err.strip().splitlines()) == 1
    assert r.queued() == []
    res = sendmail(r, "bob@remote.example", stdin=MSG)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b""  # the log target is stdout: no maillog line is cron's mail
    [(env, msg)] = spooled(r)
    assert env["sender"] == "root@relay.test"  # not the spool owner's name
    assert b"from userid 0" in msg
    assert r.queued()[0].stat().st_uid == 65534


def test_unreadable_config_uses_the_socket_env(relay: RelayProcess) -> None:
    """A 0600 config (it holds a password): a user finds the server through
    $AUTHRELAY_SUBMIT_SOCKET (default: the packaged /var/lib/authrelay)."""
    os.chmod(relay.config, 0o600)
    py = python_for("nobody")
    env = {"PATH": "/usr/bin:/bin",
           "AUTHRELAY_SUBMIT_SOCKET": str(relay.state / "public" / "submit.sock")}
    res = subprocess.run(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v
                          in env.items()], py, "-m", "authrelay", "-c", str(relay.config),
                          "sendmail", "bob@remote.example"],
                         input=MSG, capture_output=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    [(e, _)] = spooled(relay)
    assert e["sender"] == "nobody@relay.test"


def test_bs_through_the_server(relay: RelayProcess) -> None:
    dialogue = (b"HELO x\r\nMAIL FROM:<nobody@relay.test>\r\nRCPT TO:<bob@remote.example>\r\n"
                b"DATA\r\nSubject: bs\r\n\r\nhi\r\n.\r\nMAIL FROM:<ceo@bank.example>\r\n"
                b"RCPT TO:<bob@remote.example>\r\nDATA\r\nSubject: forged\r\n\r\nhi\r\n.\r\n"
                b"QUIT\r\n")
    res = sendmail(relay, "-bs", stdin=dialogue, user="nobody")
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert "250 2.0.0 Ok: queued as" in out and "550 5.7.1" in out, out
    [(env, _)] = spooled(relay)
    assert env["sender"] == "nobody@relay.test"


def test_mailq_and_dash_c_forms(relay: RelayProcess) -> None:
    """`authrelay -c FILE sendmail -bp` / `-i rcpt` parse (were argparse's exit 2); mailq
    as a user who may not read the queue: one line, 77, no traceback."""
    res = sendmail(relay, "-bp", stdin=b"")
    assert res.returncode == 0 and b"Mail queue is empty" in res.stdout, res.stderr
    res = sendmail(relay, "-i", "bob@remote.example", stdin=MSG)
    assert res.returncode == 0, res.stderr
    res = sendmail(relay, "-bp", stdin=b"", user="nobody")
    assert res.returncode == 77, res.stderr
    err = res.stderr.decode()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    res = sendmail(relay, "-x", stdin=b"")
    assert res.returncode == 64 and b"unknown option -x" in res.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_dropped_server_takes_mail_from_every_user(site: Path, workers: int) -> None:
    """The production shape: started as root with `user`, the master (dropped) serves
    the socket; root and another unprivileged user each send as themselves, and the queue
    file belongs to the daemon's user."""
    from support.privileges import TEST_USER, unprivileged_user

    pw = unprivileged_user()
    r = RelayProcess(site, {"user": TEST_USER}, workers=workers)
    r.python = python_for(TEST_USER)
    os.chmod(r.config, 0o644)
    r.start()
    try:
        sock = r.state / "public" / "submit.sock"
        r.wait_for(sock.exists)  # the master makes it once its scheduler runs
        assert sock.stat().st_uid == pw.pw_uid  # made by the dropped master
        assert "local submission socket not available" not in r.maillog()
        for user in ("root", "nobody"):
            res = sendmail(r, "bob@remote.example", stdin=MSG, user=user)
            assert res.returncode == 0, (user, res.stderr)
        r.wait_for(lambda: len(r.queued()) == 2)
        senders = sorted(e["sender"] for e, _ in spooled(r))
        assert senders == ["nobody@relay.test", "root@relay.test"]
        assert all(p.stat().st_uid == pw.pw_uid for p in r.queued())
    finally:
        r.stop()


def test_rate_limits_for_local_users(site: Path) -> None:
    """user_messages_per_hour holds for a local user (75 past it, nothing queued);
    trusted users (root) are exempt."""
    r = RelayProcess(site, {"limits": {"user_messages_per_hour": 1}})
    os.chmod(r.config, 0o644)
    r.start()
    try:
        assert sendmail(r, "bob@remote.example", stdin=MSG, user="nobody").returncode == 0
        res = sendmail(r, "bob@remote.example", stdin=MSG, user="nobody")
        assert res.returncode == 75 and b"message rate limit reached (1 per hour)" in \
            res.stderr, res.stderr
        for _ in range(2):
            assert sendmail(r, "bob@remote.example", stdin=MSG).returncode == 0
        assert len(r.queued()) == 3
        r.wait_for(lambda: "local submission refused: message rate limit" in r.maillog())
    finally:
        r.stop()


def test_untrusted_local_user_cannot_borrow_a_signature(site: Path) -> None:
    """Attack (issue 21 x 17): `nobody` (a compromised web app) writes `From:
    ceo@sender.test` and `Sender:` headers; the relay holds sender.test's DKIM key. Every
    local user can submit now, so an untrusted user's message is signed only when its
    From:/Sender: is the user's own address (login@hostname): the forged one is queued
    unsigned (`dkim=skipped`), the honest one signed; root (trusted) keeps today's rule."""
    r = RelayProcess(site)
    os.chmod(r.config, 0o644)
    for domain in ("sender.test", "relay.test"):
        r.cli("dkim", "keygen", domain, "--selector", "t")
    r.start()
    try:
        forged = b"From: CEO <ceo@sender.test>\nSubject: wire\n\npay\n"
        sender_hdr = b"From: nobody@relay.test\nSender: ceo@sender.test\n\npay\n"
        honest = b"From: Nobody <nobody@relay.test>\nSubject: ok\n\nhi\n"
        for msg in (forged, sender_hdr, honest):
            res = sendmail(r, "bob@remote.example", stdin=msg, user="nobody")
            assert res.returncode == 0, res.stderr
        res = sendmail(r, "bob@remote.example", stdin=forged)  # root: trusted
        assert res.returncode == 0, res.stderr
        r.wait_for(lambda: len(r.queued()) == 4)
        by_subject = {}
        for env, msg in spooled(r):
            head = msg.split(b"\r\n\r\n")[0]
            signed = b"DKIM-Signature:" in head
            key = (env["sender"], b"Sender: ceo" in head, b"CEO" in head)
            by_subject[key] = signed
        assert by_subject == {
            ("nobody@relay.test", False, True): False,   # forged From:
            ("nobody@relay.test", True, False): False,   # forged Sender:
            ("nobody@relay.test", False, False): True,   # own address: signed
            ("root@relay.test", False, True): True,      # trusted: as before
        }
        r.wait_for(lambda: r.maillog().count("dkim=skipped") == 2)
    finally:
        r.stop()


@pytest.mark.parametrize("opts", [
    {"envid": "x\r\nRCPT TO:<victim@remote.example>"},
    {"envid": "a b"},
    {"notify": "SUCCESS\r\nRSET"},
    {"notify": "NEVER,SUCCESS"},
    {"ret": "FULL\r\nQUIT"},
])
def test_dsn_options_cannot_inject_commands(relay: RelayProcess, opts: dict) -> None:
    """Attack: -V/-N/-R (or the socket's opts) went into the envelope as given, and the
    delivery client writes them into MAIL/RCPT at the next hop: a CR LF injected SMTP
    commands into our (authenticated) smart-host session. Refused with 64, nothing queued."""
    sock = relay.state / "public" / "submit.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(json.dumps({"v": 1, "opts": {"recipients": ["bob@remote.example"],
                                               **opts}}).encode() + b"\n")
        msg = b"Subject: dsn\r\n\r\nhi\r\n"
        s.sendall(struct.pack(">I", len(msg)) + msg + struct.pack(">I", 0))
        answer = json.loads(s.makefile("rb").readline())
    assert answer["code"] == 64, answer
    assert relay.queued() == [] and relay.unready() == []
    res = sendmail(relay, "-V", "x\r\nRSET", "bob@remote.example", stdin=MSG)
    assert res.returncode == 64 and b"-V:" in res.stderr, res.stderr
    assert sendmail(relay, "-V", "ok+2Bid", "-N", "failure,delay", "-R", "hdrs",
                    "bob@remote.example", stdin=MSG).returncode == 0
    assert len(relay.queued()) == 1


def test_a_stalled_local_client_does_not_hold_the_stop(site: Path) -> None:
    """A local client that sends half a message and then nothing: SIGTERM still stops the
    server within shutdown_timeout (its connection is cut, nothing queued)."""
    import signal
    import time

    r = RelayProcess(site, {"shutdown_timeout": "2s"})
    r.start()
    sock = r.state / "public" / "submit.sock"
    r.wait_for(sock.exists)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(json.dumps({"v": 1, "opts": {"recipients": ["bob@remote.example"]}})
                  .encode() + b"\n")
        part = b"Subject: stalled\r\n\r\nhalf"
        s.sendall(struct.pack(">I", len(part)) + part)
        assert r.proc is not None
        t0 = time.monotonic()
        os.kill(r.proc.pid, signal.SIGTERM)
        r.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 15
        answer = s.makefile("rb").readline()
    assert json.loads(answer)["code"] == 75
    assert r.queued() == [] and "daemon=stopped" in r.maillog()


def test_dripping_clients_are_cut(relay: RelayProcess) -> None:
    """Attack: a local client that sends its message a byte at a time, slower than the
    per-read timeout, held a submission thread without end (two local users held all of
    them: everyone else's mail waited). Reading has READ_DEADLINE in all: the dripping
    client is cut with 75 and nothing queued, and the next submission is served."""
    import time

    from authrelay import localsubmit

    sock = relay.state / "public" / "submit.sock"
    drips = []
    for _ in range(localsubmit.PER_UID_ACTIVE - 1):  # root's own limit leaves one slot
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        s.sendall(json.dumps({"v": 1, "opts": {"recipients": ["bob@remote.example"]}})
                  .encode() + b"\n")
        s.sendall(struct.pack(">I", 10_000) + b"Subject: drip\r\n")
        drips.append(s)
    t0 = time.monotonic()
    for s in drips:  # a byte now and then, well within any per-read timeout
        s.settimeout(localsubmit.READ_DEADLINE + 20)
    answers = []
    # until every client has its answer (`drips` shrinks as they come: the answers of
    # one poll may straddle the next)
    while drips and time.monotonic() - t0 < localsubmit.READ_DEADLINE + 20:
        for s in drips:
            try:
                s.sendall(b"x")
            except OSError:
                pass
        time.sleep(1)
        for s in list(drips):
            s.setblocking(False)
            try:
                data = s.recv(1000)
            except BlockingIOError:
                continue
            finally:
                s.setblocking(True)
            answers.append(json.loads(data))
            drips.remove(s)
            s.close()
    elapsed = time.monotonic() - t0
    assert len(answers) == localsubmit.PER_UID_ACTIVE - 1, answers
    assert all(a["code"] == 75 and "not queued" in a["error"] for a in answers), answers
    assert elapsed < localsubmit.READ_DEADLINE + 10
    assert relay.queued() == [] and relay.unready() == []
    assert sendmail(relay, "-i", "bob@remote.example", stdin=MSG).returncode == 0
    assert len(relay.queued()) == 1


def test_full_name_through_the_server(relay: RelayProcess) -> None:
    """-F (cron jobs and web applications set it) through the server, as for root with
    the server down: the From: we add carries the name."""
    res = sendmail(relay, "-F", "Cron Daemon", "bob@remote.example", stdin=MSG,
                   user="nobody")
    assert res.returncode == 0, res.stderr
    [(env, msg)] = spooled(relay)
    assert env["sender"] == "nobody@relay.test"
    assert b"\r\nFrom: Cron Daemon <nobody@relay.test>\r\n" in msg


def test_full_name_cannot_add_header_fields(relay: RelayProcess) -> None:
    """-F is often a web form's name field: a CR LF in it must not end the From: we add
    and start fields of its own (Bcc:, Reply-To:), through the server nor directly; nor
    may an encoded name carry line breaks (U+2028 makes formataddr encode it)."""
    inject = "Evil\r\nBcc: spy@remote.example\r\nReply-To: phish@remote.example\nX-Inj: 1"
    for name in (inject, inject.replace("X-Inj:", "X-Inj:\u2028")):
        res = sendmail(relay, "-F", name, "bob@remote.example", stdin=MSG, user="nobody")
        assert res.returncode == 0, res.stderr
    relay.stop()  # the direct path (root, server down) adds the same From:
    res = sendmail(relay, "-F", inject, "bob@remote.example", stdin=MSG)
    assert res.returncode == 0, res.stderr
    got = spooled(relay)
    assert len(got) == 3
    for env, msg in got:
        head = msg.split(b"\r\n\r\n", 1)[0]
        names = [ln.split(b":", 1)[0].lower() for ln in head.split(b"\r\n")
                 if ln[:1] not in (b" ", b"\t")]
        assert names == [b"received", b"subject", b"from", b"date", b"message-id"], head
        sender = BytesParser(policy=policy.default).parsebytes(msg)["From"].addresses[0]
        assert sender.addr_spec == env["sender"]
        assert sender.display_name == \
            "Evil Bcc: spy@remote.example Reply-To: phish@remote.example X-Inj: 1"


def test_endless_input_is_cut_at_the_size_limit(relay: RelayProcess) -> None:
    """A runaway cron job piping endless output to sendmail: the command read all of it
    into a temporary file before talking to the server (filling /tmp), though anything
    past max_message_size is refused. It now stops reading there: exit 65, nothing
    queued, and the writer sees the pipe close."""
    cmd = ["runuser", "-u", "nobody", "--", python_for("nobody"), "-m", "authrelay",
           "-c", str(relay.config), "sendmail", "bob@remote.example"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    assert p.stdin is not None and p.stderr is not None
    written, chunk = 0, b"x" * 65536 + b"\n"
    try:
        while written < 50_000_000:  # bounded: the old code reads it all
            p.stdin.write(chunk)
            written += len(chunk)
    except BrokenPipeError:
        pass
    with contextlib.suppress(BrokenPipeError):
        p.stdin.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 65, err
    assert b"too big (limit 100000 bytes)" in err
    assert written < 5_000_000, written  # stopped near the limit, not at the end
    assert spooled(relay) == []


def test_a_message_of_short_lines_in_big_frames_is_stored_whole(relay: RelayProcess) -> None:
    """A local client's own frames (up to 1 MiB, cut anywhere in a line) of many
    short lines: each line was a copy of the rest of its frame (_Frames, 36 s of the
    master's CPU per MiB of empty lines) and a write to the draft of its own; now the
    lines go to the draft in batches, and what is stored is the message, line for line."""
    body = b"".join(b"x" * (i % 7) + b"\n" for i in range(15_000))
    data = b"Subject: short lines\n\n" + body
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(relay.state / "public" / "submit.sock"))
    with sock:
        sock.sendall(json.dumps({"v": 1, "opts": {"recipients": ["bob@remote.example"]}})
                     .encode() + b"\n")
        for part in (data[:1001], data[1001:]):  # the limit is 100,000: one big frame
            sock.sendall(struct.pack(">I", len(part)) + part)
        sock.sendall(struct.pack(">I", 0))
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["code"] == 0, answer
    [(_env, msg)] = spooled(relay)
    assert msg.split(b"\r\n\r\n", 1)[1] == body.replace(b"\n", b"\r\n")


def test_a_header_line_longer_than_a_piece_stays_one_header_line(relay: RelayProcess) -> None:
    """Lines are read in pieces of 64 KiB (localmail.LINE_PIECE). A header field on one
    longer line (a mailing script's Bcc: under -t) had its first piece kept as a field,
    less two octets, and the rest taken for the body: the recipients there not sent to,
    and, a Bcc:, its addresses shown in the body to every recipient. A line of 65,535
    octets and CRLF had its CR and LF in two pieces, read as two line ends: a blank line
    ending the header section there (the next fields went into the body)."""
    names = [f'"Member {i} {"z" * 770}" <m{i}@remote.example>' for i in range(90)]
    bcc = b"Bcc: " + ", ".join(names).encode() + b"\n"
    assert len(bcc) > 65536
    res = sendmail(relay, "-t", "-i", stdin=b"To: bob@remote.example\n" + bcc
                   + b"Subject: long bcc\n\nhello\n")
    assert res.returncode == 0, res.stderr
    pad = b"X-Long: " + b"y" * (65535 - len(b"X-Long: "))
    res = sendmail(relay, "-i", "bob@remote.example",
                   stdin=b"Subject: after\r\n" + pad + b"\r\nX-After: 1\r\n\r\nbody\r\n")
    assert res.returncode == 0, res.stderr
    [first, second] = sorted(spooled(relay), key=lambda m: b"long bcc" not in m[1])
    env, msg = first
    assert [r["address"] for r in env["recipients"]] == \
        ["bob@remote.example", *(f"m{i}@remote.example" for i in range(90))]
    head, body = msg.split(b"\r\n\r\n", 1)
    assert b"\r\nSubject: long bcc\r\n" in head and b"Bcc" not in msg and b"z" * 10 not in msg
    assert body == b"hello\r\n"
    env, msg = second
    head, body = msg.split(b"\r\n\r\n", 1)
    # (broken at 998 octets with CRLF SPACE, longlines.py: folded, one field still)
    assert max(map(len, head.split(b"\r\n"))) <= 998
    assert b"\r\n" + pad + b"\r\nX-After: 1\r\n" in (head + b"\r\n").replace(b"\r\n ", b"")
    assert body == b"body\r\n"


def test_a_command_line_past_the_request_limit_is_a_usage_error(
        relay: RelayProcess) -> None:
    """3,000 recipients on the command line (a mailing script's): their request is over
    the 64 KiB the server reads, and the server answered 75 `message not queued: bad
    request` (try again: a cron job's mail retried for ever, the cause unsaid). The
    command refuses it before connecting, 64, naming the size and the way out (-t); the
    server names a request cut at the limit (a client of its own) as such."""
    rcpts = [f"user{i}@remote.example" for i in range(3000)]
    res = sendmail(relay, "-i", *rcpts, stdin=MSG, user="nobody")
    assert res.returncode == 64, res.stderr
    err = res.stderr.decode()
    assert err.startswith("authrelay sendmail: the command line's 3000 recipients and "
                          "options take ") and len(err.splitlines()) == 1, err
    assert "more than the 65536 a local submission takes" in err and "-t" in err, err
    sock = relay.state / "public" / "submit.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(json.dumps({"v": 1, "opts": {"recipients": rcpts}}).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        answer = json.loads(s.makefile("rb").readline())
    assert answer == {"code": 75,
                      "error": "message not queued: request longer than 65536 bytes"}
    relay.wait_log(r"warning=local submission aborted: request longer than 65536 bytes")
    assert "bad request" not in relay.maillog()
    assert relay.queued() == []
