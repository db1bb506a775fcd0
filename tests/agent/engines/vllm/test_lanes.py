"""Where the connector's loads and saves run: off the cores vLLM pins its forward pass to,
when there are others."""

from __future__ import annotations

import os
import threading

import pytest

pytest.importorskip("vllm", reason="the lanes log through vLLM's logger")

from cwm_server.agent.engines.vllm.lanes import (
    Lane,
    parse_cpus,
    transfer_cpus,
)


def test_cpu_lists_parse_like_tasksets() -> None:
    assert parse_cpus("0") == {0}
    assert parse_cpus("0,2-3, 5") == {0, 2, 3, 5}
    for bad in ("", "x", "3-1", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_auto_picks_the_cpus_the_worker_is_not_pinned_to() -> None:
    online = {0, 1, 2, 3}
    assert transfer_cpus("auto", {1}, online) == {0, 2, 3}
    assert transfer_cpus("auto", online, online) is None  # pinned to all (or none): as is
    assert transfer_cpus("inherit", {1}, online) is None
    assert transfer_cpus("2-3", {1}, online) == {2, 3}
    with pytest.raises(ValueError, match="not online"):
        transfer_cpus("7", {1}, online)


def test_a_lane_runs_its_jobs_on_its_own_cpus() -> None:
    cpus = {min(os.sched_getaffinity(0))}
    seen: list[set[int]] = []
    done = threading.Event()
    lane = Lane("test-lane", cpus)
    lane.submit(lambda: seen.append(os.sched_getaffinity(0)))
    lane.submit(done.set)
    assert done.wait(10)
    assert seen == [cpus]
