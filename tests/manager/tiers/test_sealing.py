"""Encryption at rest (AES-256-GCM per chunk, per-tenant keys) against real managers.

An encrypted tenant's chunk files hold no plaintext KV; thaws are bit-exact (also after a
restart, over the sent-as-stored codec path, and after a key rotation); without the key a
thaw answers FAILED_PRECONDITION / ENCRYPTION_KEY_UNAVAILABLE and sends no chunk byte; a
file moved to another digest fails authentication (DATA_LOSS); fsck verifies sealed chunks
with the key file and warns (not "corrupt") without it; an unencrypted tenant works beside.

Tenants come from bearer tokens (`--auth-file`, cwm_server/manager/rpc/auth.py) where two are
needed; elsewhere everything runs as the tenant `default` (authentication off).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cwm_client import WindowClient, chunks_from_bytes
from cwm_client.chunks import InMemoryChunk
from cwm_client.codecs import BYTEPLANE_ZSTD, LZ4
from cwm_client.errors import DataLoss, FailedPrecondition
from cwm_server.fsck import UNVERIFIABLE, run_fsck
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.rpc import auth
from cwm_server.manager.tiers.format import HEADER_SIZE
from cwm_server.manager.tiers.sealing import (
    SEALED,
    KeyFileError,
    Keyring,
    parse_envelope,
    parse_key,
)
from tests.helpers import FINGERPRINT, ManagerProcess, ThreadedManager, token_ids

PER_TOKEN = 2048  # bytes of KV per token of FINGERPRINT
WINDOW = 64  # the plaintext search looks for every aligned run of this many bytes


def key_text(seed: int) -> str:
    return "base64:" + base64.b64encode(bytes(np.random.default_rng(seed).bytes(32))).decode()


def write_keys(path: Path, tenants: dict[str, tuple[str, dict[str, int]]]) -> Path:
    """tenant -> (active key id, {key id: seed of its key})."""
    lines = []
    for tenant, (active, keys) in tenants.items():
        lines.append(f'[tenants."{tenant}"]')
        if active:
            lines.append(f'active = "{active}"')
        lines.append(f'[tenants."{tenant}".keys]')
        lines += [f'"{key_id}" = "{key_text(seed)}"' for key_id, seed in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def kv_chunks(seed: int, count: int) -> list[InMemoryChunk]:
    """`count` chunks of 256 tokens: random bytes, but every other chunk low in entropy
    (bf16-like: one byte plane nearly constant) so that compression pays for it and the
    sealed bytes are compressed ones."""
    rng = np.random.default_rng(seed)
    pieces = []
    for index in range(count):
        data = rng.integers(0, 256, size=256 * PER_TOKEN, dtype=np.uint8)
        if index % 2:
            data[1::2] = 0x3F
        pieces.append(data.tobytes())
    return chunks_from_bytes(pieces, 256, 256 * count)


def files_of(data_dir: Path, tenant: str) -> list[Path]:
    root = data_dir / "chunks" / tenant
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def file_codec(path: Path) -> int:
    return int(path.read_bytes()[5])


def leaked_windows(path: Path, plaintext: list[bytes]) -> int:
    """How many offsets of the file start a WINDOW-byte run found in the plaintext (every
    aligned WINDOW-byte run of every chunk is looked for, at every offset of the file)."""
    wanted = {
        raw[i : i + WINDOW] for raw in plaintext for i in range(0, len(raw) - WINDOW + 1, WINDOW)
    }
    data = path.read_bytes()
    return sum(1 for o in range(len(data) - WINDOW + 1) if data[o : o + WINDOW] in wanted)


def chunk_path(data_dir: Path, tenant: str, digest: bytes) -> Path:
    return data_dir / "chunks" / tenant / digest.hex()[:2] / digest.hex()


def thaw_bytes(client: WindowClient, name: str, **kwargs: object) -> list[bytes]:
    with client.thaw(name, **kwargs) as stream:  # type: ignore[arg-type]
        return [bytes(chunk.data) for chunk in stream]


@pytest.fixture
def processes() -> Iterator[list[ManagerProcess]]:
    started: list[ManagerProcess] = []
    yield started
    for proc in started:
        proc.stop()


def start(processes: list[ManagerProcess], data_dir: Path, *args: str) -> ManagerProcess:
    proc = ManagerProcess(data_dir, ["--log-level", "WARNING", *args])
    processes.append(proc)
    return proc.start()


# -- tests --------------------------------------------------------------------------------


def test_key_file_parsing(tmp_path: Path) -> None:
    hex_key = "00" * 32
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[tenants.a]\nactive = "k2"\n[tenants.a.keys]\nk1 = "hex:{hex_key}"\n'
        f'k2 = "{key_text(1)}"\n[tenants.b.keys]\nold = "{hex_key}"\n'
    )
    ring = Keyring.load(path)
    assert ring.encrypts("a") and not ring.encrypts("b") and not ring.encrypts("c")
    assert ring.tenants["a"].keys["k1"] == bytes(32)
    assert parse_key(base64.b64encode(bytes(range(32))).decode()) == bytes(range(32))
    for bad in (
        '[tenants.a]\nactive = "nope"\n[tenants.a.keys]\nk1 = "hex:' + hex_key + '"\n',
        '[tenants.a.keys]\nk1 = "hex:0011"\n',  # 2 bytes, not 32
        '[tenants.a.keys]\n"bad id!" = "hex:' + hex_key + '"\n',
        '[tenants.a.keys]\nk1 = "not base64 at all!"\n',
        "[keys]\n",
    ):
        path.write_text(bad)
        with pytest.raises(KeyFileError):
            Keyring.load(path)


def test_encrypted_tenant_beside_an_unencrypted_one(tmp_path: Path) -> None:
    """Two tenants (bearer tokens) on one manager; only `acme` has a key."""
    tokens = {"acme": auth.mint_token(), "plain": auth.mint_token()}
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text("".join(auth.token_line(t, n, "writer") for n, t in tokens.items()))
    keys = write_keys(tmp_path / "keys.toml", {"acme": ("k1", {"k1": 1})})
    manager = ThreadedManager(
        ManagerConfig(
            data_dir=tmp_path / "data",
            listen="127.0.0.1:0",
            key_file=keys,
            memory_cache_bytes=0,  # every thaw reads (and opens) the files
        ),
        ServerOptions(auth_file=auth_file),
    )
    data = manager.config.data_dir
    try:
        secret = kv_chunks(seed=7, count=4)
        plain = kv_chunks(seed=8, count=2)
        sent_compressed = kv_chunks(seed=9, count=2)
        with (
            WindowClient(manager.target, token=tokens["acme"]) as acme,
            WindowClient(manager.target, token=tokens["plain"]) as other,
        ):
            acme.freeze("secret", secret, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 4))
            # The sender-compressed path stores what came; it is sealed all the same.
            acme.freeze(
                "sent-compressed",
                sent_compressed,
                fingerprint=FINGERPRINT,
                token_ids=token_ids(512),
                wire_codec=BYTEPLANE_ZSTD,
            )
            other.freeze("open", plain, fingerprint=FINGERPRINT, token_ids=token_ids(512))

            sealed_files = files_of(data, "acme")
            assert len(sealed_files) == 6
            assert all(file_codec(p) & SEALED for p in sealed_files)
            secret_plaintext = [c.raw for c in [*secret, *sent_compressed]]
            for path in sealed_files:
                assert leaked_windows(path, secret_plaintext) == 0, path
                key_id, _, _ = parse_envelope(path.read_bytes()[HEADER_SIZE:])
                assert key_id == "k1"
            # The control: the unencrypted tenant's files do hold its plaintext, so the
            # search above can find a leak.
            plain_files = files_of(data, "plain")
            assert len(plain_files) == 2
            assert not any(file_codec(p) & SEALED for p in plain_files)
            assert sum(leaked_windows(p, [c.raw for c in plain]) for p in plain_files) > 0

            # Bit-exact round trips, from disk (no memory tier).
            assert thaw_bytes(acme, "secret") == [c.raw for c in secret]
            assert thaw_bytes(acme, "secret", accept_codecs=[BYTEPLANE_ZSTD, LZ4]) == [
                c.raw for c in secret
            ]
            assert thaw_bytes(acme, "sent-compressed") == [c.raw for c in sent_compressed]
            assert thaw_bytes(other, "open") == [c.raw for c in plain]
            # The catalog records the codec inside the envelope, not the sealed flag.
            info = acme.get("secret")
            assert all(not ref.stored_codec & SEALED for ref in info.chunks)
    finally:
        manager.stop()


def test_restart_rotation_shredding_and_swapped_files(
    tmp_path: Path, processes: list[ManagerProcess]
) -> None:
    data = tmp_path / "data"
    keys_v1 = write_keys(tmp_path / "keys-v1.toml", {"default": ("k1", {"k1": 1})})
    chunks = kv_chunks(seed=21, count=3)
    raw = [c.raw for c in chunks]

    first = start(processes, data, "--key-file", str(keys_v1))
    with WindowClient(first.target) as client:
        client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(768))
    first.kill(signal.SIGTERM)

    # fsck verifies sealed chunks with the key file, and only warns without it.
    report = run_fsck(data, key_file=keys_v1)
    assert report.clean and report.chunks_verified == 3 and not report.warnings
    report = run_fsck(data)
    assert report.clean and report.chunks_verified == 0
    assert [w.kind for w in report.warnings] == [UNVERIFIABLE] * 3

    # A restart with the key file reads everything back, bit for bit.
    second = start(processes, data, "--key-file", str(keys_v1))
    with WindowClient(second.target) as client:
        assert thaw_bytes(client, "w") == raw
        assert thaw_bytes(client, "w", accept_codecs=[BYTEPLANE_ZSTD]) == raw
    second.kill(signal.SIGTERM)

    # Rotation: k2 seals new chunks, k1 still opens the old ones.
    keys_v2 = write_keys(tmp_path / "keys-v2.toml", {"default": ("k2", {"k1": 1, "k2": 2})})
    newer = kv_chunks(seed=22, count=2)
    third = start(processes, data, "--key-file", str(keys_v2))
    with WindowClient(third.target) as client:
        assert thaw_bytes(client, "w") == raw
        client.freeze("w2", newer, fingerprint=FINGERPRINT, token_ids=token_ids(512))
        assert thaw_bytes(client, "w2") == [c.raw for c in newer]
    third.kill(signal.SIGTERM)
    for c in newer:
        envelope = chunk_path(data, "default", c.digest).read_bytes()[HEADER_SIZE:]
        assert parse_envelope(envelope)[0] == "k2"
    assert run_fsck(data, key_file=keys_v2).clean

    # Crypto-shredding: k1 deleted. Its chunks cannot be read -- a precise error, and not
    # one chunk byte -- while the window's metadata and k2's chunks still are.
    keys_v3 = write_keys(tmp_path / "keys-v3.toml", {"default": ("k2", {"k2": 2})})
    fourth = start(processes, data, "--key-file", str(keys_v3))
    with WindowClient(fourth.target) as client:
        assert client.get("w").chunk_count == 3
        received: list[bytes] = []
        with pytest.raises(FailedPrecondition) as refused, client.thaw("w") as stream:
            received += [bytes(chunk.data) for chunk in stream]
        assert received == []
        assert refused.value.reason == "ENCRYPTION_KEY_UNAVAILABLE"
        assert refused.value.metadata["key_id"] == "k1"
        assert "'k1'" in refused.value.message and "key" in refused.value.message
        assert thaw_bytes(client, "w2") == [c.raw for c in newer]
    fourth.kill(signal.SIGTERM)
    shredded = run_fsck(data, key_file=keys_v3)
    assert shredded.clean and len(shredded.warnings) == 3

    # No key file at all: the same error for every sealed chunk.
    fifth = start(processes, data)
    with WindowClient(fifth.target) as client, pytest.raises(FailedPrecondition) as refused:
        thaw_bytes(client, "w2")
    assert refused.value.reason == "ENCRYPTION_KEY_UNAVAILABLE"
    fifth.kill(signal.SIGTERM)

    # A sealed file moved over another digest's file fails authentication (the digest is
    # in the associated data): DATA_LOSS, never the other chunk's bytes.
    victim = chunk_path(data, "default", newer[1].digest)
    shutil.copyfile(chunk_path(data, "default", newer[0].digest), victim)
    sixth = start(processes, data, "--key-file", str(keys_v2))
    with WindowClient(sixth.target) as client:
        got: list[bytes] = []
        with pytest.raises(DataLoss) as lost, client.thaw("w2") as stream:
            got += [bytes(chunk.data) for chunk in stream]
        assert lost.value.reason == "CHUNK_CORRUPT"
        assert "authentication" in lost.value.message
        assert newer[0].raw not in got[1:]
        assert thaw_bytes(client, "w") == raw
    sixth.kill(signal.SIGTERM)
    report = run_fsck(data, key_file=keys_v2)
    assert [p.kind for p in report.problems] == ["corrupt"]
    assert "quarantined" in report.problems[0].message  # the thaw that found it moved it


def test_tampered_header_fails_authentication(tmp_path: Path) -> None:
    """The codec and sizes in the file header are bound to the envelope too."""
    keys = write_keys(tmp_path / "keys.toml", {"default": ("k1", {"k1": 3})})
    config = ManagerConfig(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", key_file=keys, memory_cache_bytes=0
    )
    manager = ThreadedManager(config)
    try:
        chunks = kv_chunks(seed=30, count=1)
        with WindowClient(manager.target) as client:
            client.freeze("t", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256))
            path = chunk_path(config.data_dir, "default", chunks[0].digest)
            blob = bytearray(path.read_bytes())
            magic, version, codec, word, raw_size = struct.unpack_from("<4sBBHQ", blob)
            struct.pack_into("<4sBBHQ", blob, 0, magic, version, codec, word, raw_size - 2)
            path.write_bytes(bytes(blob))
            with pytest.raises(DataLoss) as lost:
                thaw_bytes(client, "t")
            assert "authentication" in lost.value.message
    finally:
        manager.stop()


def test_serve_refuses_a_bad_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text('[tenants.a.keys]\nk1 = "hex:00"\n')
    proc = ManagerProcess(tmp_path / "data", ["--key-file", str(bad)])
    with pytest.raises(RuntimeError, match="AES-256 needs 32 bytes"):
        proc.start(timeout=30)
    assert os.path.exists(proc.log_path)
