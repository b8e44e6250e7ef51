"""The courier against every combination of server replies (Hypothesis), over real sockets.

A scripted SMTP server (asyncio, loopback) answers MAIL, each RCPT, DATA and the final
dot with codes drawn by Hypothesis (2xx, 4xx, 5xx, 421 that closes), with and without
PIPELINING. Whatever it says, the courier must: never raise; give every recipient exactly
one result; call a recipient delivered only if the server accepted it and then the
message; and stay in step, so that a second message on the same courier (maybe the same
connection) is delivered normally.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authrelay.config import from_dict
from authrelay.delivery.client import Courier
from authrelay.maillog import MailLog
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id

MSG = b"Subject: replies\r\n\r\nbody\r\n.dot\r\n"


class QuietLog(MailLog):
    def _emit(self, line: str) -> None:
        pass


@dataclass
class Script:
    mail: int
    rcpts: list[int]
    data: int
    final: int


@dataclass
class Server:
    pipelining: bool
    scripts: list[Script]
    accepted: list[list[str]] = field(default_factory=list)  # per delivered message
    transactions: int = 0
    connections: int = 0

    def script(self) -> Script:
        if self.transactions < len(self.scripts):
            return self.scripts[self.transactions]
        return Script(250, [250] * 10, 354, 250)

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._dialog(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def _dialog(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        def say(code: int, text: str = "ok") -> bool:
            w.write(f"{code} {text}\r\n".encode())
            return code == 421  # closing

        w.write(b"220 scripted ESMTP\r\n")
        sc: Script | None = None
        in_mail, rcpt_no, ok_rcpts = False, 0, []
        while line := await r.readline():
            verb = line[:4].upper()
            closing = False
            if verb == b"EHLO":
                w.write(b"250-scripted\r\n" + (b"250-PIPELINING\r\n" if self.pipelining
                                               else b"") + b"250 8BITMIME\r\n")
            elif verb == b"MAIL":
                if in_mail:
                    closing = say(503, "nested MAIL")
                else:
                    sc = self.script()
                    self.transactions += 1
                    rcpt_no, ok_rcpts = 0, []
                    in_mail = sc.mail // 100 == 2
                    closing = say(sc.mail)
            elif verb == b"RCPT":
                if not in_mail or sc is None:
                    closing = say(503, "need MAIL")
                else:
                    code = sc.rcpts[rcpt_no] if rcpt_no < len(sc.rcpts) else 250
                    rcpt_no += 1
                    if code // 100 == 2:
                        ok_rcpts.append(line.split(b"<", 1)[1].split(b">")[0].decode())
                    closing = say(code)
            elif verb == b"DATA":
                if not in_mail or sc is None:
                    closing = say(503, "need RCPT")
                else:
                    closing = say(sc.data, "go ahead" if sc.data == 354 else "no")
                    if sc.data == 354:
                        await w.drain()
                        while await r.readline() not in (b".\r\n", b""):
                            pass
                        if sc.final == 250 and ok_rcpts:
                            self.accepted.append(ok_rcpts)
                        closing = say(sc.final)
                    in_mail = False
            elif verb == b"RSET":
                in_mail = False
                closing = say(250)
            elif verb == b"QUIT":
                say(221)
                closing = True
            else:
                closing = say(502, "unknown")
            await w.drain()
            if closing:
                return


# Odd but positive replies too: 251 to MAIL and 252 to RCPT (any 2yz is positive
# completion, RFC 5321 4.2.1), 250 to DATA instead of 354 (no message goes: it must not
# count as delivered; it once did, the message then removed from the queue unsent).
codes_mail = st.sampled_from([250, 251, 451, 550, 421])
codes_rcpt = st.sampled_from([250, 251, 252, 450, 452, 550, 553, 421])
codes_data = st.sampled_from([354, 354, 354, 250, 451, 554, 503, 421])
codes_final = st.sampled_from([250, 250, 451, 552, 554, 421])


@st.composite
def scripts(draw: st.DrawFn) -> tuple[bool, int, Script]:
    n = draw(st.integers(min_value=1, max_value=4))
    return (draw(st.booleans()), n,
            Script(draw(codes_mail), draw(st.lists(codes_rcpt, min_size=n, max_size=n)),
                   draw(codes_data), draw(codes_final)))


async def _run(pipelining: bool, n: int, sc: Script) -> None:
    server = Server(pipelining, [sc])
    srv = await asyncio.start_server(server.handle, "127.0.0.2", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with tempfile.TemporaryDirectory() as state:
            cfg = from_dict({
                "hostname": "relay.test", "state_dir": state,
                "relay": {"smart_host": [f"127.0.0.2:{port}"], "smart_host_tls": "none"},
                "delivery": {"connect_timeout": "5s", "command_timeout": "5s",
                             "data_timeout": "5s"},
            })
            courier = Courier(cfg, maillog=QuietLog("stdout"))
            try:
                rcpts = [f"r{i}@far.test" for i in range(n)]
                env = Envelope(new_queue_id(), "a@b.test", [Recipient(r) for r in rcpts])
                res = await courier.deliver(env, env.recipients, MSG)
                assert sorted(res) == rcpts
                delivered = set(server.accepted[0]) if server.accepted else set()
                for i, r in enumerate(rcpts):
                    ok = res[r].ok
                    # delivered per the courier <=> the server accepted it and the message
                    assert ok == (r in delivered), (r, res[r], sc)
                    if not ok:
                        assert 400 <= res[r].code < 600, res[r]
                        if sc.mail == 250 and i < len(sc.rcpts) and sc.rcpts[i] >= 500 \
                                and 421 not in sc.rcpts[:i]:
                            assert res[r].permanent, (r, res[r], sc)
                # In step afterwards: the next message goes through normally.
                env2 = Envelope(new_queue_id(), "a@b.test", [Recipient("z@far.test")])
                res2 = await courier.deliver(env2, env2.recipients, MSG)
                assert res2["z@far.test"].ok, (res2, sc)
                assert server.accepted[-1] == ["z@far.test"]
                # ...on the same connection, unless the server closed it (421), the
                # host failed as a whole (4xx to MAIL: the connection is dropped), or a
                # refusal for good that no 354 followed stood once QUIT was answered in
                # step (Courier._settle).
                codes = [sc.mail, *sc.rcpts[:n], sc.data, sc.final]
                taken = any(c < 300 for c in sc.rcpts[:n])
                settled = sc.mail >= 500 or (
                    any(c >= 500 for c in sc.rcpts[:n]) and not (taken and sc.data == 354)) \
                    or (taken and sc.data >= 500)
                if 421 not in codes and not 400 <= sc.mail < 500 and not settled:
                    assert server.connections == 1, sc
            finally:
                await courier.close()
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.slow
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scripts())
def test_any_replies_keep_the_courier_correct_and_in_step(
        case: tuple[bool, int, Script]) -> None:
    pipelining, n, sc = case
    asyncio.run(_run(pipelining, n, sc))
