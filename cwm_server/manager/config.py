"""Manager configuration: every bound on memory and size lives here, not in the code
(`ManagerConfig`), and how the manager's server reports on itself and admits callers
(`ServerOptions`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


def default_data_dir() -> Path:
    """Per-user data dir ($XDG_DATA_HOME/cwm, else ~/.local/share/cwm)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cwm"


@dataclass(frozen=True)
class ManagerConfig:
    data_dir: Path
    listen: str = "127.0.0.1:50051"
    memory_cache_bytes: int = 256 * MiB
    """Byte cap of the hot in-memory LRU tier (0 disables it)."""
    stream_window_chunks: int = 4
    """Chunks of one stream held in memory at once: staging on freeze, read-ahead on thaw."""
    max_chunk_bytes: int = 64 * MiB
    """Largest raw chunk accepted; larger ones are refused before any byte is stored."""
    part_bytes: int = MiB
    """Chunk data per Thaw message."""
    compress: bool = True
    """Store a chunk byte-plane+zstd compressed on disk when that saves at least 10%."""
    fsync: bool = True
    """fsync chunk files and their directory before a window commits (durability)."""
    io_threads: int = 4
    """Threads for disk reads/writes and digest checks, so the event loop never blocks."""
    upload_ttl_s: float = 600.0
    """How long the chunks staged by the streams of a parallel freeze are kept, after the
    upload's last stream ended, for a commit that has not come (then they are collected)."""
    quota_file: Path | None = None
    """Per-tenant quotas (TOML, see cwm_server/manager/quotas.py); None: no limits."""
    key_file: Path | None = None
    """Per-tenant encryption keys (TOML, see cwm_server/manager/tiers/sealing.py); None: chunks
    are stored unencrypted (and encrypted ones cannot be read)."""
    ttl_interval_s: float = 30.0
    scrub_interval_s: float = 0.0
    """Seconds between passes of the scrubber that verifies every chunk file (0: off)."""
    scrub_mib_per_s: float = 64.0
    """How fast a scrub pass reads, at most."""
    """Seconds between sweeps of the TTL collector, which deletes expired windows (they are
    invisible from the moment they expire; the sweep frees their space)."""
    redis_url: str = ""
    """Redis tier: one URL (redis://, rediss://, unix://) or, with `redis_cluster`, one or
    more cluster seed URLs separated by commas; empty: no Redis tier."""
    redis_cluster: bool = False
    """The Redis URLs are seeds of a Redis Cluster."""
    redis_catalog: bool = False
    """Keep the window catalog (and chunk refcounts) in Redis, shared by every manager that
    points at the same Redis: the fleet mode. Needs `redis_url`."""
    redis_policy: str = "write-through"
    """`write-through`: chunks go to the disk and Redis before a window commits.
    `redis-only`: Redis is the durable tier, no chunk files (stateless managers)."""
    redis_timeout_s: float = 0.5
    """Socket connect/read timeout for Redis; after a failure Redis calls fail at once
    (UNAVAILABLE) until the health check, or this long, finds it back."""
    redis_prefix: str = "cwm"
    """First part of every Redis key (several fleets can share one Redis)."""


@dataclass(frozen=True)
class ServerOptions:
    """How the manager reports on itself and who may call it (the storage bounds live in
    ManagerConfig); checked before serving by `rpc.transport_security.check_server_options`."""

    metrics_listen: str = ""
    """HOST:PORT of the Prometheus endpoint (/metrics); empty: no endpoint."""
    health_interval_s: float = 5.0
    """Seconds between health checks of the tiers and the catalog."""
    min_free_bytes: int = 1 << 30
    """Below this much free space on the data dir's filesystem the disk tier is DEGRADED."""
    auth_file: Path | None = None
    """Token hashes -> tenant and role (rpc/auth.py); None with no client CA: auth is off."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with tls_key, the port speaks TLS."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA bundle for client certificates: set, every client must present one (mTLS),
    and one with a SAN URI cwm://TENANT/ROLE acts as that tenant and role."""

    bulk_listen: str = "auto"
    """HOST:PORT of the bulk TCP port; "auto": the gRPC host at the gRPC port + 1 (any free
    port when the gRPC port is ephemeral); "off": no bulk TCP port. TLS whenever the gRPC
    port is, with the same certificate (and client CA)."""
    bulk_unix: bool = True
    """Offer callers on this host the bulk Unix socket <data_dir>/bulk.sock."""

    @property
    def auth_enabled(self) -> bool:
        return self.auth_file is not None or self.tls_client_ca is not None
