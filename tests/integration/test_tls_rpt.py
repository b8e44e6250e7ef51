"""TLS-RPT (RFC 8460) end to end: deliveries under an MTA-STS policy (real HTTPS server,
aiosmtpd MX with a good or a bad certificate) are tallied by the courier into
state_dir/tls-rpt/DAY.json; the next day the reporter looks up `_smtp._tls` (dnslib DNS
server) and queues one report through spool/submit.py; the queued message is read back
from the spool and checked: null sender, RFC 8460 5.3 headers, multipart/report with an
application/tlsrpt+gzip attachment whose JSON (4.4) counts what happened."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import time
from pathlib import Path

import pytest
import trustme
from fakes.dnsserver import FakeDNSServer
from fakes.policyserver import PolicyServer
from fakes.smtpserver import MXFactory
from support.maillog import ListLog
from test_delivery import make_cfg
from test_tls_levels import ctx_for
from test_tls_mtasts import (  # noqa: F401
    MX1,
    POLICY_HOST,
    Env,
    dns,
    env,
    https,
    policy,
    start_mx,
)

from authrelay import wiring
from authrelay.delivery.client import Courier
from authrelay.delivery.tlsrpt import PolicyDesc, Recorder, Reporter, parse_rua
from authrelay.dns import Resolver

pytestmark = pytest.mark.slow


def test_parse_rua() -> None:
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@r.test,mailto:b%40x@r.test"]) == \
        ["a@r.test"]  # b%40x@r.test decodes to two @: not an address
    assert parse_rua(["v=TLSRPTv1;rua=https://r.test/x,mailto:tls@r.test"]) == \
        ["tls@r.test"]  # https reporting is not used
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@r.test", "v=TLSRPTv1; rua=mailto:b@r"]) == []
    assert parse_rua(["v=spf1 -all"]) == []
    # Control bytes and what RFC 5321 has no place for never become a recipient: they
    # went to RCPT TO and to the report's To: field as they were.
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a%00b@r.test,mailto:c%01@r.test,"
                      "mailto:d%7F@r.test,mailto:(e)@r.test,mailto:ok.x@r.test"]) == \
        ["ok.x@r.test"]


@pytest.mark.root
async def test_daily_report_through_the_queue(
        env: Env, dns: FakeDNSServer, https: PolicyServer,  # noqa: F811
        fake_mx: MXFactory, trustme_ca: trustme.CA, tmp_path: Path) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce")
    dns.update({"_smtp._tls.sts.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"]}})
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    log = ListLog()
    courier = env.courier(log, tls_reports=True)
    try:
        res, _ = await env.deliver(courier=courier)
        assert res.ok and res.tls == "verified"
        res, _ = await env.deliver(courier=courier)  # the cached connection: no new session
        assert res.ok
        mx.stop()  # the next one finds a bad certificate: a failure to report
        start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
        await courier.close()
        res, _ = await env.deliver(courier=courier)
        assert res.enhanced == "4.7.5"
    finally:
        await courier.close()  # flushes the tally
    day = time.strftime("%Y-%m-%d", time.gmtime())
    tally = json.loads((tmp_path / "tls-rpt" / f"{day}.json").read_text())
    assert list(tally) == ["sts.test"]

    cfg = courier.cfg
    queue = wiring.spool(cfg)
    sub = wiring.submitter(cfg, queue, log)
    reporter = Reporter(cfg, courier.resolver, sub, log, clock=lambda: time.time())
    assert await reporter.send_due() == 0  # today is not over yet
    reporter.clock = lambda: time.time() + 86400
    assert await reporter.send_due() == 1
    assert not (tmp_path / "tls-rpt" / f"{day}.json").exists()  # sent once

    [qid] = queue.scan()
    envlp = queue.load(qid)
    assert envlp.sender == "" and [r.address for r in envlp.recipients] == \
        ["tlsrpt@reports.test"]
    path, offset = queue.body_path(qid)
    with open(path, "rb") as f:
        f.seek(offset)
        msg = email.message_from_bytes(f.read(), policy=email.policy.default)
    assert msg["TLS-Report-Domain"] == "sts.test"
    assert msg["TLS-Report-Submitter"] == "relay.test"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["Subject"].startswith("Report Domain: sts.test Submitter: relay.test Report-ID:")
    [att] = [p for p in msg.iter_attachments()
             if p.get_content_type() == "application/tlsrpt+gzip"]
    name = att.get_filename()
    assert name.startswith("relay.test!sts.test!") and name.endswith(".json.gz")
    report = json.loads(gzip.decompress(att.get_content()))
    assert report["date-range"]["start-datetime"] == f"{day}T00:00:00Z"
    [pol] = report["policies"]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["policy-domain"] == "sts.test"
    assert "mode: enforce" in pol["policy"]["policy-string"]
    assert pol["policy"]["mx-host"] == [MX1]
    assert pol["summary"] == {"total-successful-session-count": 1,
                              "total-failure-session-count": 1}
    [fail] = pol["failure-details"]
    assert fail["result-type"] == "certificate-not-trusted"
    assert fail["receiving-mx-hostname"] == MX1 and fail["receiving-ip"] == "127.0.0.2"
    assert fail["sending-mta-ip"] == "127.0.0.1"
    assert log.grep(qid, "from=<>")


async def test_no_rua_no_report(env: Env, dns: FakeDNSServer,  # noqa: F811
                                fake_mx: MXFactory, tmp_path: Path) -> None:
    start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    log = ListLog()
    courier = env.courier(log, tls_reports=True)
    try:
        res, _ = await env.deliver("nosts.test", courier=courier)
        assert res.ok
    finally:
        await courier.close()
    queue = wiring.spool(courier.cfg)
    reporter = Reporter(courier.cfg, courier.resolver, wiring.submitter(courier.cfg, queue, log),
                        log, clock=lambda: time.time() + 86400)
    assert await reporter.send_due() == 0
    assert queue.scan() == []
    assert not list((tmp_path / "tls-rpt").glob("*.json"))  # done with: removed


@pytest.mark.root
async def test_policy_fetch_failure_is_tallied(
        env: Env, dns: FakeDNSServer, fake_mx: MXFactory, tmp_path: Path) -> None:  # noqa: F811
    """A published policy behind an HTTPS certificate that does not verify: no policy for
    delivery (RFC 8461 5), and an sts-webpki-invalid failure for the report."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mta-sts.sts.test").configure_cert(ctx)
    srv = PolicyServer(ctx, POLICY_HOST).start()
    try:
        srv.policies["mta-sts.sts.test"] = policy("enforce")
        start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
        courier = env.courier(ListLog(), tls_reports=True)
        try:
            res, _ = await env.deliver(courier=courier)
        finally:
            await courier.close()
    finally:
        srv.stop()
    assert res.ok and res.tls_policy == "may"
    day = time.strftime("%Y-%m-%d", time.gmtime())
    tally = json.loads((tmp_path / "tls-rpt" / f"{day}.json").read_text())
    sts = [v for k, v in tally["sts.test"].items() if json.loads(k)[0] == "sts"]
    assert sts and any(k.startswith("sts-webpki-invalid|") for k in sts[0][1])


async def test_a_failing_domain_does_not_resend_the_others(
        env: Env, dns: FakeDNSServer, tmp_path: Path) -> None:  # noqa: F811
    """Attack: a domain the relay delivered to makes its `_smtp._tls` lookup SERVFAIL (its
    owner can, at will). The day's file was kept whole, so at every run (hourly) every
    other domain of that day got its report again, forever. Now only the failing domain
    stays; it gets its report once its lookup answers, and a day is given up after
    seven days (a maillog warning)."""
    dns.update({"_smtp._tls.sts.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tls@reports.test"]},
                "_smtp._tls.flaky.test": "SERVFAIL"})
    cfg = make_cfg(tmp_path, dns, 25, tls_reports=True)
    now = time.time()
    rec = Recorder(cfg, clock=lambda: now)
    for dom in ("sts.test", "flaky.test"):
        rec.session(dom, PolicyDesc(), True)
    rec.flush()
    log = ListLog()
    queue = wiring.spool(cfg)
    reporter = Reporter(cfg, Resolver([dns.nameserver], 1.0), wiring.submitter(cfg, queue, log),
                        log, clock=lambda: now + 86400)
    assert await reporter.send_due() == 1  # sts.test; flaky.test: try again
    assert await reporter.send_due() == 0  # the next run: sts.test is not sent again
    dns.update({"_smtp._tls.flaky.test": {"TXT": ["v=TLSRPTv1; rua=mailto:f@reports.test"]}})
    assert await reporter.send_due() == 1
    rcpts = sorted(r.address for qid in queue.scan() for r in queue.load(qid).recipients)
    assert rcpts == ["f@reports.test", "tls@reports.test"]
    assert not list((tmp_path / "tls-rpt").glob("*.json"))  # done with: removed

    rec.session("flaky.test", PolicyDesc(), True)  # a day whose lookup never answers
    rec.flush()
    dns.update({"_smtp._tls.flaky.test": "SERVFAIL"})
    reporter.clock = lambda: now + 8 * 86400
    assert await reporter.send_due() == 0
    assert log.grep("TLS-RPT: reports of", "for flaky.test not sent after 7 days")
    assert not list((tmp_path / "tls-rpt").glob("*.json"))


async def test_a_utf8_rua_mailbox_gets_an_smtputf8_report_of_its_own(
        env: Env, dns: FakeDNSServer, fake_mx: MXFactory, tmp_path: Path) -> None:  # noqa: F811
    """A `rua` mailto: with a UTF-8 local part went into the report's To: as an encoded
    word (`=?utf-8?b?...?=@reports.test`: RFC 2047 5 forbids one in an address), in a
    message not queued as SMTPUTF8 and shared with the ASCII mailboxes. Now the UTF-8
    mailboxes get their own copy, queued SMTPUTF8, its To: raw UTF-8 (RFC 6532): a next
    hop without SMTPUTF8 bounces that copy 553 5.6.7 (a null sender: no DSN, the maillog
    line), and the ASCII mailbox's report is delivered."""
    utf8_box = "тлс@reports.test"
    dns.update({"_smtp._tls.sts.test": {"TXT": [
                    "v=TLSRPTv1; rua=mailto:%D1%82%D0%BB%D1%81@reports.test,"
                    "mailto:tls@reports.test"]},
                "reports.test": {"MX": [(10, MX1)]}})
    mx = fake_mx("127.0.0.2", smtputf8=False)
    cfg = make_cfg(tmp_path, dns, fake_mx.port, tls_reports=True)
    now = time.time()
    rec = Recorder(cfg, clock=lambda: now)
    rec.session("sts.test", PolicyDesc(), True)
    rec.flush()
    log = ListLog()
    queue = wiring.spool(cfg)
    reporter = Reporter(cfg, Resolver([dns.nameserver], 1.0), wiring.submitter(cfg, queue, log),
                        log, clock=lambda: now + 86400)
    assert await reporter.send_due() == 2
    queued = {}
    for qid in queue.scan():
        envlp = queue.load(qid)
        path, offset = queue.body_path(qid)
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read()
        queued[tuple(r.address for r in envlp.recipients)] = (envlp, raw)
    assert sorted(queued) == [("tls@reports.test",), (utf8_box,)]
    uenv, uraw = queued[(utf8_box,)]
    assert uenv.smtputf8 and not queued[("tls@reports.test",)][0].smtputf8
    umsg = email.message_from_string(uraw.decode("utf-8"), policy=email.policy.default)
    assert [a.addr_spec for a in umsg["To"].addresses] == [utf8_box]
    assert f"\r\nTo: {utf8_box}\r\n".encode() in uraw and b"=?" not in uraw.split(b"\r\n\r\n")[0]

    courier = Courier(cfg, maillog=ListLog())
    try:
        for envlp, raw in queued.values():
            res = await courier.deliver(envlp, envlp.recipients, raw, 0)
            [r] = res.values()
            if envlp.smtputf8:
                assert (r.code, r.enhanced, r.permanent) == (553, "5.6.7", True), r.text
            else:
                assert r.ok, r.text
    finally:
        await courier.close()
    assert [m.rcpt_tos for m in mx.messages] == [["tls@reports.test"]]
    assert b"=?" not in mx.messages[0].content.split(b"\r\n\r\n")[0]


def test_a_hostile_domain_cannot_grow_the_tally_without_end(tmp_path: Path) -> None:
    """Attack: a domain whose MX names are random (a wildcard zone) and whose hosts each
    publish other TLSA records: every failed session was a new failure detail and every
    host a new policy, so the day's file (rewritten whole at each flush) and the report
    grew without end. Now at most 20 policies per domain and day and 100 details per
    policy; past that a failure still counts, under its result type alone."""
    from authrelay.config import from_dict

    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path)})
    now = time.time()
    rec = Recorder(cfg, clock=lambda: now)
    sts = PolicyDesc("sts", ("version: STSv1", "mode: enforce"), ("mx.evil.test",))
    for flush in range(2):  # two flushes: the day's file is merged into as well
        for i in range(300):
            rec.session("evil.test", sts, False, "certificate-expired", f"h{flush}-{i}.evil.test",
                        "127.0.0.9")
        for i in range(30):
            rec.session("evil.test", PolicyDesc("tlsa", (f"3 1 1 {flush}{i:062x}",)), True)
        rec.flush()
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    [pols] = json.loads((tmp_path / "tls-rpt" / f"{day}.json").read_text()).values()
    assert len(pols) == 20
    ok, fails = pols[sts.key()]
    assert len(fails) <= 101 and sum(fails.values()) == 600
    assert fails["certificate-expired|||"] == 500


def test_both_spellings_of_an_internationalized_domain_are_one_report(tmp_path: Path) -> None:
    """A session to bob@bücher.test and a policy fetch failure of xn--bcher-kva.test (the
    MTA-STS source records the A-label) are one domain's tally, so one report; they
    were two, the U-label one with a policy-domain no DNS name has."""
    from authrelay.config import from_dict

    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path)})
    now = time.time()
    rec = Recorder(cfg, clock=lambda: now)
    rec.session("bücher.test", PolicyDesc("sts"), True)
    rec.session("xn--bcher-kva.test", PolicyDesc("sts"), False, "sts-policy-fetch-error")
    rec.flush()
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    tally = json.loads((tmp_path / "tls-rpt" / f"{day}.json").read_text())
    assert list(tally) == ["xn--bcher-kva.test"]
    [(ok, fails)] = tally["xn--bcher-kva.test"].values()
    assert ok == 1 and sum(fails.values()) == 1


async def test_testing_policy_unlisted_mx_is_a_reported_failure(
        env: Env, dns: FakeDNSServer, https: PolicyServer,  # noqa: F811
        fake_mx: MXFactory, trustme_ca: trustme.CA, tmp_path: Path) -> None:
    """RFC 8461 5 / RFC 8460: under a `testing` policy that does not list the MX, the
    mail goes (good certificate and all), and the session is a validation-failure in the
    tally, not a success (the old code counted it a success: the domain testing its
    policy never learnt its MX was not in it)."""
    https.policies["mta-sts.sts.test"] = policy("testing", "mx.elsewhere.test")
    start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    courier = env.courier(ListLog(), tls_reports=True)
    try:
        res, _ = await env.deliver(courier=courier)
        assert res.ok and res.tls_policy == "mta-sts", res
    finally:
        await courier.close()  # flushes the tally
    day = time.strftime("%Y-%m-%d", time.gmtime())
    tally = json.loads((tmp_path / "tls-rpt" / f"{day}.json").read_text())
    [(ok, fails)] = [v for k, v in tally["sts.test"].items() if json.loads(k)[0] == "sts"]
    assert ok == 0 and list(fails) and all(k.startswith("validation-failure|" + MX1)
                                           for k in fails), fails


async def test_a_stop_whose_cancel_meets_a_wake_up_still_stops(tmp_path: Path) -> None:
    """The reporter waits up to an hour for a wake-up (a reload). Python 3.11's wait_for
    returned normally when that wake-up and stop()'s cancel landed in the same loop turn:
    the cancel was lost and the daemon's stop waited for the reporter's next hour."""
    import asyncio

    from support.wait import DEADLINE

    from authrelay.config import from_dict

    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path),
                     "delivery": {"tls_reports": True, "nameservers": ["127.0.0.1:9"]}})
    reporter = Reporter(cfg, Resolver(["127.0.0.1:9"], 1.0),
                        wiring.submitter(cfg, wiring.spool(cfg), ListLog()), ListLog())
    reporter.start()
    task = reporter._task
    assert task is not None
    await asyncio.sleep(0.05)  # nothing due: it waits for the hour or a wake-up
    reporter._wake.set()  # the wake-up (a reload that changed the hostname or resolver)
    stopping = asyncio.ensure_future(reporter.stop())
    try:
        await asyncio.wait({stopping}, timeout=DEADLINE)  # a bound: it hung for an hour
        assert stopping.done(), "stop() hung: its cancel of the reporter was lost"
        assert task.done()
    finally:
        task.cancel()
        await stopping
