"""Configuration: one TOML file + CWM_* environment + flags; flags > env > file > defaults.

`cwm config show` prints the effective values with their sources, secrets redacted, and a
real `cwm serve` takes each setting from the layer that should win.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cwm_server.cli.main import build_parser
from cwm_server.settings.loading import ConfigError, load
from cwm_server.settings.rendering import redact
from cwm_server.settings.serve import manager_config
from tests.helpers import ROOT, free_port
from tests.ops_helpers import health_status, scrape

FILE = """
[client]
manager = "127.0.0.1:1"

[serve]
listen = "127.0.0.1:7001"
memory_cache_mib = 16
stream_window_chunks = 3
fsync = false
min_free_mib = 5

[redis]
url = "redis://cwm:hunter2@cache.internal:6379/0"
password = "hunter2"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", FILE)
    environ = {"CWM_MEMORY_CACHE_MIB": "32", "CWM_STREAM_WINDOW_CHUNKS": "5", "HOME": "/x"}
    effective = load({"serve.memory_cache_mib": 8}, str(path), environ)
    assert effective["serve.memory_cache_mib"] == 8  # flag over env over file
    assert effective.sources["serve.memory_cache_mib"] == "flag --memory-cache-mib"
    assert effective["serve.stream_window_chunks"] == 5  # env over file
    assert effective.sources["serve.stream_window_chunks"] == "env CWM_STREAM_WINDOW_CHUNKS"
    assert effective["serve.listen"] == "127.0.0.1:7001"  # file over default
    assert effective["serve.fsync"] is False
    assert effective.sources["serve.listen"] == "file"
    assert effective["serve.max_chunk_mib"] == 64  # default
    assert effective.sources["serve.max_chunk_mib"] == "default"
    assert effective["client.manager"] == "127.0.0.1:1"
    assert set(effective.ignored) == {"redis.url", "redis.password"}

    manager = manager_config(effective)
    assert manager.memory_cache_bytes == 8 << 20
    assert manager.stream_window_chunks == 5
    assert manager.fsync is False and manager.compress is True
    assert manager.upload_ttl_s == 600.0


def test_upload_ttl_is_a_setting(tmp_path: Path) -> None:
    effective = load({"serve.upload_ttl_seconds": 7.5}, None, {"HOME": str(tmp_path)})
    assert effective.sources["serve.upload_ttl_seconds"] == "flag --upload-ttl"
    assert manager_config(effective).upload_ttl_s == 7.5
    from_env = load({}, None, {"HOME": str(tmp_path), "CWM_UPLOAD_TTL_SECONDS": "9"})
    assert manager_config(from_env).upload_ttl_s == 9.0
    with pytest.raises(ConfigError):
        load({}, None, {"HOME": str(tmp_path), "CWM_UPLOAD_TTL_SECONDS": "0"})


def test_file_from_env_and_default_location(tmp_path: Path) -> None:
    path = write(tmp_path / "named.toml", '[serve]\nlisten = "127.0.0.1:9"\n')
    named = load(environ={"CWM_CONFIG": str(path)})
    assert named.file == path and named["serve.listen"] == "127.0.0.1:9"
    xdg = tmp_path / "xdg"
    (xdg / "cwm").mkdir(parents=True)
    write(xdg / "cwm" / "config.toml", '[serve]\nlisten = "127.0.0.1:10"\n')
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(xdg)
    try:
        found = load(environ={})
        assert found.file == xdg / "cwm" / "config.toml"
        assert found["serve.listen"] == "127.0.0.1:10"
    finally:
        if old is None:
            del os.environ["XDG_CONFIG_HOME"]
        else:
            os.environ["XDG_CONFIG_HOME"] = old


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("[serve]\nmemory_cache_mib = 'lots'\n", {}, "serve.memory_cache_mib must be a int"),
        ("[serve]\nfsync = 1\n", {}, "serve.fsync must be a bool"),
        ("[serve]\nlisten = 'nowhere'\n", {}, "expected HOST:PORT"),
        ("[serve]\nlog_level = 'LOUD'\n", {}, "expected one of DEBUG"),
        ("[serve\n", {}, "not valid TOML"),
        ("", {"CWM_IO_THREADS": "0"}, "$CWM_IO_THREADS: expected a number > 0"),
        ("", {"CWM_COMPRESS": "maybe"}, "$CWM_COMPRESS: expected true or false"),
    ],
)
def test_bad_values_are_named(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load({}, str(path), environ)
    assert message in str(caught.value)
    if text:
        assert str(path) in str(caught.value)


def test_redaction() -> None:
    assert redact("redis.password", "hunter2") == "***"
    assert redact("auth.api_key", "k-123") == "***"
    assert redact("client.token", "") == ""
    assert redact("redis.url", "redis://cwm:hunter2@h:6379/0") == "redis://cwm:***@h:6379/0"
    assert redact("serve.listen", "127.0.0.1:1") == "127.0.0.1:1"
    # Paths to where secrets live are shown: that is what an operator checks.
    assert redact("serve.key_file", "/etc/cwm/keys.toml") == "/etc/cwm/keys.toml"
    assert redact("serve.tls_key", "/etc/cwm/server.key") == "/etc/cwm/server.key"
    assert redact("serve.auth_file", "/etc/cwm/auth.toml") == "/etc/cwm/auth.toml"


def cwm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CWM_")}
    env.update(extra)
    return env


def test_config_show_prints_sources_and_redacts(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", FILE)
    env = clean_env(CWM_CONFIG=str(path), CWM_MAX_CHUNK_MIB="32", CWM_TYPO="1")
    shown = cwm("config", "show", "--manager", "flag-host:1", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "hunter2" not in shown.stdout
    assert 'redis.password = "***"' in shown.stdout
    assert "redis://cwm:***@cache.internal" in shown.stdout
    assert 'manager = "flag-host:1"  # flag --manager' in shown.stdout
    assert "max_chunk_mib = 32  # env CWM_MAX_CHUNK_MIB" in shown.stdout
    assert 'listen = "127.0.0.1:7001"  # file' in shown.stdout
    assert "io_threads = 4  # default" in shown.stdout
    # The output is itself a valid config file with the same values.
    reparsed = tomllib.loads(shown.stdout)
    assert reparsed["serve"]["max_chunk_mib"] == 32 and reparsed["serve"]["fsync"] is False

    as_json = json.loads(cwm("config", "show", "--json", env=env).stdout)
    assert as_json["file"] == str(path)
    assert as_json["settings"]["client.manager"] == {
        "value": "127.0.0.1:1",
        "source": "file",
        "env": "CWM_MANAGER",
        "flag": "--manager",
    }
    assert as_json["ignored"]["redis.password"] == "***"
    assert as_json["ignored"]["env CWM_TYPO"] == "1"

    # A client command takes its manager from the same layers.
    assert build_parser().parse_args(["ls", "--manager", "h:1"]).manager == "h:1"
    failed = cwm("ls", env=env)  # 127.0.0.1:1 does not resolve: the error names it
    assert failed.returncode == 1 and "127.0.0.1:1" in failed.stderr

    bad = cwm("config", "show", "--config", str(tmp_path / "missing.toml"), env=clean_env())
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_serve_takes_each_setting_from_the_winning_layer(tmp_path: Path) -> None:
    metrics_port = free_port()
    path = write(
        tmp_path / "config.toml",
        f"""
[serve]
listen = "127.0.0.1:0"
metrics = "127.0.0.1:{metrics_port}"
memory_cache_mib = 16
min_free_mib = 1000000000000
log_level = "WARNING"
""",
    )
    data_dir = tmp_path / "from-env"
    port_file = tmp_path / "port"
    env = clean_env(CWM_DATA_DIR=str(data_dir), CWM_MEMORY_CACHE_MIB="32", CWM_MIN_FREE_MIB="0")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cwm_server.cli.main",
            "serve",
            "--config",
            str(path),
            "--port-file",
            str(port_file),
            "--memory-cache-mib",
            "8",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "manager did not start"
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text()}"
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")  # file: metrics
        capacity = samples[("cwm_tier_capacity_bytes", (("tier", "memory"),))]
        assert capacity == 8 << 20  # flag over env over file
        assert health_status(target, "cwm.tier.disk")[0] == "SERVING"  # env 0 over file
        assert (data_dir / "catalog.sqlite").exists()  # env data dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # log_level WARNING from the file: no info lines.
    assert '"serving"' not in (tmp_path / "serve.log").read_text()

    broken = write(tmp_path / "broken.toml", "[serve]\nmemory_cache_mib = -1\n")
    done = cwm("serve", "--config", str(broken), env=clean_env())
    assert done.returncode == 2
    assert "serve.memory_cache_mib" in done.stderr and str(broken) in done.stderr
