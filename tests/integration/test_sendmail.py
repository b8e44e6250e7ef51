"""`authrelay sendmail`: the /usr/sbin/sendmail command line, from real shell pipelines.

The message must land in the spool (same format and durability as SMTP submission) with
no server running, and be delivered by a running server through a fake smart host.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from email.parser import BytesParser
from pathlib import Path

import pytest
from relayproc import RelayProcess

pytestmark = pytest.mark.slow

AUTHRELAY = f"{shlex.quote(sys.executable)} -m authrelay"


def _sh(script: str, config: Path | None, **kw) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env.pop("AUTHRELAY_CONFIG", None)
    if config is not None:
        env["AUTHRELAY_CONFIG"] = str(config)
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                          timeout=60, **kw)


def _spooled(r: RelayProcess) -> tuple[dict, bytes]:
    import json

    files = r.queued()
    assert len(files) == 1, files
    from authrelay.spool.format import split

    ej, msg = split(files[0].read_bytes())
    return json.loads(ej), msg


@pytest.fixture
def offline(relay_factory) -> RelayProcess:
    """A relay's config and state dir, server not running."""
    return relay_factory(start=False)


def test_t_from_shell_pipeline_queues(offline: RelayProcess) -> None:
    script = (
        "printf 'To: Bob <bob@remote.example>, carol@remote.example\\n"
        "Cc: dave@remote.example\\nBcc: eve@remote.example,\\n  frank@remote.example\\n"
        "Subject: cron output\\n\\nline one\\n..two dots\\n.\\nnot part of it\\n' "
        f"| {AUTHRELAY} sendmail -t -F 'Cron Daemon' -f cron@local.test"
    )
    res = _sh(script, offline.config)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b""  # sendmail is silent on success (cron mails any output)
    env, msg = _spooled(offline)
    assert env["sender"] == "cron@local.test"
    assert [r["address"] for r in env["recipients"]] == [
        "bob@remote.example", "carol@remote.example", "dave@remote.example",
        "eve@remote.example", "frank@remote.example"]
    assert env["protocol"] == "local"
    assert b"\n" not in msg.replace(b"\r\n", b"")  # CRLF only
    assert msg.startswith(b"Received: by relay.test (authrelay, from userid ")
    assert b"with local id " + env["queue_id"].encode() in msg
    parsed = BytesParser().parsebytes(msg)
    assert parsed["Bcc"] is None and b"eve@" not in msg and b"frank@" not in msg
    assert parsed["From"] == "Cron Daemon <cron@local.test>"
    assert parsed["Date"] and parsed["Message-ID"]
    assert parsed["Subject"] == "cron output"
    # Without -i a lone "." ends the message; other lines are kept as written.
    assert msg.endswith(b"\r\n\r\nline one\r\n..two dots\r\n")


def test_i_keeps_dot_lines_and_args_recipients(offline: RelayProcess) -> None:
    res = _sh(f"printf 'Subject: x\\r\\nFrom: me@local.test\\r\\n\\r\\na\\r\\n.\\r\\nb' "
              f"| {AUTHRELAY} sendmail -oi -- root 'x@remote.example, Y <y@remote.example>'",
              offline.config)
    assert res.returncode == 0, res.stderr
    env, msg = _spooled(offline)
    # Unqualified "root" (what cron uses) gets the hostname; the sender is the login.
    assert [r["address"] for r in env["recipients"]] == [
        "root@relay.test", "x@remote.example", "y@remote.example"]
    assert env["sender"].endswith("@relay.test")
    assert msg.endswith(b"\r\n\r\na\r\n.\r\nb\r\n")
    assert BytesParser().parsebytes(msg)["From"] == "me@local.test"  # not replaced


def test_body_without_headers_and_ignored_options(offline: RelayProcess) -> None:
    res = _sh(f"echo 'just a body: with a colon?' | {AUTHRELAY} sendmail -odi -oem -bm -v "
              "-i -U -B 8BITMIME someone@remote.example", offline.config)
    assert res.returncode == 0, res.stderr
    env, msg = _spooled(offline)
    assert env["body_8bit"] is True
    head, _, body = msg.partition(b"\r\n\r\n")
    assert body == b"just a body: with a colon?\r\n"
    assert b"\r\nFrom: " in head and b"\r\nDate: " in head


@pytest.mark.parametrize(("args", "stdin", "code", "text"), [
    ("", "Subject: none\n\nx\n", 64, "no recipients"),
    ("-t", "Subject: none\n\nx\n", 64, "no recipients"),
    ("'bad address@remote.example'", "x\n", 65, "bad address"),
    ("-t", "To: a@@remote.example\n\nx\n", 65, "bad address"),
    ("-f 'x y@z' a@remote.example", "x\n", 65, "bad address"),
    ("-Z a@remote.example", "x\n", 64, "unknown option -Z"),
    ("--version", "", 64, "unknown option --version"),  # was "unknown option --"
    ("-bt", "", 64, "not supported"),
    ("-bd", "", 64, "authrelay serve"),
])
def test_errors_exit_codes(offline: RelayProcess, args: str, stdin: str, code: int,
                           text: str) -> None:
    res = _sh(f"{AUTHRELAY} sendmail {args}", offline.config, input=stdin.encode())
    assert res.returncode == code, res.stderr
    assert text in res.stderr.decode()
    assert offline.queued() == []


def test_message_too_big(relay_factory) -> None:
    r = relay_factory(start=False, overrides={"limits": {"max_message_size": 1000}})
    res = _sh(f"head -c 5000 /dev/zero | tr '\\0' 'a' | {AUTHRELAY} sendmail a@remote.example",
              r.config)
    assert res.returncode == 65 and b"too big" in res.stderr
    assert r.queued() == [] and r.unready() == []  # the partial file was removed


def test_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("nonsense_key = 1\n")
    res = _sh(f"echo x | {AUTHRELAY} sendmail a@remote.example", cfg)
    assert res.returncode == 78 and b"nonsense_key" in res.stderr
    # -C overrides the environment.
    good = tmp_path / "good.toml"
    good.write_text(f'state_dir = "{tmp_path / "st"}"\n')
    res = _sh(f"echo x | {AUTHRELAY} sendmail -C {good} a@remote.example", cfg)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "st" / "spool" / "queue").iterdir())) == 1


@pytest.fixture
def nobody_state(tmp_path: Path):
    """(config, state dir) with the state dir owned by nobody on a path nobody can reach
    (pytest's own temp root is 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix="authrelay-sendmail-"))
    os.chmod(base, 0o711)
    state = base / "state"
    (state / "spool").mkdir(parents=True)
    for p in (state, state / "spool"):
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o700)
    cfg = tmp_path / "authrelay.toml"
    cfg.write_text(f'hostname = "relay.test"\nstate_dir = "{state}"\n')
    yield cfg, state
    shutil.rmtree(base, ignore_errors=True)


def test_unwritable_spool(offline: RelayProcess, nobody_state) -> None:
    if os.geteuid() == 0:
        # Root becomes the spool's owner (nobody), who cannot write a root-owned queue/.
        cfg, state = nobody_state
        queue = state / "spool" / "queue"
        queue.mkdir(mode=0o700)
    else:
        cfg, queue = offline.config, offline.queue_dir
        queue.mkdir(parents=True)
        os.chmod(queue, 0o500)
    try:
        res = _sh(f"echo x | {AUTHRELAY} sendmail a@remote.example", cfg)
    finally:
        os.chmod(queue, 0o700)
    assert res.returncode == 73, res.stderr
    assert b"cannot write to the spool" in res.stderr
    assert list(queue.iterdir()) == []


@pytest.mark.root
def test_root_writes_as_spool_owner(nobody_state) -> None:
    """Root (cron) queues as the daemon's user, so the daemon can read the file."""
    cfg, state = nobody_state
    res = _sh(f"echo x | {AUTHRELAY} sendmail a@remote.example", cfg)
    assert res.returncode == 0, res.stderr
    files = list((state / "spool" / "queue").iterdir())
    assert len(files) == 1
    st = files[0].stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert st.st_mode & 0o077 == 0


def test_symlink_named_sendmail(offline: RelayProcess, tmp_path: Path) -> None:
    # The console script of the Python running the tests (a venv's bin/): a PATH lookup
    # can find a pyenv shim, which dispatches on its own name and would run "sendmail".
    beside = Path(sys.executable).parent / "authrelay"
    script = str(beside) if beside.exists() else shutil.which("authrelay")
    if script is None:
        pytest.fail("the authrelay console script is not installed (pip install -e .)")
    link = tmp_path / "bin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(script)
    res = _sh(f"printf 'To: z@remote.example\\n\\nhi\\n' | {link} -t -i", offline.config)
    assert res.returncode == 0, res.stderr
    env, _ = _spooled(offline)
    assert [r["address"] for r in env["recipients"]] == ["z@remote.example"]


def test_delivered_by_running_server(relay_factory, fake_mx) -> None:
    smart = fake_mx("127.0.0.2")
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"}})
    res = _sh(f"printf 'To: bob@remote.example\\nSubject: via sendmail\\n\\nhello\\n' "
              f"| {AUTHRELAY} sendmail -t -f root@local.test", r.config)
    assert res.returncode == 0, res.stderr
    # The notify datagram wakes the scheduler: delivered without waiting for a rescan.
    r.wait_for(lambda: len(smart.messages) == 1, timeout=20)
    got = smart.messages[0]
    assert got.mail_from == "root@local.test" and got.rcpt_tos == ["bob@remote.example"]
    assert b"Subject: via sendmail" in got.content and b"with local id" in got.content
    r.wait_for(lambda: r.queued() == [], timeout=20)
    assert "stat=Sent" in r.maillog()


# --------------------------------------------------------------------------- issue 12

def test_help_and_newaliases(offline: RelayProcess) -> None:
    res = _sh(f"{AUTHRELAY} sendmail --help", None)
    assert res.returncode == 0 and res.stderr == b""
    out = res.stdout.decode()
    assert out.startswith("usage: sendmail [-t] [-i|-oi]") and "-bp" in out and "-bs" in out
    # -bi (newaliases): nothing to rebuild, success, silent (package scripts call it).
    res = _sh(f"{AUTHRELAY} sendmail -bi", offline.config)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")


def test_from_added_from_invoking_user(offline: RelayProcess) -> None:
    import pwd

    pw = pwd.getpwuid(os.getuid())
    res = _sh(f"printf 'Subject: no from\\n\\nx\\n' | {AUTHRELAY} sendmail a@remote.example",
              offline.config)
    assert res.returncode == 0, res.stderr
    env, msg = _spooled(offline)
    gecos = pw.pw_gecos.split(",")[0]
    want = f"{gecos} <{pw.pw_name}@relay.test>" if gecos else f"{pw.pw_name}@relay.test"
    assert BytesParser().parsebytes(msg)["From"] == want
    assert env["sender"] == f"{pw.pw_name}@relay.test"


def test_aliases_table_and_file(relay_factory, tmp_path: Path) -> None:
    """Mail for root (cron) and other local names reaches real addresses."""
    aliases = tmp_path / "aliases"
    aliases.write_text("# /etc/aliases\nwww-data: root\nbackup: |/usr/local/bin/store,\n"
                       "\tops@remote.example\nmailer-daemon: postmaster\n")
    r: RelayProcess = relay_factory(start=False, overrides={
        "aliases": {"root": "admin@remote.example", "postmaster": ["root", "pm@remote.example"]},
        "aliases_file": str(aliases)})
    res = _sh(f"printf 'Subject: cron\\n\\nx\\n' | {AUTHRELAY} sendmail root "
              "www-data@relay.test backup MAILER-DAEMON@localhost other", r.config)
    assert res.returncode == 0, res.stderr
    env, _ = _spooled(r)
    assert [x["address"] for x in env["recipients"]] == [
        "admin@remote.example", "ops@remote.example", "pm@remote.example",
        "other@relay.test"]
    # check-config names what an aliases file holds that a relay cannot do.
    cc = subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(r.config)],
                        capture_output=True, text=True, timeout=60)
    assert "warning: aliases_file: " in cc.stderr and "|/usr/local/bin/store" in cc.stderr


def test_bp_lists_the_queue_like_mailq(offline: RelayProcess, tmp_path: Path) -> None:
    res = _sh(f"{AUTHRELAY} sendmail -bp", offline.config)
    assert res.returncode == 0 and res.stdout == b"Mail queue is empty\n"
    assert _sh(f"echo x | {AUTHRELAY} sendmail -f a@local.test z@remote.example",
               offline.config).returncode == 0
    qid = offline.queued()[0].name
    res = _sh(f"{AUTHRELAY} sendmail -bp", offline.config)
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert qid in out and "<a@local.test>" in out and "z@remote.example" in out
    assert "-- " in out and " in 1 request." in out
    # Installed as `mailq` (a symlink to the console script), the same listing.
    beside = Path(sys.executable).parent / "authrelay"
    link = tmp_path / "bin" / "mailq"
    link.parent.mkdir()
    link.symlink_to(beside if beside.exists() else shutil.which("authrelay"))
    again = _sh(str(link), offline.config)
    assert again.returncode == 0 and qid in again.stdout.decode()


def test_q_with_server_down_says_so(offline: RelayProcess) -> None:
    assert _sh(f"echo x | {AUTHRELAY} sendmail z@remote.example",
               offline.config).returncode == 0
    res = _sh(f"{AUTHRELAY} sendmail -q", offline.config)
    assert res.returncode == 69, res.stderr
    assert b"mail system is down" in res.stderr


def test_q_flushes_through_the_running_server(relay_factory, fake_mx) -> None:
    smart = fake_mx("127.0.0.2")
    smart.mail_reply = "451 4.3.0 not now"
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"}})
    assert _sh(f"echo hi | {AUTHRELAY} sendmail -f a@local.test z@remote.example",
               r.config).returncode == 0
    r.wait_for(lambda: "stat=Deferred" in r.maillog(), timeout=20)
    smart.mail_reply = None
    res = _sh(f"{AUTHRELAY} sendmail -q", r.config)  # the retry is an hour away otherwise
    assert res.returncode == 0, res.stderr
    r.wait_for(lambda: len(smart.messages) == 1, timeout=20)


def test_bs_smtp_dialogue_on_stdin(offline: RelayProcess) -> None:
    dialogue = (b"EHLO me.example\r\nMAIL FROM:<cron@local.test>\r\n"
                b"RCPT TO:<bob@remote.example>\r\nRCPT TO:<bad address>\r\nDATA\r\n"
                b"Subject: via -bs\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n")
    res = _sh(f"{AUTHRELAY} sendmail -bs", offline.config, input=dialogue)
    assert res.returncode == 0, res.stderr
    codes = [ln[:3] for ln in res.stdout.decode().split("\r\n") if ln and ln[3:4] == " "]
    assert codes == ["220", "250", "250", "250", "501", "354", "250", "221"], res.stdout
    assert b"queued as" in res.stdout
    env, msg = _spooled(offline)
    assert env["sender"] == "cron@local.test"
    assert [x["address"] for x in env["recipients"]] == ["bob@remote.example"]
    assert msg.startswith(b"Received: by relay.test (authrelay, from userid ")
    assert b"\r\n\r\n.dot\r\nbody\r\n" in msg  # un-stuffed once
    parsed = BytesParser().parsebytes(msg)
    assert parsed["Subject"] == "via -bs" and parsed["Date"] and parsed["Message-ID"]
    # No AUTH and no STARTTLS on a pipe: not offered.
    assert b"AUTH" not in res.stdout and b"STARTTLS" not in res.stdout


def test_bs_end_of_input_mid_message_queues_nothing(offline: RelayProcess) -> None:
    res = _sh(f"{AUTHRELAY} sendmail -bs", offline.config,
              input=b"HELO x\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@remote.example>\r\n"
                    b"DATA\r\nSubject: cut\r\n\r\nhalf")
    assert res.returncode == 0 and b"Traceback" not in res.stderr
    assert offline.queued() == []


def test_bcc_removed_without_t(offline: RelayProcess) -> None:
    """A mail program that names its recipients as arguments (no -t) may leave the Bcc:
    in the header (mutt's write_bcc): it must not reach the other recipients, as
    Postfix's message_drop_headers makes sure; nor may a Return-Path or Content-Length."""
    script = (
        "printf 'To: bob@remote.example\\nBcc: hidden@remote.example,\\n  two@remote.example\\n"
        "Resent-Bcc: rb@remote.example\\nReturn-Path: <forged@remote.example>\\n"
        "Content-Length: 3\\nSubject: s\\n\\nbody\\n' "
        f"| {AUTHRELAY} sendmail -i bob@remote.example hidden@remote.example"
    )
    res = _sh(script, offline.config)
    assert res.returncode == 0, res.stderr
    env, msg = _spooled(offline)
    assert [r["address"] for r in env["recipients"]] == ["bob@remote.example",
                                                           "hidden@remote.example"]
    head = msg.split(b"\r\n\r\n", 1)[0].lower()
    for gone in (b"bcc:", b"hidden@", b"two@", b"rb@", b"return-path:", b"forged@",
                 b"content-length:"):
        assert gone not in head, gone
    assert b"\r\nto: bob@remote.example\r\nsubject: s\r\n" in head
