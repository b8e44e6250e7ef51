"""Receiving against a real authrelay process: smuggling, STARTTLS injection, durability."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient, client_ctx, plain
from support import ci, ports
from support.ports import free_port
from support.sdnotify import NotifySocket
from support.wait import wait_until

pytestmark = pytest.mark.slow


def _authed(relay: RelayProcess) -> RawClient:
    c = RawClient(relay.ports["submissions"], tls=client_ctx())
    assert c.reply().code == 220
    assert c.cmd("EHLO laptop.example").code == 250
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
    return c


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r",
                                    b"\n.\r"])
def test_bare_end_of_data_refused_nothing_smuggled(relay: RelayProcess, ending: bytes) -> None:
    with _authed(relay) as c:
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: first\r\n\r\nbody" + ending +
               b"MAIL FROM:<alice@local.test>\r\nRCPT TO:<victim@remote.example>\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
        r = c.reply()
        assert (r.code, r.lines[-1][4:9]) == (521, "5.5.2")
        assert c.closed()
    # Nothing stored: an authenticated session's file, made while the message arrived
    # (create_early), goes with the refusal, or once its commit thread gets to it when
    # that create was still queued; a message taken in would stay (and be ready).
    wait_until(lambda: relay.queued() == [], what=lambda: f"queue emptied: {relay.queued()}")
    # the refused message's line, its queue id first (as the 552 / 554 after DATA)
    relay.wait_log(r": [0-9A-Z]{17}: reject=521 5\.5\.2 Bare CR or LF")


def test_starttls_injection_discarded(relay: RelayProcess) -> None:
    """CVE-2011-0411: commands pipelined in plaintext after STARTTLS are not executed."""
    with RawClient(relay.ports["submission"]) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO client.example").code == 250
        c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.example>\r\n")
        assert c.reply().code == 220
        c.starttls(client_ctx())
        # Had the injected commands run, their replies (250 Reset / 503 / 530) would
        # come first now. The first reply must be the one to our NOOP.
        r = c.cmd("NOOP")
        assert (r.code, r.text) == (250, "2.0.0 Ok")
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 503  # state reset: EHLO again
    # RFC 3207 5: discarded, and said once, with the octets dropped (RSET, MAIL: 39)
    relay.wait_log(r"NOQUEUE: warning=discarded 39 bytes pipelined after STARTTLS, "
                   r"relay=unknown \[127\.0\.0\.1\]$")


def test_sigkill_right_after_250_keeps_message(relay: RelayProcess) -> None:
    body = b"Subject: durable\r\n\r\n" + b"line of text\r\n" * 2000
    with _authed(relay) as c:
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(body + b".\r\n")
        r = c.reply()
        assert r.code == 250
        relay.kill()  # SIGKILL at once: no chance to flush anything after the 250
    qid = r.text.rsplit(" ", 1)[1]
    relay.start()
    [path] = relay.queued()
    assert path.name == qid
    stored = relay.message_bytes(path)
    assert stored.startswith(b"Received: ")
    assert b"\r\nSubject: durable\r\n" in stored
    assert stored.endswith(b"\r\n\r\n" + b"line of text\r\n" * 2000)
    assert f"queued as {qid}" in r.text


def test_every_queued_message_survives_kill(relay: RelayProcess) -> None:
    ids = []
    with _authed(relay) as c:
        for i in range(20):
            assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
            assert c.cmd(f"RCPT TO:<r{i}@remote.example>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(f"Subject: m{i}\r\n\r\nbody {i}\r\n.\r\n".encode())
            r = c.reply()
            assert r.code == 250
            ids.append(r.text.rsplit(" ", 1)[1])
    relay.kill()
    relay.start()
    assert sorted(p.name for p in relay.queued()) == sorted(ids)


def test_ipv6_listener(tmp_path: Path) -> None:
    ci.require(socket.has_ipv6, "no IPv6")
    port, port4 = free_port("::1"), free_port()
    r = RelayProcess(tmp_path, overrides={"listen": [
        {"address": f"[::1]:{port}", "mode": "smtp"},
        {"address": f"127.0.0.1:{port4}", "mode": "submission"}]})
    r.ports = {"submission": port4}  # wait_ready probes IPv4; IPv6 is checked by hand below
    r.start()
    try:
        with socket.create_connection(("::1", port), timeout=10) as s:
            assert s.recv(100).startswith(b"220 ")
            s.sendall(b"EHLO v6.example\r\nMAIL FROM:<a@remote.example>\r\n"
                      b"RCPT TO:<x@local.test>\r\nQUIT\r\n")
            data = b""
            while not data.endswith(b"closing connection\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert b"250 2.1.5" in data
        assert "[::1]" in r.maillog()
    finally:
        r.stop()


def test_json_maillog(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory(start=False)
    r.start(extra_args=("--log-format", "json"))
    with RawClient(r.ports["smtp"]) as c:
        c.reply()
        c.cmd("EHLO a.example")
        c.cmd("MAIL FROM:<a@remote.example>")
        assert c.cmd("RCPT TO:<x@remote.example>").code == 550
    r.stop()
    records = [json.loads(line) for line in r.maillog().splitlines() if line.startswith("{")]
    rejects = [rec for rec in records if "reject" in rec]
    assert rejects and rejects[0]["reject"].startswith("550 5.7.1 <x@remote.example>")
    assert all("queue_id" in rec for rec in records)


def test_json_maillog_names_the_process_of_each_line(relay_factory) -> None:  # noqa: ANN001
    """A text line names its process (`authrelay[PID]:`); a JSON line did not, so with
    several workers nothing told which one wrote it (a session's lines, a worker's last
    words before it died). Each record has "pid", the process that wrote it."""
    r: RelayProcess = relay_factory(workers=2, start=False)
    r.start(extra_args=("--log-format", "json"))
    assert r.proc is not None
    pid = r.proc.pid

    def children() -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def started_workers() -> int:
        return sum(json.loads(line).get("daemon") == "started (worker)"
                   for line in r.maillog().splitlines() if line.startswith("{"))

    # (ready means a port answers: on a loaded machine the second worker may come later)
    workers = wait_until(lambda: w if len(w := children()) == 2 else None,
                         lambda: f"two workers forked: {children()}")
    wait_until(lambda: started_workers() == 2, "both workers' start lines")
    r.stop()
    records = [json.loads(line) for line in r.maillog().splitlines() if line.startswith("{")]
    assert all(isinstance(rec.get("pid"), int) for rec in records), records
    started = {rec["pid"] for rec in records if rec.get("daemon") == "started (worker)"}
    assert started == workers
    connects = {rec["pid"] for rec in records if "connect" in rec}  # the start's probes
    assert connects and connects <= workers
    assert {rec["pid"] for rec in records if rec.get("daemon") == "started (master)"} == \
        {r.proc.pid}


def test_cert_make(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    r = subprocess.run([sys.executable, "-m", "authrelay", "cert", "make", "--hostname",
                        "mx.example.org", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mx.example.org" in names.get_values_for_type(x509.DNSName)
    again = subprocess.run([sys.executable, "-m", "authrelay", "cert", "make", "--hostname",
                            "mx.example.org", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 1  # never overwrites silently


def test_cert_make_in_a_shared_directory_writes_only_its_own_files(tmp_path: Path) -> None:
    # `cert make --out DIR` wrote the private key to DIR/key.tmp (O_CREAT|O_TRUNC, links
    # followed) and the certificate through DIR/cert.pem in place: in a directory others
    # may write to, a planted key.tmp link made root write the private key into its
    # target, and a dangling cert.pem link made root create the file it names.
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, out / "key.tmp")
    os.symlink(tmp_path / "made-by-root", out / "cert.pem")  # dangling
    r = subprocess.run([sys.executable, "-m", "authrelay", "cert", "make", "--hostname",
                        "mx.example.org", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "made-by-root").exists()
    for name, mode in (("key.pem", 0o600), ("cert.pem", 0o644)):
        st = os.lstat(out / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, name
    assert b"PRIVATE KEY" in (out / "key.pem").read_bytes()


def test_embedded_default_first_start(tmp_path: Path) -> None:
    """`authrelay serve` with no config: ./var, self-signed cert, dev ports on loopback."""
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    notify = NotifySocket(tmp_path / "notify")
    log = tmp_path / "serve.log"
    with ports.dev_ports(), log.open("wb") as out:  # the embedded default's fixed ports
        p = subprocess.Popen([sys.executable, "-m", "authrelay", "serve"], cwd=tmp_path,
                             env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            def alive() -> None:
                assert p.poll() is None, f"serve exited {p.returncode}: {log.read_text()}"

            # READY=1 from this process: its listeners are bound (only free addresses are).
            assert notify.wait_for("READY=1", check=alive) == p.pid
            assert (tmp_path / "var" / "tls" / "cert.pem").exists()
            assert stat.S_IMODE(os.stat(tmp_path / "var").st_mode) == 0o711
            with RawClient(2587) as c:
                assert c.reply().code == 220
                assert "STARTTLS" in repr(c.cmd("EHLO x.example"))
                assert c.cmd("STARTTLS").code == 220
                c.starttls(client_ctx())
                assert "AUTH PLAIN LOGIN" in repr(c.cmd("EHLO x.example"))
        finally:
            p.terminate()
            p.wait(timeout=30)
            notify.close()
    out = log.read_text()
    # It says it runs on the embedded default (an admin who meant /etc/... notices).
    assert "no config file found" in out and "running on the embedded default" in out


def test_auth_backend_down_is_454(relay_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """RFC 4954 6: a backend that cannot answer gives 454 4.7.0, never 535 or a hang."""
    r: RelayProcess = relay_factory({"auth": {"backend": f"saslauthd:{tmp_path}/no/mux",
                                              "backend_timeout": "2s"}}, users={})
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO laptop.example").code == 250
        rep = c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
        assert (rep.code, rep.lines[-1][4:9]) == (454, "4.7.0")
        assert c.cmd("NOOP").code == 250  # the session goes on
    assert "reject=454 4.7.0" in r.maillog()


def test_postmaster_without_domain_goes_to_first_local_domain(relay: RelayProcess) -> None:
    with RawClient(relay.ports["smtp"]) as c:
        assert c.reply().code == 220
        c.cmd("EHLO a.example")
        assert c.cmd("MAIL FROM:<x@remote.example>").code == 250
        assert c.cmd("RCPT TO:<PostMaster>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: pm\r\n\r\nhi\r\n.\r\n")
        assert c.reply().code == 250
    relay.wait_for(lambda: len(relay.queued()) == 1)
    raw = relay.queued()[0].read_bytes()
    env = json.loads(raw.split(b"\n", 2)[1])
    assert [r["address"] for r in env["recipients"]] == ["postmaster@local.test"]


def test_disconnect_line_counts_commands(relay: RelayProcess) -> None:
    with RawClient(relay.ports["smtp"]) as c:
        c.reply()
        c.cmd("EHLO a.example")
        c.cmd("NOOP")
        c.cmd("NOOP")
        c.cmd("BOGUS")
        c.cmd("QUIT")
    relay.wait_for(lambda: "commands=" in relay.maillog())
    line = next(ln for ln in relay.maillog().splitlines() if "commands=" in ln)
    assert "commands=ehlo=1 noop=2 unknown=1 quit=1" in line


def test_helo_name_control_characters_never_reach_the_received_field(
        relay: RelayProcess) -> None:
    """The EHLO name is written into our Received field: a NUL or ESC there became part
    of the stored message (NUL is refused in the body, 554 5.6.0), and a TAB let the
    client forge the field's "from" clause. TAB separates like SP (501); any other
    non-printable character is stored as "?" (as Postfix's printable())."""
    with RawClient(relay.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220
        r = c.cmd("EHLO laptop.example\t(mail.forged.example\t[192.0.2.1])")
        assert (r.code, r.text) == (501, "5.5.4 Syntax: EHLO hostname")
        r = c.cmd("EHLO lap\x00top\x1b[31m\x7f.example")
        assert r.code == 250 and r.lines[0] == "250-relay.test greets lap?top?[31m?.example"
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
        assert c.cmd("DATA").code == 354
        assert c.cmd("Subject: helo\r\n\r\nbody\r\n.").code == 250
    [path] = relay.queued()
    stored = relay.message_bytes(path)
    received = stored[:stored.index(b"\r\n\tby ")]
    assert received.startswith(b"Received: from lap?top?[31m?.example (")
    assert not any(b < 0x20 and b not in b"\t\r\n" or b == 0x7f for b in stored), stored


def _greeted_and_stored(relay: RelayProcess, helo: str) -> tuple[str, bytes]:
    """EHLO `helo` on port 25, a message to a local user: the reply's first line and the
    message as stored."""
    before = set(relay.queued())
    with RawClient(relay.ports["smtp"]) as c:
        assert c.reply().code == 220
        r = c.cmd(f"EHLO {helo}")
        assert r.code == 250
        assert c.cmd("MAIL FROM:<someone@remote.example>").code == 250
        assert c.cmd("RCPT TO:<bob@local.test>").code == 250
        assert c.cmd("DATA").code == 354
        assert c.cmd("Subject: helo\r\n\r\nbody\r\n.").code == 250
    [path] = set(relay.queued()) - before
    return r.lines[0], relay.message_bytes(path)


def test_a_helo_name_cannot_change_the_structure_of_the_received_field(
        relay: RelayProcess) -> None:
    """The EHLO name went into our Received field with its "(", ")", ";" and "\\": an
    unclosed "(" made the rest of the field (the by-clause, the client's [address], the
    date) one comment to a parser, and a ";" put the date where the tokens are. Those
    characters, and Postfix's other NEUTER_CHARACTERS, are stored as "?" (":" is kept)."""
    first, stored = _greeted_and_stored(relay, 'mail.example(x)"<y>;z@w\\(')
    assert first == "250-relay.test greets mail.example?x???y??z?w??"
    assert stored.startswith(b"Received: from mail.example?x???y??z?w?? (unknown [127.0.0.1])")
    first, stored = _greeted_and_stored(relay, "[IPv6:::1]")
    assert first == "250-relay.test greets [IPv6:::1]"
    assert stored.startswith(b"Received: from [IPv6:::1] (unknown [127.0.0.1])")


def test_a_non_ascii_helo_name_never_makes_a_7bit_message_8bit(relay: RelayProcess) -> None:
    """A UTF-8 EHLO name (RFC 6531 3.7.1: the client MUST send LDH labels or A-labels)
    went raw into the EHLO reply (RFC 5321 4.2: reply text is ASCII) and into our
    Received field: a 7-bit message got an 8-bit header (RFC 6531 3.7.3: the trace
    fields of a message sent without SMTPUTF8 conform to RFC 5321), which a next hop
    without 8BITMIME cannot take (bounced 554 5.6.3: a header cannot be downgraded).
    Each non-ASCII character is stored as "?", as a control character is."""
    first, stored = _greeted_and_stored(relay, "b\u00fccher.example")
    assert first == "250-relay.test greets b?cher.example"
    assert stored.startswith(b"Received: from b?cher.example (")
    assert stored.isascii(), stored
