"""The scheduler's notices of committed messages (spool/submit._Notices): each goes once
its maillog line is written or NOTICE_WAIT after the commit; one loop timer for all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support.wait import until

from authrelay.spool import submit


async def test_a_notice_that_raises_leaves_the_timer_for_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A notice that raised out of the timer left the fired handle as the armed timer:
    no later notice was ever sent by the timer again (a stalled log then held every
    message until the rescan)."""
    monkeypatch.setattr(submit, "NOTICE_WAIT", 0.01)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    notices = submit._Notices(loop)

    def boom() -> None:
        raise RuntimeError("boom")

    notices.add(boom)
    await until(lambda: errors, what="the first notice raised")
    sent: list[int] = []
    notices.add(lambda: sent.append(1))
    await until(lambda: sent, what="the next notice sent by the timer", timeout=5)


async def test_a_notice_goes_once_whichever_comes_first() -> None:
    loop = asyncio.get_running_loop()
    notices = submit._Notices(loop)
    sent: list[str] = []
    send = notices.add(lambda: sent.append("a"))
    send()  # its line written: sent now
    send()
    notices._expire()  # (the timer: nothing left to send)
    assert sent == ["a"]
