"""The agent's pool of staged chunk files: a thaw writes over a pooled file's pages, the pool
never holds more than its budget, and it gives everything back when the chunk root is full."""

from __future__ import annotations

from pathlib import Path

from cwm_server.agent.engines.vllm.pool import ChunkPool


def test_a_pooled_file_is_written_over_and_holds_exactly_the_new_bytes(tmp_path: Path) -> None:
    pool = ChunkPool(tmp_path, max_bytes=1 << 20)
    old = tmp_path / "old.bin"
    old.write_bytes(b"x" * 1000)
    pool.give(old)
    assert not old.exists() and len(pool) == 1 and pool.pooled_bytes == 1000
    target = tmp_path / "chunk-00000.bin"
    assert pool.write(target, b"y" * 600)  # reused, and cut to the new size
    assert target.read_bytes() == b"y" * 600
    assert len(pool) == 0
    assert not pool.write(tmp_path / "chunk-00001.bin", b"z" * 10)  # empty pool: a new file
    assert (tmp_path / "chunk-00001.bin").read_bytes() == b"z" * 10


def test_the_pool_keeps_to_its_budget_dropping_the_oldest_files(tmp_path: Path) -> None:
    pool = ChunkPool(tmp_path, max_bytes=250)
    for name in "abc":
        path = tmp_path / f"{name}.bin"
        path.write_bytes(name.encode() * 100)
        pool.give(path)
    assert len(pool) == 2 and pool.pooled_bytes == 200
    assert sorted(p.read_bytes()[:1] for p in pool.folder.iterdir()) == [b"b", b"c"]


def test_a_file_larger_than_the_budget_or_a_zero_budget_is_removed_not_kept(
    tmp_path: Path,
) -> None:
    for budget, size in ((100, 500), (0, 10)):
        pool = ChunkPool(tmp_path / str(budget), max_bytes=budget)
        path = tmp_path / f"big-{budget}.bin"
        path.write_bytes(b"b" * size)
        pool.give(path)
        assert not path.exists() and len(pool) == 0


def test_the_closest_fitting_file_is_chosen(tmp_path: Path) -> None:
    pool = ChunkPool(tmp_path, max_bytes=1 << 20)
    for size in (100, 400, 200):
        path = tmp_path / f"f{size}.bin"
        path.write_bytes(b"s" * size)
        pool.give(path)
    pool.write(tmp_path / "chunk.bin", b"n" * 150)
    assert sorted(p.stat().st_size for p in pool.folder.iterdir()) == [100, 400]


def test_drain_frees_every_pooled_file_and_a_new_agent_adopts_the_pool(tmp_path: Path) -> None:
    pool = ChunkPool(tmp_path, max_bytes=1 << 20)
    for name in "ab":
        path = tmp_path / f"{name}.bin"
        path.write_bytes(b"d" * 64)
        pool.give(path)
    assert ChunkPool(tmp_path, max_bytes=1 << 20).pooled_bytes == 128  # adopted
    assert pool.drain() == 128
    assert list(pool.folder.iterdir()) == []


def test_a_pooled_file_on_another_file_system_is_dropped_and_a_new_file_written(
    tmp_path: Path,
) -> None:
    pool = ChunkPool(Path("/dev/shm") / f"cwm-pool-test-{tmp_path.name}", max_bytes=1 << 20)
    try:
        old = pool.folder.parent / "old.bin"
        old.write_bytes(b"o" * 100)
        pool.give(old)
        target = tmp_path / "chunk.bin"  # not on /dev/shm's tmpfs
        assert not pool.write(target, b"n" * 50)
        assert target.read_bytes() == b"n" * 50 and len(pool) == 0
    finally:
        import shutil

        shutil.rmtree(pool.folder.parent, ignore_errors=True)


def test_chunk_files_the_scheduler_recycles_are_adopted_by_the_pool(tmp_path: Path) -> None:
    from cwm_server.agent.engines.vllm import staging

    pool = ChunkPool(tmp_path, max_bytes=1 << 20)
    order = tmp_path / "load" / "op"
    order.mkdir(parents=True)
    for index in range(2):
        (order / staging.chunk_file_name(index)).write_bytes(b"r" * 32)
    staging.recycle_chunks(order, pool.folder)
    assert list(order.iterdir()) == []
    assert len(pool) == 2 and pool.pooled_bytes == 64
    assert pool.write(tmp_path / "next.bin", b"w" * 32)  # written over a recycled file
    (order / "late.bin").write_bytes(b"l" * 16)
    staging.recycle_chunks(order, pool.folder)  # recycled after the pool last looked
    assert pool.drain() == 32 + 16 and list(pool.folder.iterdir()) == []
