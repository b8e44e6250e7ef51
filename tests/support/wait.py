"""Waiting on a condition, never on the clock.

Owns: the polls tests use when the thing awaited has no event they can hold (a line in a
process's maillog, a file in its spool, a socket accepting). The timeout is a bound
against hangs, not a timing assertion: generous, and a failure says what was awaited.
Where an event exists (an asyncio.Event, a fake server's record), await that instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 20.0  # seconds: a loaded 2-core CI runner, not the time anything should take


def _message(what: object) -> str:
    return str(what() if callable(what) else what)


def wait_until(pred: Callable[[], T], what: object = "condition", timeout: float = DEADLINE,
               interval: float = 0.02) -> T:
    """Poll `pred` until it returns a truthy value, and return that value. At the deadline
    raise AssertionError naming `what` (a string, or a callable describing the state then,
    e.g. the tail of a maillog)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {_message(what)}")
        time.sleep(interval)


async def until(pred: Callable[[], T | Awaitable[T]], what: object = "condition",
                timeout: float = DEADLINE, interval: float = 0.01) -> T:
    """`wait_until` for async tests: polls without blocking the event loop. `pred` may be
    a coroutine function (e.g. a store lookup): its result is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if inspect.isawaitable(v):
            v = await v
        if v:
            return v  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {_message(what)}")
        await asyncio.sleep(interval)
