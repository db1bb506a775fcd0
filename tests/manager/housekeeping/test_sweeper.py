"""The sweeper runs each sweep on its own schedule, skips what has nothing to do or needs a
Redis that is away, survives a failing sweep, and runs the sweeps that wait for Redis as
soon as the link comes back (real RedisLink on a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cwm_server.manager.housekeeping.sweeper import Sweep, Sweeper


def _counting(calls: list[float], fail: bool = False) -> Any:
    async def run() -> int:
        calls.append(time.monotonic())
        if fail:
            raise RuntimeError("this sweep always fails")
        return 0

    return run


def test_each_sweep_keeps_its_own_schedule() -> None:
    async def scenario() -> tuple[list[float], list[float], float]:
        fast: list[float] = []
        slow: list[float] = []
        sweeper = Sweeper(
            [
                Sweep("fast", 0.05, _counting(fast), needs_redis=False),
                Sweep("slow", 10.0, _counting(slow), first_after_s=0.2, needs_redis=False),
            ],
            link=None,
        )
        started = time.monotonic()
        sweeper.start()
        await asyncio.sleep(0.5)
        await sweeper.stop()
        return fast, slow, started

    fast, slow, started = asyncio.run(scenario())
    assert fast[0] - started < 0.05  # first run at once
    assert 3 <= len(fast) <= 12  # about every 0.05 s for 0.5 s
    assert len(slow) == 1 and slow[0] - started >= 0.2  # its first run only, after its delay


def test_a_sweep_with_nothing_to_do_is_not_run_and_a_failing_one_keeps_its_schedule() -> None:
    async def scenario() -> tuple[list[float], list[float], dict[str, int]]:
        idle: list[float] = []
        failing: list[float] = []
        sweeper = Sweeper(
            [
                Sweep("idle", 0.02, _counting(idle), wanted=lambda: False, needs_redis=False),
                Sweep("failing", 0.05, _counting(failing, fail=True), needs_redis=False),
            ],
            link=None,
        )
        sweeper.start()
        await asyncio.sleep(0.3)
        await sweeper.stop()
        return idle, failing, sweeper.runs

    idle, failing, runs = asyncio.run(scenario())
    assert idle == [] and runs["idle"] == 0
    assert len(failing) >= 3 and runs["failing"] == len(failing)


def test_stop_ends_every_schedule() -> None:
    async def scenario() -> tuple[int, int]:
        calls: list[float] = []
        sweeper = Sweeper([Sweep("s", 0.01, _counting(calls), needs_redis=False)], link=None)
        sweeper.start()
        await asyncio.sleep(0.1)
        await sweeper.stop()
        stopped_at = len(calls)
        await asyncio.sleep(0.1)
        return stopped_at, len(calls)

    stopped_at, later = asyncio.run(scenario())
    assert stopped_at > 0 and later == stopped_at


def test_redis_sweeps_wait_while_the_link_is_down_and_run_when_it_comes_back(
    request: pytest.FixtureRequest,
) -> None:
    from tests.redis_helpers import REDIS_SERVER

    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    from cwm_server.manager.tiers.redis_link import RedisLink

    redis_server = request.getfixturevalue("redis_server")

    link = RedisLink([redis_server.url], retry_after_s=0.05)

    async def scenario() -> tuple[int, int, int, list[float], float]:
        returned: list[float] = []
        scheduled: list[float] = []
        sweeper = Sweeper(
            [
                Sweep("after_outage", 30.0, _counting(returned), soon_after_redis_returns=True),
                Sweep("rare", 30.0, _counting(scheduled), first_after_s=30.0),
            ],
            link,
        )
        link.mark_down("the test cut it")
        sweeper.start()
        await asyncio.sleep(0.2)
        while_down = len(returned)
        back_at = time.monotonic()
        ok, _ = await asyncio.to_thread(link.ping)  # what the health check does
        assert ok
        for _ in range(100):
            if returned:
                break
            await asyncio.sleep(0.01)
        await sweeper.stop()
        listeners_left = len(link.listeners)
        return while_down, len(scheduled), listeners_left, returned, back_at

    try:
        while_down, rare_runs, listeners_left, returned, back_at = asyncio.run(scenario())
    finally:
        link.close()
    assert while_down == 0  # the first run found the link down and waited
    assert len(returned) == 1 and returned[0] - back_at < 0.5  # woken, not at 30 s
    assert rare_runs == 0  # a sweep that does not wait for Redis is not woken
    assert listeners_left == 0  # stop() leaves nothing on the link
