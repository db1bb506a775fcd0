"""Pins and deferred collection on a real WindowManager (SQLite catalog, disk tier on a tmp
dir): a pinned chunk survives a collection and is collected when its last pin goes, unless
it got a catalog row meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cwm_client import pb
from cwm_server.manager.catalog.base import NewChunk
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.windows.manager import WindowManager

A, B = bytes([1]) * 32, bytes([2]) * 32


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[WindowManager]:
    wm = WindowManager(ManagerConfig(data_dir=tmp_path / "m", listen="127.0.0.1:0"))
    yield wm
    wm.close()


def _chunk_file(wm: WindowManager, digest: bytes) -> Path:
    """A chunk file in its place (its content does not matter to collection)."""
    path = wm.disk.path_for("t", digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"chunk bytes")
    return path


async def _settle() -> None:
    """Let deferred collections scheduled on the loop run on the catalog thread."""
    for _ in range(50):
        await asyncio.sleep(0.01)


def test_a_pinned_chunk_is_collected_when_its_last_pin_goes(manager: WindowManager) -> None:
    async def scenario() -> None:
        pinned, free = _chunk_file(manager, A), _chunk_file(manager, B)
        first = manager.pins.pin("t", [A, A])  # one pin per distinct digest
        second = manager.pins.pin("t", [A])
        assert manager.pins.held() == {("t", A): 2}
        assert await manager.collect("t", [A, B]) == 1  # B at once, A deferred
        assert pinned.exists() and not free.exists()
        assert manager.pins.deferred() == {("t", A)}
        manager.pins.unpin(first)
        await _settle()
        assert pinned.exists()  # one stream still holds it
        manager.pins.unpin(second)
        await _settle()
        assert not pinned.exists()
        assert manager.pins.deferred() == set() and manager.pins.held() == {}

    asyncio.run(scenario())


def test_a_chunk_that_got_a_row_while_pinned_survives_its_deferred_collection(
    manager: WindowManager,
) -> None:
    async def scenario() -> None:
        path = _chunk_file(manager, A)
        keys = manager.pins.pin("t", [A])
        assert await manager.collect("t", [A]) == 0
        window = pb.WindowInfo(tenant="t", name="w", token_ids=[0])
        window.chunks.add(digest=A)
        await manager.db(manager.catalog.commit_window, window, {A: NewChunk(A, 10, 10, 0)}, False)
        manager.pins.unpin(keys)
        await _settle()
        assert path.exists()
        assert manager.pins.deferred() == set()

    asyncio.run(scenario())


def test_an_unpinned_chunk_with_a_row_is_never_collected(manager: WindowManager) -> None:
    async def scenario() -> None:
        path = _chunk_file(manager, A)
        window = pb.WindowInfo(tenant="t", name="w", token_ids=[0])
        window.chunks.add(digest=A)
        await manager.db(manager.catalog.commit_window, window, {A: NewChunk(A, 10, 10, 0)}, False)
        assert await manager.collect("t", [A]) == 0
        assert path.exists()
        assert manager.pins.deferred() == set()

    asyncio.run(scenario())


def test_the_last_unpin_off_the_event_loop_leaves_the_file_for_recovery(
    manager: WindowManager,
) -> None:
    path = _chunk_file(manager, A)
    keys = manager.pins.pin("t", [A])
    assert asyncio.run(manager.collect("t", [A])) == 0
    manager.pins.unpin(keys)  # no running loop: closing
    assert path.exists() and manager.pins.deferred() == set()
    assert manager.recover().orphan_chunks_removed == 1
    assert not path.exists()
