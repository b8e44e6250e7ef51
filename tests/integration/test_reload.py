"""SIGHUP applies what it says: a changed smart host is used by the next delivery, and a
key that needs a restart is named in the maillog (`reload: KEY needs a restart`) at every
reload until the restart, while the running value stays in use."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, client_ctx, plain

pytestmark = pytest.mark.slow


def _submit(r: RelayProcess, subject: str) -> None:
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220
        c.cmd("EHLO t")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(f"Subject: {subject}\r\n\r\nx\r\n.\r\n".encode())
        assert c.reply().code == 250


def _reload(r: RelayProcess, data: dict, processes: int) -> None:
    r.config.write_text(to_toml(data))
    before = r.maillog().count("daemon=reloaded")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + processes)


@pytest.mark.parametrize("workers", [1, 2])
def test_smart_host_change_applies_and_restart_keys_are_named(relay_factory, fake_mx,
                                                              workers: int) -> None:
    a, b = fake_mx("127.0.0.2"), fake_mx("127.0.0.3")
    r = relay_factory(workers=workers, overrides={
        "relay": {"smart_host": [a.address], "smart_host_tls": "none"},
        "delivery": {"retry": ["1s"]}})
    processes = workers + 1 if workers > 1 else 1
    r.wait_for(lambda: r.maillog().count("daemon=started") >= processes)
    _submit(r, "to A")
    r.wait_for(lambda: len(a.messages) == 1, timeout=20)
    data = dict(r.config_data)
    data["relay"] = {**data["relay"], "smart_host": [b.address]}
    data["auth"] = {**data["auth"], "cache_ttl": "1m"}  # restart-only
    _reload(r, data, processes)
    _submit(r, "to B")
    r.wait_for(lambda: len(b.messages) == 1, timeout=20)
    assert len(a.messages) == 1
    log = r.maillog()
    assert log.count("warning=reload: auth.cache_ttl needs a restart") == 1
    assert "relay.smart_host needs a restart" not in log
    # Still not applied: said again at the next reload (once, by the master).
    _reload(r, data, processes)
    assert r.maillog().count("warning=reload: auth.cache_ttl needs a restart") == 2


@pytest.mark.root
@pytest.mark.parametrize("workers", [1, 2])
def test_a_root_only_config_reloads_after_the_drop(reachable_dir, workers: int) -> None:  # noqa: ANN001
    """The config holds a database password, so docs/SCALING.md says 0600 root; the
    daemon runs as `user`. SIGHUP re-read it as that user: `cannot read: Permission
    denied`, nothing applied (not even a renewed certificate) until a restart. Now the
    root key helper hands it over; a broken file is still refused, saying why."""
    from privpython import python_for
    from support.privileges import TEST_USER, unprivileged_user

    unprivileged_user()
    r = RelayProcess(reachable_dir, {"user": TEST_USER}, workers=workers)
    r.python = python_for(TEST_USER)
    r.config.chmod(0o600)
    r.start()
    processes = workers + 1 if workers > 1 else 1
    try:
        r.wait_for(lambda: r.maillog().count("daemon=started") >= processes)
        data = dict(r.config_data)
        data["limits"] = {"max_recipients": 1}
        _reload(r, data, processes)
        r.config.chmod(0o600)
        for _ in range(2 * processes):  # each worker applied it
            with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
                c.reply()
                c.cmd("EHLO t")
                assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
                assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
                assert c.cmd("RCPT TO:<a@remote.example>").code == 250
                assert c.cmd("RCPT TO:<b@remote.example>").code == 452
        assert "reload failed" not in r.maillog()
        r.config.write_text("limits = [\n")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGHUP)
        line = r.wait_log(r"daemon=reload failed, keeping the running config")
        assert "not valid TOML" in line, line
        # Past the helper's bound (1 MiB) the file is refused whole: it was cut there, and
        # a cut file may still parse, without the keys after the cut.
        r.config.write_text(to_toml(data) + "# padding\n" * 120_000)
        r.config.chmod(0o600)
        os.kill(r.proc.pid, signal.SIGHUP)
        r.wait_for(lambda: r.maillog().count("daemon=reload failed") >= 2)
        assert "larger than 1048576 bytes" in r.maillog().split("not valid TOML")[-1]
    finally:
        r.stop()


def test_a_large_config_reaches_every_worker(relay_factory) -> None:  # noqa: ANN001
    """The master hands a reload to its workers whatever the config's size: it went as one
    datagram on their socketpair, which the kernel caps at the socket's send buffer
    (net.core.wmem_max: ~416 KiB on a stock kernel, 8 MiB here), so a larger file was
    applied by the master only ('worker N missed the reload: Message too long') and every
    worker kept the old config and certificate until a restart. 9 MiB of comments pass
    this machine's cap."""
    r = relay_factory(workers=2)
    r.wait_for(lambda: r.maillog().count("daemon=started") >= 3, what="started")
    data = dict(r.config_data)
    data["hostname"] = "renamed.test"
    pad = "# " + "x" * 1021 + "\n"
    r.config.write_text(to_toml(data) + pad * (9 * 1024))
    before = r.maillog().count("daemon=reloaded")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + 3
               or "missed the reload" in r.maillog(), what="reloaded everywhere")
    assert "missed the reload" not in r.maillog()
    for _ in range(6):  # connections land on either worker
        with RawClient(r.ports["submission"]) as c:
            assert "renamed.test" in c.reply().text


def test_a_session_after_a_reload_gets_the_new_config_on_a_listener_already_used(
        relay_factory) -> None:  # noqa: ANN001
    """A listener's session dependencies (the config among them) are made once and kept
    until a reload: sessions before it greet with the old hostname, every session after
    it with the new one, on both workers."""
    r = relay_factory(workers=2)
    r.wait_for(lambda: r.maillog().count("daemon=started") >= 3, what="started")
    for _ in range(6):  # connections land on either worker
        with RawClient(r.ports["submission"]) as c:
            assert "renamed.test" not in c.reply().text
    data = dict(r.config_data)
    data["hostname"] = "renamed.test"
    _reload(r, data, 3)
    for _ in range(6):
        with RawClient(r.ports["submission"]) as c:
            assert "renamed.test" in c.reply().text


def test_a_fifo_named_as_the_config_is_refused_at_once(relay_factory) -> None:  # noqa: ANN001
    """The master read the config on SIGHUP with a blocking open() and no bound: a FIFO
    (or a device) in the file's place held the reading thread until something wrote to
    it, so every later reload waited behind it and nothing more was applied. Now a file
    that is not a regular file is refused at once, the running config kept, and the next
    SIGHUP with a real file again applies."""
    r = relay_factory(workers=1)
    r.wait_for(lambda: "daemon=started" in r.maillog(), what="started")
    data = dict(r.config_data)
    r.config.unlink()
    os.mkfifo(r.config)
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    line = r.wait_log(r"daemon=reload failed, keeping the running config")
    assert "not a regular file" in line, line
    r.config.unlink()
    data["hostname"] = "renamed.test"
    _reload(r, data, 1)
    with RawClient(r.ports["submission"]) as c:
        assert "renamed.test" in c.reply().text


def test_a_sighup_during_the_start_is_applied_once_the_relay_is_up(relay_factory
                                                                   ) -> None:  # noqa: ANN001
    """serve ignored SIGHUP from reading its config until its event loop was up (binding,
    forking the workers, recovering the queue): a config edited, a certificate renewed or
    a maillog rotated (logrotate's kill -HUP) in that time went unseen until the next
    SIGHUP. Now it is remembered and the reload is done once the relay is up. The start is
    held where it reads the TLS key (a FIFO) while the config changes and SIGHUP comes."""
    r = relay_factory(workers=2, start=False)
    tls = r.tmp / "tls"
    tls.mkdir()
    assert r.cli("cert", "make", "--hostname", "relay.test", "--out", str(tls)).returncode == 0
    key, real = tls / "key.pem", tls / "key.real"
    key.rename(real)
    os.mkfifo(key, 0o600)
    data = dict(r.config_data)
    data["tls"] = {"cert": str(tls / "cert.pem"), "key": str(key)}
    r.config.write_text(to_toml(data))
    r.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
    with open(r.log, "ab") as logf:
        r.proc = subprocess.Popen(
            [r.python, "-m", "authrelay", "-c", str(r.config), "serve"],
            stdout=logf, stderr=subprocess.STDOUT)
    # The start is in read_pem once the FIFO has its reader: opening it for writing
    # without blocking succeeds then (ENXIO before).
    wfd = r.wait_for(lambda: _open_writer(key), what="the start reading the key")
    try:
        data["hostname"] = "renamed.test"
        r.config.write_text(to_toml(data))
        os.kill(r.proc.pid, signal.SIGHUP)
        # The next reads of the key (the reload) find a regular file.
        os.rename(real, key)
        os.write(wfd, key.read_bytes())
    finally:
        os.close(wfd)
    r.wait_ready()
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= 3, what="reloaded everywhere")
    assert r.proc.poll() is None
    for _ in range(6):  # connections land on either worker
        with RawClient(r.ports["submission"]) as c:
            assert "renamed.test" in c.reply().text


def _open_writer(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_that_fails_changes_nothing(relay_factory, tmp_path: Path,
                                             workers: int) -> None:  # noqa: ANN001
    """A reload refused by the outbound part (a smart_host_ca_file that is not there: the
    new courier cannot be built) was logged `reload failed, keeping the running config`
    after the new TLS context, limits, hostname and scheduler settings had already been
    put in place: half the new config ran, and the master's and workers' halves differed.
    Now everything that can refuse the config is built before anything is replaced."""
    r = relay_factory(workers=workers)
    processes = workers + 1 if workers > 1 else 1
    r.wait_for(lambda: r.maillog().count("daemon=started") >= processes, what="started")
    data = dict(r.config_data)
    data["hostname"] = "renamed.test"
    data["relay"] = {**data["relay"], "smart_host_ca_file": str(tmp_path / "missing.pem")}
    r.config.write_text(to_toml(data))
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    line = r.wait_log(r"daemon=reload failed, keeping the running config")
    assert "missing.pem" in line, line
    for _ in range(6):  # connections land on either worker
        with RawClient(r.ports["submission"]) as c:
            assert "relay.test" in c.reply().text
    # The next good reload applies, in every process.
    del data["relay"]["smart_host_ca_file"]
    _reload(r, data, processes)
    for _ in range(6):
        with RawClient(r.ports["submission"]) as c:
            assert "renamed.test" in c.reply().text


def _proxied_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 5000 25\r\n")
        try:
            return s.recv(200)
        except ConnectionResetError:
            return b""


def test_a_reload_never_leaves_a_proxy_listener_without_its_proxies(relay_factory
                                                                    ) -> None:  # noqa: ANN001
    """Leaving HAProxy: the file drops `proxy_protocol` from [[listen]] (needs a restart,
    so the running listener still takes PROXY headers) and `relay.proxy_trusted` with it
    (reloadable). The reload applied that mix, which a file may not hold: every connection
    through the balancer was closed `PROXY header refused: not a trusted proxy` until the
    restart, after a `daemon=reloaded`. Now such a reload fails naming the rule and the
    kept key, and the old config stays in every process."""
    r = relay_factory(workers=2, start=False)
    data = dict(r.config_data)
    data["listen"] = [dict(ln, proxy_protocol=ln["mode"] == "smtp") for ln in data["listen"]]
    data["relay"] = {**data["relay"], "proxy_trusted": ["127.0.0.1/32"]}
    r.config_data = data
    r.config.write_text(to_toml(data))
    r.start()
    r.wait_for(lambda: r.maillog().count("daemon=started") >= 3, what="started")
    assert _proxied_greeting(r.ports["smtp"]).startswith(b"220 ")
    new = dict(data)
    new["listen"] = [dict(ln, proxy_protocol=False) for ln in data["listen"]]
    new["relay"] = {k: v for k, v in data["relay"].items() if k != "proxy_trusted"}
    new["hostname"] = "renamed.test"
    r.config.write_text(to_toml(new))
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    line = r.wait_log(r"daemon=reload failed, keeping the running config")
    assert "proxy_protocol: needs relay.proxy_trusted" in line, line
    assert "the running listen" in line, line
    for _ in range(6):  # connections land on either worker
        assert _proxied_greeting(r.ports["smtp"]).startswith(b"220 relay.test")
    assert "daemon=reloaded" not in r.maillog()


def test_new_nameservers_reach_the_host_checks(relay_factory) -> None:  # noqa: ANN001
    """`[delivery] nameservers` and `dns_timeout` are also what the DNSBL and reverse DNS
    checks ask; a reload rebuilt the checks only when `[checks]` changed, so the workers
    went on asking the old servers (a resolver being retired, or one answering from a
    stale blocklist) while deliveries used the new ones. Now a change of either key gives
    every worker new host checks."""
    from fakes.dnsserver import FakeDNSServer
    from test_limits import Client

    old = FakeDNSServer({"42.5.0.127.bl.test": {"A": ["127.0.0.2"]}}).start()
    new = FakeDNSServer({}).start()
    try:
        r = relay_factory(workers=2, overrides={
            "checks": {"dnsbl": ["bl.test"]},
            "delivery": {"nameservers": [old.nameserver], "dns_timeout": "3s"},
            "limits": {"connection_rate_per_ip": 0}})
        r.wait_for(lambda: r.maillog().count("daemon=started") >= 3, what="started")

        def rcpt() -> int:
            with Client(r.ports["smtp"], "127.0.5.42") as c:
                greeting = c.reply()
                if greeting.code != 220:
                    return greeting.code
                c.cmd("EHLO host.test")
                if (code := c.cmd("MAIL FROM:<a@remote.test>").code) != 250:
                    return code
                return c.cmd("RCPT TO:<x@local.test>").code

        assert [rcpt() for _ in range(4)].count(250) == 0  # listed on the old server
        data = dict(r.config_data)
        data["delivery"] = {**data["delivery"], "nameservers": [new.nameserver]}
        _reload(r, data, 3)
        assert [rcpt() for _ in range(6)] == [250] * 6  # either worker asks the new one
    finally:
        old.stop()
        new.stop()


@pytest.mark.root
def test_the_smart_host_password_is_the_running_configs(reachable_dir: Path, fake_mx,
                                                         trustme_ca) -> None:  # noqa: ANN001
    """Privileges dropped: the root key helper reads the smart host password for every
    connection, and it took the password file from the config file as it was at that
    moment, not from the config running. A file being edited (not yet reloaded) sent its
    new password to the running smart host; a file whose reload had been refused left
    the helper unable to load it at all, so every delivery was deferred while the old
    config, the maillog said, was kept. Now the helper serves the running config's file:
    the one at start, then each reload's; and a reload refused after the helper was
    asked for the key (the new courier could not be built) is refused before it."""
    from privpython import python_for
    from support.certs import server_tls_context
    from support.privileges import TEST_USER, unprivileged_user

    unprivileged_user()
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 require_starttls=True, users={"relayuser": "pw-one"})
    ca = reachable_dir / "ca.pem"
    trustme_ca.cert_pem.write_to_path(str(ca))
    ca.chmod(0o644)
    pw1, pw2 = reachable_dir / "one.pw", reachable_dir / "two.pw"
    for f, text in ((pw1, "pw-one\n"), (pw2, "pw-two\n")):
        f.write_text(text)
        f.chmod(0o600)  # root's: only the key helper reads it
    r = RelayProcess(reachable_dir, {
        "user": TEST_USER,
        "relay": {"smart_host": [sh.address], "smart_host_tls": "starttls",
                  "smart_host_user": "relayuser", "smart_host_password_file": str(pw1),
                  "smart_host_ca_file": str(ca)},
        "delivery": {"retry": ["1s"], "max_idle_connections": 0}})
    r.python = python_for(TEST_USER)
    r.config.chmod(0o600)
    r.start()
    try:
        r.wait_for(lambda: "daemon=started" in r.maillog(), what="started")
        _submit(r, "one")
        r.wait_for(lambda: len(sh.messages) == 1, timeout=20, what="first delivery")
        data = dict(r.config_data)
        # Being edited, not reloaded: the running password is still the one sent.
        data["relay"] = {**data["relay"], "smart_host_password_file": str(pw2)}
        r.config.write_text(to_toml(data))
        _submit(r, "two")
        r.wait_for(lambda: len(sh.messages) == 2, timeout=20, what="delivery while edited")
        # A reload refused: the running config (and its password) still delivers.
        r.config.write_text(to_toml(data) + "bogus = 1\n")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGHUP)
        r.wait_log(r"daemon=reload failed, keeping the running config")
        _submit(r, "three")
        r.wait_for(lambda: len(sh.messages) == 3, timeout=20, what="delivery after a refusal")
        # Refused by the courier (its CA file is not there), after the file parsed: the
        # helper had already taken the file as the running one when asked for the key.
        data["relay"] = {**data["relay"], "smart_host_ca_file": str(reachable_dir / "no.pem")}
        r.config.write_text(to_toml(data))
        os.kill(r.proc.pid, signal.SIGHUP)
        r.wait_for(lambda: r.maillog().count("daemon=reload failed") == 2, what="refused")
        _submit(r, "four")
        r.wait_for(lambda: len(sh.messages) == 4, timeout=20, what="delivery after a refusal")
        assert sh.auth_attempts == [("relayuser", True)] * 4
    finally:
        r.stop()


def test_the_tls_reporter_takes_the_new_hostname_and_nameservers(relay_factory, fake_mx
                                                                  ) -> None:  # noqa: ANN001
    """README's reload table applies `hostname` and `[delivery] nameservers` / dns_timeout,
    but the TLS-RPT reporter (RFC 8460) kept the ones it was built with at start: after a
    move to new nameservers it asked the retired ones for `_smtp._tls` records (reports
    held back while they failed), and its reports named the old host as organization and
    submitter. Now a reload gives it both, and a run starts at once."""
    from fakes.dnsserver import FakeDNSServer

    old = FakeDNSServer({"_smtp._tls.sts.test": "SERVFAIL"}).start()
    new = FakeDNSServer({
        "_smtp._tls.sts.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"]}
    }).start()
    try:
        mx = fake_mx("127.0.0.2")  # the smart host: where the queued report goes
        r = relay_factory(start=False, overrides={
            "relay": {"smart_host": [mx.address]},
            "delivery": {"tls_reports": True, "nameservers": [old.nameserver],
                         "dns_timeout": "2s", "retry": ["1s"]}})
        # Yesterday's tally (a finished day): reported at the reporter's next run.
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
        (r.state / "tls-rpt").mkdir(parents=True, exist_ok=True)
        (r.state / "tls-rpt" / f"{day}.json").write_text(
            '{"sts.test": {"[\\"no-policy-found\\", [], []]": [3, {}]}}')
        r.start()
        r.wait_for(lambda: ("_smtp._tls.sts.test", "TXT") in old.queries,
                   what="the start-up run asking the old nameserver")
        data = dict(r.config_data)
        data["hostname"] = "renamed.test"
        data["delivery"] = {**data["delivery"], "nameservers": [new.nameserver]}
        _reload(r, data, 1)
        r.wait_for(lambda: mx.messages, what="the report, after the reload", timeout=30)
        [report] = mx.messages
        assert report.rcpt_tos == ["tlsrpt@reports.test"]
        assert b"TLS-Report-Submitter: renamed.test" in report.content
        assert b"Submitter: relay.test" not in report.content
    finally:
        old.stop()
        new.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dkim_problem_is_one_line_per_start_and_per_reload(relay_factory,
                                                             workers: int) -> None:  # noqa: ANN001
    """Every part of every process has its own DKIM signer (the receiving submitter, the
    scheduler's, local submission's, the courier's; one set per worker), and each wrote
    the keys' problems: one missing key was 4-5 identical lines at start and 3-4 at each
    SIGHUP. Now the scheduler's signer alone reports: one line per problem, each time."""
    r = relay_factory(workers=workers, overrides={"dkim": {"domains": ["nokey.test"]}})
    processes = workers + 1 if workers > 1 else 1
    r.wait_for(lambda: r.maillog().count("daemon=started") >= processes, what="started")
    problem = "dkim=warning, problem=dkim.domains: nokey.test has no key"
    assert r.maillog().count(problem) == 1
    _reload(r, dict(r.config_data), processes)
    _reload(r, dict(r.config_data), processes)
    # Every process logged "reloaded" after it re-read the keys: nothing more to come.
    assert r.maillog().count(problem) == 3


def test_a_wait_longer_than_attempt_timeout_is_one_line_per_start_and_reload(
        relay_factory) -> None:
    """A config of the release before [delivery] attempt_timeout (1h by default) giving a
    slow next hop two hours for the end of data: that wait is now cut at the hour (the
    message sent again at each next attempt) and serve said nothing. One maillog warning
    at start and at each reload while it holds (the master's, not the workers'); none
    once attempt_timeout is raised."""
    r = relay_factory(workers=2, overrides={"delivery": {"data_timeout": "2h"}})
    r.wait_for(lambda: r.maillog().count("daemon=started") >= 3)
    line = "warning=delivery.attempt_timeout: 3600s is shorter than delivery.data_timeout " \
           "(7200s): the attempt's end cuts that wait at 3600s"
    assert r.maillog().count(line) == 1, r.maillog()[-3000:]
    data = dict(r.config_data)
    _reload(r, data, 3)
    assert r.maillog().count(line) == 2, r.maillog()[-3000:]
    data["delivery"] = {**data["delivery"], "attempt_timeout": "3h"}
    _reload(r, data, 3)
    assert r.maillog().count(line) == 2
    assert r.maillog().count("warning=delivery.attempt_timeout") == 2
