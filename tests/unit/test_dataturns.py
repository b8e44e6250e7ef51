"""smtpd/dataturns.py: one DATA chunk per loop turn for the whole loop, round-robin."""

from __future__ import annotations

import asyncio

import uvloop

from authrelay.smtpd.dataturns import DataTurns


async def _streams_and_a_command() -> tuple[list[str], int]:
    turns = DataTurns.of(asyncio.get_running_loop())
    order: list[str] = []

    async def stream(name: str) -> None:
        for _ in range(20):
            await turns.turn()
            order.append(name)  # one chunk of work

    async def command() -> int:
        # a session in the command phase: runs at the next loop turn like any task
        before = len(order)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return len(order) - before

    tasks = [asyncio.ensure_future(stream(n)) for n in "abcdefgh"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    chunks_meanwhile = await command()
    await asyncio.gather(*tasks)
    return order, chunks_meanwhile


def _check(order: list[str], chunks_meanwhile: int) -> None:
    assert len(order) == 160
    # round-robin: every stream gets its k-th chunk before any gets its (k+2)-th
    for k in range(0, 160, 8):
        assert sorted(order[k:k + 8]) == list("abcdefgh"), order[k:k + 8]
    # two loop turns of a command saw at most two chunks of DATA, not eight streams' worth
    assert chunks_meanwhile <= 2, chunks_meanwhile


def test_round_robin_one_chunk_per_turn() -> None:
    _check(*asyncio.run(_streams_and_a_command()))


def test_same_on_uvloop() -> None:
    loop = uvloop.new_event_loop()
    try:
        _check(*loop.run_until_complete(_streams_and_a_command()))
    finally:
        loop.close()


def test_cancelled_waiter_is_skipped() -> None:
    async def main() -> list[str]:
        turns = DataTurns.of(asyncio.get_running_loop())
        got: list[str] = []

        async def one(name: str) -> None:
            await turns.turn()
            got.append(name)

        a, b = asyncio.ensure_future(one("a")), asyncio.ensure_future(one("b"))
        await asyncio.sleep(0)  # both waiting
        a.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        assert turns.waiting == 0
        return got

    assert asyncio.run(main()) == ["b"]
