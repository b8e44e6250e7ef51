"""PROXY protocol on real listeners (`[[listen]] proxy_protocol`, `[relay] proxy_trusted`).

A real authrelay process; this test plays the load balancer from 127.0.0.1 (trusted) and
an outsider from 127.0.0.2. The header's source address is the client's for admission,
AUTH lockouts, the maillog and Received:; a missing, malformed, late or untrusted header
closes the connection with a maillog line; a TCP health check (connect, close) is silent;
listeners without proxy_protocol never read a header.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess
from smtpclient import client_ctx, plain, proxied

from authrelay.config import from_dict
from authrelay.smtpd.admission import PROXY_READS_MIN, REFUSAL_LINES
from authrelay.smtpd.proxy import build_v1, build_v2

pytestmark = pytest.mark.slow


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = _behind_a_balancer(RelayProcess(
        tmp_path, {"relay": {"proxy_trusted": ["127.0.0.1/32"]},
                   "limits": {"proxy_timeout": "1s"},
                   "auth": {"max_failures_per_ip": 2, "failure_delay": 0.05}}))
    r.start()
    yield r
    r.stop()


def _behind_a_balancer(r: RelayProcess) -> RelayProcess:
    """submission and submissions behind the balancer; smtp (port 25 style) without."""
    r.config_data["listen"] = [
        {"address": f"127.0.0.1:{r.ports['smtp']}", "mode": "smtp"},
        {"address": f"127.0.0.1:{r.ports['submission']}", "mode": "submission",
         "proxy_protocol": True},
        {"address": f"127.0.0.1:{r.ports['submissions']}", "mode": "submissions",
         "proxy_protocol": True},
    ]
    from relayproc import to_toml

    r.config.write_text(to_toml(r.config_data))
    return r


def dst(r: RelayProcess, mode: str) -> tuple[str, int]:
    return ("127.0.0.1", r.ports[mode])


def test_v2_source_is_the_client_everywhere(relay: RelayProcess) -> None:
    port = relay.ports["submissions"]
    with proxied(port, build_v2(("192.0.2.50", 40000), dst(relay, "submissions")),
                 tls=client_ctx()) as c:
        assert c.reply().code == 220
        c.cmd("EHLO client.test")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        assert c.cmd("RCPT TO:<bob@example.org>").code == 250
        assert c.cmd("DATA").code == 354
        assert c.cmd("Subject: hi\r\n\r\nhello\r\n.").code == 250
        c.cmd("QUIT")
    relay.wait_for(lambda: relay.queued() != [])
    msg = relay.message_bytes(relay.queued()[0])
    received = msg.split(b"\r\n\r\n", 1)[0]
    assert b"[192.0.2.50]" in received and b"127.0.0.1" not in received
    log = relay.maillog()
    assert "[192.0.2.50]" in log
    assert "PROXY" not in log  # nothing refused


def test_v1_on_starttls_listener(relay: RelayProcess) -> None:
    port = relay.ports["submission"]
    with proxied(port, build_v1(("198.51.100.23", 5555), dst(relay, "submission"))) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx())
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
    assert "[198.51.100.23]" in relay.maillog()


def test_header_and_client_hello_in_one_segment(relay: RelayProcess) -> None:
    port = relay.ports["submissions"]
    with proxied(port, build_v2(("192.0.2.51", 1), dst(relay, "submissions")),
                 tls=client_ctx(), tls_same_segment=True) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO client.test").code == 250
    assert "[192.0.2.51]" in relay.maillog()


def test_lockout_is_per_client_not_per_balancer(relay: RelayProcess) -> None:
    port = relay.ports["submissions"]

    def auth(src: str, password: str) -> str:
        with proxied(port, build_v2((src, 1000), dst(relay, "submissions")),
                     tls=client_ctx()) as c:
            c.reply()
            c.cmd("EHLO client.test")
            r = c.cmd(f"AUTH PLAIN {plain('alice', password)}")
            return f"{r.code} {r.text}"

    assert auth("192.0.2.60", "wrong").startswith("535")
    assert auth("192.0.2.60", "wrong").startswith("535")
    assert auth("192.0.2.60", PASSWORD).startswith("454 4.7.0")  # that address is locked
    assert auth("192.0.2.61", PASSWORD).startswith("235")  # another client behind it: not
    assert auth("192.0.2.62", "wrong").startswith("535")


def refused(relay: RelayProcess, reason: str, n: int = 1) -> None:
    relay.wait_for(lambda: relay.maillog().count(reason) >= n)


def test_missing_or_malformed_header_closes(relay: RelayProcess) -> None:
    port = relay.ports["submission"]
    with proxied(port, b"EHLO client.test\r\n") as c:  # a client talking directly
        assert c.closed()
    refused(relay, "PROXY header refused: no PROXY header")
    with proxied(port, b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n") as c:
        assert c.closed()
    refused(relay, "PROXY header refused: bad port")
    # a zoned IPv6 spelling of loopback (inside ::1/128 to ipaddress): not an address
    with proxied(port, b"PROXY TCP6 ::1%lo 2001:db8::2 1 2\r\n") as c:
        assert c.closed()
    refused(relay, "PROXY header refused: bad address '::1%lo'")
    with proxied(relay.ports["submissions"], b"\x16\x03\x01\x00\x05hello") as c:
        assert c.closed()  # a TLS client straight at 465: no handshake at all
    refused(relay, "PROXY header refused: no PROXY header", 2)
    line = [ln for ln in relay.maillog().splitlines() if "bad port" in ln][0]
    assert "relay=unknown [127.0.0.1]" in line and "listener=submission:" in line


def test_late_header_times_out(relay: RelayProcess) -> None:
    with proxied(relay.ports["submission"], b"PROXY TCP4 192.0.2.1") as c:
        t0 = time.monotonic()
        assert c.closed(timeout=10)
        assert time.monotonic() - t0 < 9
    refused(relay, "no complete PROXY header in time")


def test_untrusted_peer_is_closed(relay: RelayProcess) -> None:
    header = build_v2(("192.0.2.70", 1), dst(relay, "submission"))
    with proxied(relay.ports["submission"], header, source="127.0.0.2") as c:
        assert c.closed()
    refused(relay, "not a trusted proxy")
    assert "relay=unknown [127.0.0.2]" in relay.maillog()
    assert "192.0.2.70" not in relay.maillog()  # its claim is never believed


def test_health_checks(relay: RelayProcess) -> None:
    before = relay.maillog()
    for _ in range(3):  # connect and close: silent
        socket.create_connection(("127.0.0.1", relay.ports["submission"])).close()
    with proxied(relay.ports["submission"], build_v2(None)) as c:  # v2 LOCAL
        assert c.reply().code == 220  # served as the balancer itself
    with proxied(relay.ports["submission"], b"PROXY UNKNOWN\r\n") as c:
        assert c.reply().code == 220
    # A sentinel refused after them (accepted after them, on the same event loop): once its
    # line is written, a refusal of any health check above would have been written too.
    with proxied(relay.ports["submission"], b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n") as c:
        assert c.closed()
    refused(relay, "PROXY header refused: bad port")
    assert relay.maillog()[len(before):].count("PROXY header refused") == 1


def test_listener_without_proxy_protocol_reads_no_header(relay: RelayProcess) -> None:
    with proxied(relay.ports["smtp"], b"") as c:
        assert c.reply().code == 220  # greeted at once: no header awaited
        assert c.cmd("EHLO client.test").code == 250


@pytest.fixture
def redis_relay(tmp_path: Path) -> Iterator[RelayProcess]:
    from scalerig import RedisServer

    rs = RedisServer().start()
    r = RelayProcess(tmp_path, {"relay": {"proxy_trusted": ["127.0.0.1/32"]},
                                "limits": {"shared": rs.url},
                                "auth": {"max_failures_per_ip": 2, "failure_delay": 0.05}})
    r.ports = {"submission": r.ports["submission"]}
    r.config_data["listen"] = [
        {"address": f"127.0.0.1:{r.ports['submission']}", "mode": "submission",
         "proxy_protocol": True}]
    from relayproc import to_toml

    r.config.write_text(to_toml(r.config_data))
    try:
        r.start()
        yield r
    finally:
        r.stop()
        rs.cleanup()


def test_farm_lockout_counts_an_ipv6_client_by_its_prefix(redis_relay: RelayProcess) -> None:
    """With the AUTH windows in Redis, an IPv6 client is counted by its /64
    (`ipv6_prefix_length`) as without Redis: rotating addresses inside it gains nothing."""
    port = redis_relay.ports["submission"]

    def auth(src: str, password: str) -> str:
        with proxied(port, build_v1((src, 1000), ("2001:db8::25", 587))) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd("STARTTLS").code == 220
            c.starttls(client_ctx())
            c.cmd("EHLO client.test")
            r = c.cmd(f"AUTH PLAIN {plain('alice', password)}")
            return f"{r.code} {r.text}"

    assert auth("2001:db8:1:2::1", "wrong").startswith("535")
    assert auth("2001:db8:1:2::2", "wrong").startswith("535")
    # a third address of the same /64: locked, even with the right password
    assert auth("2001:db8:1:2::3", PASSWORD).startswith("454 4.7.0")
    assert auth("2001:db8:1:3::1", PASSWORD).startswith("235")  # another /64: not


def test_proxy_refusals_are_logged_within_the_refusal_budget(relay: RelayProcess
                                                             ) -> None:
    """PROXY refusals count in the listener's per-second budget of refusal lines, then
    one summary line (measured before: a 3,000-address flood through the balancer wrote
    one line per refused header, ~2,500 a second). Forty untrusted connections wait in
    the backlog of a stopped relay, so one accept batch refuses them all."""
    assert relay.proc is not None
    port = relay.ports["submission"]
    os.kill(relay.proc.pid, signal.SIGSTOP)
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=("127.0.0.2", 0))
                 for _ in range(40)]
    finally:
        os.kill(relay.proc.pid, signal.SIGCONT)
    try:
        log = relay.wait_log(r"refused \d+ more connections without a line each.*"
                             r"reasons=proxy_header:\d+")
        assert log.count("not a trusted proxy") <= REFUSAL_LINES
    finally:
        for s in socks:
            s.close()


def test_a_header_there_at_accept_is_served_past_a_flood_of_missing_ones(
        tmp_path: Path) -> None:
    """The reads of PROXY headers in flight are capped per listener (PROXY_READS_MIN);
    past the cap a connection was reset at accept, "too many PROXY headers pending",
    before its header was even looked at. Through one balancer a many-address flood
    filled that cap and left 1-2 of 16 real logins served. A header already there whole
    at accept (a balancer sends it at once) is now taken at once, outside the cap: here
    the cap is full of connections that send nothing, and a client whose header waits in
    the socket (the relay stopped while it connects) is greeted and logs in."""
    r = _behind_a_balancer(RelayProcess(tmp_path, {
        "relay": {"proxy_trusted": ["127.0.0.1/32"]}, "limits": {"proxy_timeout": "60s"}}))
    r.start()
    silent: list[socket.socket] = []
    try:
        port = r.ports["submission"]
        cap = max(PROXY_READS_MIN, from_dict({}).limits.max_connections)
        for _ in range(cap + 1):  # the cap full of reads waiting, and one past it
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        r.wait_log(r"too many PROXY headers pending")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGSTOP)
        try:
            c = proxied(port, build_v1(("192.0.2.44", 40001), dst(r, "submission")))
        finally:
            os.kill(r.proc.pid, signal.SIGCONT)
        assert c.reply().code == 220
        c.cmd("EHLO laptop.test")
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx())
        c.cmd("EHLO laptop.test")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        c.cmd("QUIT")
        c.close()
        r.wait_log(r"auth=ok, sasl_method=PLAIN, sasl_username=alice, "
                   r"relay=unknown \[192\.0\.2\.44\]")
    finally:
        for s in silent:
            s.close()
        r.stop()
