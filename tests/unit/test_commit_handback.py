"""The commit thread's hand-back (issue 22 step 3): a session's 250 (Draft.commit's
`on_durable`) runs in the loop callback that brings the commit thread's result, ahead of
whatever the loop queued after that result arrived. It used to run only when the
awaiting coroutine resumed, two loop turns later (the shield's callback, then the task's
wake-up), behind every other session's handshake, AUTH and command work queued
meanwhile. Also: an error of the 250's own still comes after the `from=` line (no 250
for a cancelled commit: test_commit_cancel)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.spools import temp_spool
from test_commit_cancel import held_draft

from authrelay.spool.store import Spool


@pytest.fixture
def spool() -> Iterator[Spool]:
    with temp_spool(fsync=False) as s:
        yield s


async def test_the_250_runs_in_the_callback_that_brings_the_commit(
        spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    posted = threading.Event()
    real = loop.call_soon_threadsafe
    draft, signer, log = held_draft(spool, tmp_path)

    def spy(*args: Any) -> asyncio.Handle:
        handle = real(*args)
        # The commit thread's result is in the loop's queue (not the early create's,
        # another commit thread's, which a loaded machine may post late).
        if threading.get_ident() == signer.thread:
            posted.set()
        return handle

    monkeypatch.setattr(loop, "call_soon_threadsafe", spy)
    order: list[str] = []
    task = loop.create_task(draft.commit(lambda: order.append("250")))
    assert await asyncio.to_thread(signer.entered.wait, 10)
    posted.clear()  # (to_thread's own hand-back)
    signer.release.set()
    assert posted.wait(10)  # (the loop is held here: the result waits for it)
    loop.call_soon(order.append, "queued after the result")
    await task
    assert order == ["250", "queued after the result"]
    assert log.grep(f"{draft.queue_id}: from=<a@example.org>")
    spool.verify(draft.queue_id)


async def test_an_error_of_the_250_is_raised_after_the_from_line(spool: Spool,
                                                                 tmp_path: Path) -> None:
    draft, signer, log = held_draft(spool, tmp_path)

    def broken() -> None:
        raise ValueError("the 250's own")

    task = asyncio.get_running_loop().create_task(draft.commit(broken))
    assert await asyncio.to_thread(signer.entered.wait, 10)
    signer.release.set()
    with pytest.raises(ValueError, match="the 250's own"):
        await task
    assert log.grep(f"{draft.queue_id}: from=<a@example.org>")
    spool.verify(draft.queue_id)
