"""What any CLI user meets first: `cwm --version`, options before the command's name, a
pipe closed early, and a manager that is not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cwm_client import WindowClient
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ROOT, ThreadedManager, free_port, synthetic_chunks, token_ids

CWM = [sys.executable, "-m", "cwm_server.cli.main"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CWM, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_version_prints_the_package_version() -> None:
    import importlib.metadata

    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cwm {importlib.metadata.version('cwm')}"


def test_client_options_work_before_the_command_name(tmp_path: Path) -> None:
    running = ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", fsync=False)
    )
    try:
        with WindowClient(running.target) as client:
            client.freeze(
                "w",
                synthetic_chunks(256, seed=3),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(256),
            )
        before = run("--manager", running.target, "--json", "ls")
        after = run("ls", "--manager", running.target, "--json")
        assert before.returncode == after.returncode == 0, before.stderr
        assert before.stdout == after.stdout and '"name": "w"' in before.stdout
    finally:
        running.stop()


def test_output_cut_off_by_the_reader_ends_quietly(tmp_path: Path) -> None:
    running = ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", fsync=False)
    )
    try:
        tokens = 256 * 400  # far more token ids than a pipe holds
        with WindowClient(running.target) as client:
            client.freeze(
                "big",
                synthetic_chunks(tokens, seed=4),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(tokens),
            )
        reader = subprocess.Popen(
            [*CWM, "show", "big", "--tokens", "--manager", running.target],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert reader.stdout is not None and reader.stderr is not None
        assert reader.stdout.read(10)
        reader.stdout.close()  # as `| head -c 10` does
        stderr = reader.stderr.read().decode()
        assert reader.wait(timeout=60) == 1
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    finally:
        running.stop()


def test_a_manager_that_is_not_there_gets_a_hint_naming_its_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = run("ls", "--manager", address)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("error: UNAVAILABLE")
    assert f"hint: is `cwm serve` running at {address}?" in result.stderr


def test_serve_help_lists_no_client_options() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    assert "--manager" not in result.stdout and "--token" not in result.stdout


def test_counts_of_one_are_singular() -> None:
    from cwm_server.cli.render import count_of

    assert [count_of(n, "chunk") for n in (0, 1, 2)] == ["0 chunks", "1 chunk", "2 chunks"]


def test_demo_refuses_a_context_the_model_cannot_hold_before_starting_anything() -> None:
    result = run("demo", "--tokens", "8192")
    assert result.returncode == 2
    assert "--tokens 8192 does not fit" in result.stderr and "8080 or less" in result.stderr
    assert run("demo", "--synthetic", "--tokens", "0").returncode == 2
