"""The agent's kept windows: thawed windows left staged for their session's first request are
removed when they expire or pass the byte budget (oldest first), and never once a request
claimed them (the connector's scheduler removes those)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.kept import KeptWindows


def stage(root: Path, chunk_root: Path, size: int = 100) -> str:
    """A loaded window's staging, as the agent leaves it: notes folder and chunk folder."""
    op_id = staging.new_op_id()
    staging.op_dir(root, staging.LOAD_DIR, op_id).mkdir(parents=True)
    chunks = staging.op_dir(chunk_root, staging.LOAD_DIR, op_id)
    chunks.mkdir(parents=True)
    (chunks / staging.chunk_file_name(0)).write_bytes(b"k" * size)
    return op_id


def claim(root: Path, op_id: str) -> None:
    """What the scheduler writes when a first request takes the window."""
    notes = staging.op_dir(root, staging.LOAD_DIR, op_id) / staging.FIRST_USE_DIR
    staging.write_json_atomic(notes / staging.SCHEDULER_FILE, {"request_id": "r"})


def present(root: Path, chunk_root: Path, op_id: str) -> tuple[bool, bool]:
    return (
        staging.op_dir(root, staging.LOAD_DIR, op_id).exists(),
        staging.op_dir(chunk_root, staging.LOAD_DIR, op_id).exists(),
    )


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "cwm", tmp_path / "shm"


def test_a_kept_window_is_marked_for_the_connector_and_removed_when_it_expires(
    dirs: tuple[Path, Path],
) -> None:
    root, chunk_root = dirs
    kept = KeptWindows(root, chunk_root, seconds=60, max_bytes=1000)
    op_id = stage(root, chunk_root)
    before = time.time()
    assert kept.keep(op_id, "salt", 256, 100)
    keep = staging.read_json(staging.op_dir(root, staging.LOAD_DIR, op_id) / staging.KEEP_FILE)
    assert keep["cache_salt"] == "salt" and keep["tokens"] == 256 and keep["bytes"] == 100
    assert before + 60 <= keep["expires_at"] <= time.time() + 60
    kept.sweep(now=before + 30)
    assert present(root, chunk_root, op_id) == (True, True) and len(kept) == 1
    kept.sweep(now=before + 61)
    assert present(root, chunk_root, op_id) == (False, False) and len(kept) == 0


def test_past_the_budget_the_oldest_kept_windows_go_first(dirs: tuple[Path, Path]) -> None:
    root, chunk_root = dirs
    kept = KeptWindows(root, chunk_root, seconds=60, max_bytes=250)
    ops = [stage(root, chunk_root) for _ in range(3)]
    for op_id in ops:
        assert kept.keep(op_id, f"salt-{op_id}", 128, 100)
    assert [present(root, chunk_root, op)[1] for op in ops] == [False, True, True]
    assert kept.kept_bytes == 200


def test_a_window_larger_than_the_budget_or_with_keeping_off_is_not_kept(
    dirs: tuple[Path, Path],
) -> None:
    root, chunk_root = dirs
    op_id = stage(root, chunk_root)
    assert not KeptWindows(root, chunk_root, seconds=60, max_bytes=50).keep(op_id, "s", 1, 100)
    assert not KeptWindows(root, chunk_root, seconds=0, max_bytes=500).keep(op_id, "s", 1, 100)
    notes = staging.op_dir(root, staging.LOAD_DIR, op_id)
    assert not (notes / staging.KEEP_FILE).exists()


def test_a_claimed_window_is_left_to_the_scheduler_even_once_expired(
    dirs: tuple[Path, Path],
) -> None:
    root, chunk_root = dirs
    kept = KeptWindows(root, chunk_root, seconds=60, max_bytes=1000)
    op_id = stage(root, chunk_root)
    kept.keep(op_id, "salt", 128, 100)
    claim(root, op_id)
    kept.sweep(now=time.time() + 3600)
    assert present(root, chunk_root, op_id) == (True, True)  # the scheduler removes it
    assert len(kept) == 0 and kept.kept_bytes == 0


def test_release_all_removes_every_unclaimed_window_and_its_keep_note(
    dirs: tuple[Path, Path],
) -> None:
    root, chunk_root = dirs
    kept = KeptWindows(root, chunk_root, seconds=60, max_bytes=1000)
    free, taken = stage(root, chunk_root), stage(root, chunk_root)
    kept.keep(free, "a", 128, 100)
    kept.keep(taken, "b", 128, 100)
    claim(root, taken)
    kept.release_all()
    assert present(root, chunk_root, free) == (False, False)
    assert present(root, chunk_root, taken) == (True, True)
    assert len(kept) == 0


def test_a_new_agent_adopts_unexpired_unclaimed_windows_only(dirs: tuple[Path, Path]) -> None:
    root, chunk_root = dirs
    first = KeptWindows(root, chunk_root, seconds=60, max_bytes=1000)
    live, taken, old = (stage(root, chunk_root) for _ in range(3))
    for op_id in (live, taken, old):
        first.keep(op_id, op_id, 128, 100)
    claim(root, taken)
    note = staging.op_dir(root, staging.LOAD_DIR, old) / staging.KEEP_FILE
    staging.write_json_atomic(note, {"cache_salt": old, "expires_at": time.time() - 1})

    second = KeptWindows(root, chunk_root, seconds=60, max_bytes=1000)
    assert second.adopt(live) and second.kept_bytes == 100
    assert not second.adopt(taken) and second.claimed(taken)
    assert not second.adopt(old)
    assert not second.adopt(stage(root, chunk_root))  # staged, never kept: a dead thaw's


def test_a_window_its_first_request_already_released_is_forgotten(
    dirs: tuple[Path, Path],
) -> None:
    root, chunk_root = dirs
    kept = KeptWindows(root, chunk_root, seconds=60, max_bytes=1000)
    used = stage(root, chunk_root)
    kept.keep(used, "a", 128, 100)
    staging.remove_tree(staging.op_dir(root, staging.LOAD_DIR, used))  # as the scheduler does
    staging.remove_tree(staging.op_dir(chunk_root, staging.LOAD_DIR, used))
    newer = stage(root, chunk_root)
    assert kept.keep(newer, "b", 128, 100)
    assert len(kept) == 1 and kept.kept_bytes == 100  # the budget counts only what is staged
    assert present(root, chunk_root, newer) == (True, True)


@pytest.mark.parametrize(
    "note",
    [
        "not json",
        {"cache_salt": "s", "expires_at": "tomorrow"},
        {"cache_salt": "s", "expires_at": True},
        {"cache_salt": "s"},
        [1, 2],
    ],
)
def test_a_malformed_keep_note_is_not_adopted_and_raises_nothing(
    dirs: tuple[Path, Path], note: object
) -> None:
    root, chunk_root = dirs
    op_id = stage(root, chunk_root)
    path = staging.op_dir(root, staging.LOAD_DIR, op_id) / staging.KEEP_FILE
    if isinstance(note, str):
        path.write_text(note)
    else:
        staging.write_json_atomic(path, note)
    assert not KeptWindows(root, chunk_root, seconds=60, max_bytes=1000).adopt(op_id)
    assert staging.keep_expiry(staging.read_json(path), "s") is None


def test_a_keep_note_for_another_salt_gives_no_expiry() -> None:
    note = {"cache_salt": "a", "expires_at": 123.0}
    assert staging.keep_expiry(note, "a") == 123.0
    assert staging.keep_expiry(note, "b") is None
    assert staging.keep_expiry(note) == 123.0
