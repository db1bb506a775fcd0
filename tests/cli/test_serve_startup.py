"""`cwm serve` start-up mistakes: one line on stderr that names the option to change, exit
status 2, no traceback, and nothing made in a data dir it could not serve."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, ManagerProcess


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", "serve", "--log-level", "WARNING", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_naming_listen(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        result = serve("--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}")
    finally:
        taken.close()
    assert_one_line_error(result, "Address already in use; pick another with --listen")
    assert not (tmp_path / "data").exists()


def test_an_address_that_is_not_this_host_s_is_one_line(tmp_path: Path) -> None:
    result = serve("--data-dir", str(tmp_path / "data"), "--listen", "999.1.1.1:5")
    assert_one_line_error(result, "'999.1.1.1' is not an address of this host")
    assert not (tmp_path / "data").exists()


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = serve("--data-dir", str(not_a_dir), "--listen", "127.0.0.1:0")
    assert_one_line_error(result, f"--data-dir {not_a_dir} is not a directory")
    assert not_a_dir.read_text() == "x"


def test_a_data_dir_another_manager_holds_is_one_line(tmp_path: Path) -> None:
    first = ManagerProcess(tmp_path / "data", ["--log-level", "WARNING"]).start()
    try:
        result = serve("--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0")
        assert_one_line_error(result, "another manager is using")
        assert first.proc.poll() is None  # the first one serves on
    finally:
        first.stop()
