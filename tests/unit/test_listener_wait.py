"""Connection.wait_input's deadline: one timer per connection, re-armed lazily
(listener.py). Each wait must end at its own deadline, whatever the waits before it
armed: a shorter one after a longer one, a longer one after a shorter one, on asyncio's
loop and on uvloop's (the server's), over a real loopback connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from authrelay.smtpd.listener import Connection, Timeout

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run, "uvloop": uvloop.run}


async def _scenario() -> None:
    loop = asyncio.get_running_loop()
    conns: list[Connection] = []
    srv = await loop.create_server(lambda: Connection(conns.append, loop), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    _, w = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(10):
        while not conns:
            await asyncio.sleep(0.01)
    c = conns[0]

    async def answered(timeout: float, data: bytes) -> None:
        t = loop.create_task(c.wait_input(timeout))
        await asyncio.sleep(0)
        w.write(data)
        await t
        assert c.take() == data

    # a long wait answered, then a shorter one: it expires at its own deadline (not the
    # long one's: asyncio.timeout would raise TimeoutError, not Timeout)
    await answered(60, b"a")
    t0 = loop.time()
    with pytest.raises(Timeout):
        async with asyncio.timeout(10):
            await c.wait_input(0.3)
    assert loop.time() - t0 >= 0.29  # never before its deadline

    # a short wait answered, then a longer one: the short one's timer fires meanwhile
    # and must re-arm, not expire it
    await answered(0.2, b"b")
    t0 = loop.time()
    long_wait = loop.create_task(c.wait_input(0.8))
    await asyncio.sleep(0.5)  # past the 0.2 s timer
    assert not long_wait.done()
    with pytest.raises(Timeout):
        async with asyncio.timeout(10):
            await long_wait
    assert loop.time() - t0 >= 0.79

    # and input during a re-armed wait still ends it
    await answered(0.1, b"c")
    late = loop.create_task(c.wait_input(5))
    await asyncio.sleep(0.3)
    w.write(b"d")
    await late
    assert c.take() == b"d"

    w.close()
    srv.close()


@pytest.mark.parametrize("loop_name", sorted(RUNNERS))
def test_each_input_wait_ends_at_its_own_deadline(loop_name: str) -> None:
    RUNNERS[loop_name](_scenario())
