"""`rediss://`: a manager reaches a TLS-only redis-server through a private CA, and a URL
without that CA is refused (degraded, not hung) instead of trusting the server blindly."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from cwm_client import WindowClient
from cwm_client.errors import Unavailable
from tests.helpers import FINGERPRINT, free_port, synthetic_chunks, token_ids
from tests.ops_helpers import health_status, wait_for
from tests.redis_helpers import RedisManager, catalog_audit, redis_config
from tests.tls_certs import CertificateAuthority

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


class TlsRedis:
    """One redis-server that only speaks TLS, with certificates from its own CA."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        ca = CertificateAuthority("cwm redis test CA")
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(ca.pem)
        self.cert, self.key = ca.server().write(directory, "redis")
        log = open(directory / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no",
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(directory),
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((directory / "redis.log").read_text()[-2000:])
            time.sleep(0.05)

    def url(self, with_ca: bool = True) -> str:
        base = f"rediss://127.0.0.1:{self.port}"
        return f"{base}?ssl_ca_certs={quote(str(self.ca_file))}" if with_ca else base

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.ca_file),
            socket_timeout=5,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def test_fleet_mode_over_rediss_with_a_private_ca(tmp_path: Path, tls_redis: TlsRedis) -> None:
    one = RedisManager(redis_config(tmp_path / "m1", tls_redis.url()))
    two = RedisManager(redis_config(tmp_path / "m2", tls_redis.url(), redis_policy="redis-only"))
    chunks = synthetic_chunks(256 * 3, seed=41)
    try:
        with WindowClient(one.target) as first, WindowClient(two.target) as second:
            first.freeze("tls", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 3))
            assert [w.name for w in second.list()] == ["tls"]
            with second.thaw("tls") as stream:
                assert [bytes(c.data) for c in stream] == [c.data() for c in chunks]
            audit = catalog_audit(tls_redis.client())
            assert len(audit["chunk_keys"]) == len(chunks)
            second.delete("tls")
            assert list(first.list()) == []
        assert catalog_audit(tls_redis.client())["chunk_keys"] == set()
    finally:
        two.stop()
        one.stop()


def test_rediss_without_the_ca_is_refused_quickly(tmp_path: Path, tls_redis: TlsRedis) -> None:
    """The server's certificate is not trusted by the system store: the manager must not
    connect (no silent downgrade), and answers UNAVAILABLE fast while degraded."""
    manager = RedisManager(redis_config(tmp_path / "m", tls_redis.url(with_ca=False)))
    try:
        wait_for(
            lambda: health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING",
            what="redis component down",
        )
        with WindowClient(manager.target) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                list(client.list())
            assert time.monotonic() - started < 1.0
    finally:
        manager.stop()
