"""DATA turns: one chunk of message data per event-loop turn for the whole process.

Owns the order in which the sessions of one event loop (one receiving worker) that are
reading DATA get to scan their next chunk (protocol.CHUNK). Each reading session awaits
`turn()` before its next chunk; the turns are given out first come, first served, one per
loop iteration. However many clients stream big messages at once, a loop iteration holds
at most one chunk of DATA work, so a session in the command phase (a greeting, an EHLO,
an AUTH) waits for one chunk, not for one chunk per streaming connection (issue 17,
bench (h): eight connections streaming oversized messages).

Contract: `DataTurns.of(loop)` is the loop's instance (created on first use, dropped with
the loop); `await turns.turn()` returns in a later loop iteration, in arrival order. A
sender alone is slowed by one future per chunk only; several share the chunks evenly,
as they shared loop turns before. Nothing here limits a client's total: a legitimate big
sender gets its share whatever the others send.
Failure policy: a cancelled waiter (a session ended meanwhile) is skipped.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque


class DataTurns:
    _of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DataTurns] = \
        weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> DataTurns:
        got = cls._of.get(loop)
        if got is None:
            got = cls._of[loop] = cls(loop)
        return got

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def turn(self) -> None:
        """Wait for this session's next chunk of DATA work."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append(fut)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._next)
        await fut

    def _next(self) -> None:
        # Runs once per loop iteration while sessions wait: wakes the first of them (its
        # task runs in the next iteration), then schedules itself for the next one.
        self._scheduled = False
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        if self._waiting:
            self._scheduled = True
            self._loop.call_soon(self._next)
