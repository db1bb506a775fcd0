"""The Redis tier: chunk bytes in a single Redis (or Valkey) or in Redis Cluster.

`RedisLink` is the one connection (pool) a manager keeps to Redis; the chunk tier here and,
in shared mode, the catalog (`redis_catalog`) both use it. It fails fast: short socket
timeouts, no client-side retries, and after a failure every call answers UNAVAILABLE at
once for `retry_after_s` (a circuit breaker), so a manager whose Redis is gone answers in
milliseconds instead of queueing callers behind connect timeouts. The health check
(`health.RedisCheck`) pings it and closes the breaker as soon as Redis is back.

Key layout (``prefix`` defaults to ``cwm``)::

    cwm:chunk:{<tenant>:<digest hex>}       one chunk's stored (maybe compressed) bytes
    cwm:chunkinfo:{<tenant>:<digest hex>}   its 16-byte header: magic, version, codec,
                                            word size, raw size

The hash tag is the tenant *and the digest*, so one window's chunks spread over every
master of a cluster (no hot slot for a big window), while a chunk's two keys share a slot:
they are written together by one MSET, read together by one MGET and deleted by one DEL,
atomically. Keeping the header apart means the bytes go out and come back exactly as
stored, never copied to prepend or strip a header (on a small VM a 1 MiB copy costs about
as much as sending it to a local Redis). Nothing here trusts what it reads: `ChunkStore`
verifies every chunk against its digest.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog

from cwm_client.errors import CwmError, FailedPrecondition, ResourceExhausted, Unavailable
from cwm_server.manager.tiers.disk import HEADER_SIZE, StoredChunk, pack_header, unpack_header

log = structlog.get_logger("cwm.redis")

T = TypeVar("T")

MAGIC = b"CWMR"
"""The header is the disk tier's (`disk_tier.pack_header`) with this magic."""

# redis-py is imported on first use (`_load_redis`), not here: it pulls in cryptography and
# OpenSSL, ~21 MiB of RSS that a manager without Redis should not carry (its memory bound
# is a promise). Until then these are placeholders; `except` clauses read them at run time.
redis: Any = None
rexc: Any = None
NoBackoff: Any = None
ClusterNode: Any = None
RedisCluster: Any = None
Retry: Any = None
REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError,)
"""What means "Redis cannot be reached (or cannot serve) now" rather than a bug."""
REDIS_REFUSALS: tuple[type[BaseException], ...] = ()
"""Redis answered, but refused the command (full, misconfigured, busy): see `refusal`."""


def _load_redis() -> bool:
    """Import redis-py (`pip install cwm[redis]`) and fill in the names above; False if
    it is not installed."""
    global redis, rexc, NoBackoff, ClusterNode, RedisCluster, Retry, REDIS_ERRORS
    global REDIS_REFUSALS
    if redis is not None:
        return True
    try:
        import redis as redis_py
        import redis.backoff as backoff
        import redis.cluster as cluster
        import redis.exceptions as exceptions
        import redis.retry as retries
    except ImportError:  # pragma: no cover - exercised only without redis-py
        return False
    rexc, NoBackoff, ClusterNode, RedisCluster, Retry = (
        exceptions,
        backoff.NoBackoff,
        cluster.ClusterNode,
        cluster.RedisCluster,
        retries.Retry,
    )
    REDIS_ERRORS = (
        exceptions.ConnectionError,
        exceptions.TimeoutError,
        exceptions.ClusterError,
        exceptions.TryAgainError,
        exceptions.MasterDownError,
        exceptions.ReadOnlyError,
        OSError,
    )
    REDIS_REFUSALS = (exceptions.ResponseError,)
    redis = redis_py
    return True


REFUSAL_NOTED_S = 60.0
"""How long a refusal (e.g. Redis full) keeps the health check's Redis component DEGRADED."""

_TRANSIENT_REFUSALS = ("BUSY", "MISCONF", "NOREPLICAS", "LOADING", "TRYAGAIN", "MASTERDOWN")
_CONFIG_REFUSALS = ("NOPERM", "WRONGTYPE", "NOAUTH", "WRONGPASS")

_SAFE_TENANT = re.compile(r"[A-Za-z0-9._-]{1,128}")


def tenant_tag(tenant: str) -> str:
    """A tenant name as it appears inside keys: as is when it is plain, else hex (so no
    tenant can put braces or colons into a key and move its hash tag)."""
    if _SAFE_TENANT.fullmatch(tenant):
        return tenant
    return "~" + tenant.encode().hex()


def tenant_from_tag(tag: str) -> str | None:
    """The tenant a key's tag names (`tenant_tag` reversed); None if it names none."""
    if tag.startswith("~"):
        try:
            return bytes.fromhex(tag[1:]).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    return tag if _SAFE_TENANT.fullmatch(tag) else None


def parse_urls(value: str) -> tuple[str, ...]:
    """`--redis-url` takes one URL or several separated by commas (cluster seed nodes)."""
    urls = tuple(part.strip() for part in value.split(",") if part.strip())
    for url in urls:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"expected redis://HOST:PORT, rediss://HOST:PORT or unix:///PATH, got {url!r}"
            )
    return urls


class RedisLink:
    """A fail-fast client for one Redis deployment, shared by the tier and the catalog.

    Calls run on whatever thread calls them (redis-py's clients are thread-safe).
    `listeners` hear (up, detail) whenever the link goes down or comes back."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        cluster: bool = False,
        timeout_s: float = 0.5,
        retry_after_s: float = 0.5,
    ) -> None:
        if not urls:
            raise ValueError("at least one Redis URL is needed")
        if not _load_redis():
            raise ValueError("--redis-url needs redis-py: pip install 'cwm[redis]'")
        self.urls = tuple(urls)
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.listeners: list[Callable[[bool, str], None]] = []
        self._client: Any = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._down_detail = ""
        self._scripts: dict[str, Any] = {}
        self.last_refusal: tuple[float, str, str] | None = None
        """(monotonic time, reason, Redis's words) of the last command Redis refused
        (REDIS_FULL, REDIS_REFUSED): the health check reports it for a while."""

    @property
    def where(self) -> str:
        """The deployment, for messages (passwords hidden)."""
        shown = [re.sub(r"//[^@/]*@", "//***@", url) for url in self.urls]
        return ("cluster " if self.cluster else "") + ",".join(shown)

    @property
    def up(self) -> bool:
        return not self._down_detail

    # -- the client -------------------------------------------------------------------

    def _connect(self) -> Any:
        common: dict[str, Any] = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        if not self.cluster:
            return redis.Redis.from_url(self.urls[0], **common)
        nodes = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme == "unix":
                raise ValueError("Redis Cluster seeds must be redis:// or rediss:// URLs")
            nodes.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))
        first = urlsplit(self.urls[0])
        if first.password:
            common["password"] = first.password
        if first.username:
            common["username"] = first.username
        if first.scheme == "rediss":
            common["ssl"] = True
        client = RedisCluster(
            startup_nodes=nodes,
            require_full_coverage=True,
            **common,
        )
        return client

    def client(self) -> Any:
        """The client, made on first use (a cluster client asks the seeds for the slot
        map when it is made, so it is made again after a failed start)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._connect()
                    except rexc.RedisClusterException as exc:  # no seed answered
                        raise rexc.ConnectionError(str(exc)) from exc
                client = self._client
        return client

    def script(self, source: str) -> Any:
        """A registered Lua script (EVALSHA, loading it where a node lacks it)."""
        client = self.client()
        key = f"{id(client)}:{hash(source)}"
        found = self._scripts.get(key)
        if found is None:
            found = client.register_script(source)
            self._scripts[key] = found
        return found

    # -- calls ------------------------------------------------------------------------

    def call(self, fn: Callable[[Any], T], what: str = "Redis") -> T:
        """`fn(client)`, or UNAVAILABLE at once if Redis failed less than `retry_after_s`
        ago, or UNAVAILABLE when this call fails to reach it."""
        if self._down_detail and time.monotonic() < self._retry_at:
            raise self._unavailable(what, self._down_detail)
        try:
            result = fn(self.client())
        except REDIS_ERRORS as exc:
            detail = _describe(exc)
            self.mark_down(detail)
            raise self._unavailable(what, detail) from None
        except REDIS_REFUSALS as exc:
            # Redis is reachable and answered with an error: not an outage (no breaker),
            # but a condition of the server (full, misconfigured), never INTERNAL.
            raise self.refusal(what, exc) from None
        if self._down_detail:
            self.mark_up()
        return result

    def refusal(self, what: str, exc: BaseException) -> CwmError:
        """The status for a command Redis refused: full (OOM under `maxmemory-policy
        noeviction`) is RESOURCE_EXHAUSTED (REDIS_FULL); an ACL or a key of the wrong type
        (another program's key under `redis_prefix`) FAILED_PRECONDITION; anything else
        (busy, cannot persist, too few replicas) UNAVAILABLE. Logged and noted for the
        health check."""
        words = _describe(_strip_pipeline_note(str(exc) or type(exc).__name__))
        code = words.split(" ", 1)[0]
        oom = isinstance(exc, rexc.OutOfMemoryError) or code == "OOM" or "maxmemory" in words
        if oom:
            error: CwmError = ResourceExhausted(
                f"{what}: Redis ({self.where}) is full ({words}); delete windows, raise "
                "Redis's maxmemory or add memory, then retry",
                reason="REDIS_FULL",
            )
        elif code in _CONFIG_REFUSALS:
            error = FailedPrecondition(
                f"{what}: Redis ({self.where}) refused the command ({words}); check the "
                "Redis user's permissions and that nothing else writes keys under the "
                "manager's redis_prefix",
                reason="REDIS_REFUSED",
            )
        else:
            transient = code in _TRANSIENT_REFUSALS
            error = Unavailable(
                f"{what}: Redis ({self.where}) refused the command ({words})"
                + ("; retry later" if transient else "; the manager's log has details"),
                reason="REDIS_REFUSED",
            )
        self.last_refusal = (time.monotonic(), error.reason or "REDIS_REFUSED", words)
        log.warning("redis_refused", where=self.where, what=what, reason=error.reason, detail=words)
        return error

    def recent_refusal(self, within_s: float = REFUSAL_NOTED_S) -> tuple[str, str] | None:
        """(reason, Redis's words) of a refusal less than `within_s` ago, else None."""
        refusal = self.last_refusal
        if refusal is None or time.monotonic() - refusal[0] > within_s:
            return None
        return refusal[1], refusal[2]

    def ping(self) -> tuple[bool, str]:
        """One PING past the breaker (the health check); marks the link up or down."""
        try:
            client = self.client()
            if self.cluster:
                # Every node answers, and each says the cluster serves every slot (a node
                # that just came back answers PING before the cluster is whole again).
                infos = client.cluster_info(target_nodes=RedisCluster.ALL_NODES)
                per_node = infos.values() if isinstance(infos, dict) else [infos]
                bad = [
                    str(info.get("cluster_state"))
                    for info in per_node
                    if isinstance(info, dict) and str(info.get("cluster_state")) != "ok"
                ]
                if bad:
                    raise rexc.ClusterDownError(f"cluster_state is {bad[0]} on a node")
            else:
                client.ping()
        except REDIS_ERRORS as exc:
            detail = _describe(exc)
            self.mark_down(detail)
            return False, detail
        except Exception as exc:  # noqa: BLE001 - e.g. a cluster that cannot be mapped
            detail = _describe(exc)
            self.mark_down(detail)
            return False, detail
        self.mark_up()
        return True, ""

    def mark_down(self, detail: str) -> None:
        was_up = not self._down_detail
        self._down_detail = detail or "unreachable"
        self._retry_at = time.monotonic() + self.retry_after_s
        if self.cluster:
            # A cluster client that never mapped the slots is made again on next use.
            with self._lock:
                client = self._client
                if client is not None and not getattr(client, "nodes_manager", None):
                    self._client = None
        if was_up:
            log.warning("redis_down", where=self.where, detail=self._down_detail)
            for listener in list(self.listeners):
                listener(False, self._down_detail)

    def mark_up(self) -> None:
        if not self._down_detail:
            return
        self._down_detail = ""
        log.info("redis_up", where=self.where)
        for listener in list(self.listeners):
            listener(True, "")

    def _unavailable(self, what: str, detail: str) -> Unavailable:
        return Unavailable(
            f"{what}: Redis ({self.where}) is unreachable ({detail}); the manager serves "
            "what its local tiers hold and retries Redis by itself; `cwm status` shows "
            "cwm.tier.redis",
            reason="REDIS_UNAVAILABLE",
        )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a dead client
                client.close()


def _describe(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    return text.splitlines()[0][:200]


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _strip_pipeline_note(detail: str) -> str:
    """Redis's own words from a pipelined command's error ("Command # 2 (MSET ...) of
    pipeline caused error: OOM ..." -> "OOM ...")."""
    marker = "caused error: "
    return detail.split(marker, 1)[1] if marker in detail else detail


class RedisTier:
    """Chunk bytes in Redis, keyed by tenant and digest (see the module's key layout)."""

    def __init__(self, link: RedisLink, prefix: str = "cwm") -> None:
        self.link = link
        self.prefix = prefix

    def key(self, tenant: str, digest: bytes) -> str:
        """The key of a chunk's bytes."""
        return f"{self.prefix}:chunk:{{{tenant_tag(tenant)}:{digest.hex()}}}"

    def info_key(self, tenant: str, digest: bytes) -> str:
        """The key of a chunk's header (same hash tag, so the same slot)."""
        return f"{self.prefix}:chunkinfo:{{{tenant_tag(tenant)}:{digest.hex()}}}"

    @staticmethod
    def header(codec: int, word_size: int, raw_size: int) -> bytes:
        return pack_header(codec, word_size, raw_size, MAGIC)

    @staticmethod
    def parse(header: bytes | None, data: bytes | None) -> StoredChunk | None:
        """A chunk from its two values; None if neither exists, ValueError if they do not
        make a chunk."""
        if header is None and data is None:
            return None
        if header is None or data is None:
            raise ValueError("a chunk's header or bytes are missing in Redis")
        codec, word_size, raw_size = unpack_header(header, MAGIC)
        return StoredChunk(codec=codec, word_size=word_size, raw_size=raw_size, data=data)

    def put(
        self,
        tenant: str,
        digest: bytes,
        codec: int,
        word_size: int,
        raw_size: int,
        encoded: bytes | memoryview,
    ) -> int:
        """Store one chunk (one MSET of its two keys); returns the bytes it occupies."""
        mapping = {
            self.info_key(tenant, digest): self.header(codec, word_size, raw_size),
            self.key(tenant, digest): encoded,
        }
        args = [part for pair in mapping.items() for part in pair]
        self.link.call(lambda c: c.execute_command("MSET", *args), "storing a chunk in Redis")
        return HEADER_SIZE + len(encoded)

    def put_many(
        self, tenant: str, items: Iterable[tuple[bytes, int, int, int, bytes | memoryview]]
    ) -> int:
        """Store several chunks (digest, codec, word size, raw size, data) in one pipelined
        round trip (per master, in a cluster); returns the bytes written."""
        mappings = [
            {
                self.info_key(tenant, digest): self.header(codec, word, raw),
                self.key(tenant, digest): data,
            }
            for digest, codec, word, raw, data in items
        ]
        if not mappings:
            return 0

        def _run(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for mapping in mappings:
                pipe.execute_command("MSET", *[part for pair in mapping.items() for part in pair])
            pipe.execute()

        self.link.call(_run, "storing chunks in Redis")
        return sum(HEADER_SIZE + len(data) for m in mappings for data in list(m.values())[1:])

    def get(self, tenant: str, digest: bytes) -> StoredChunk | None:
        """The stored chunk, or None if Redis does not hold it (UNAVAILABLE if Redis cannot
        be reached; ValueError if what it holds is not a chunk)."""
        keys = [self.info_key(tenant, digest), self.key(tenant, digest)]
        header, data = self.link.call(
            lambda c: c.execute_command("MGET", *keys), "reading a chunk from Redis"
        )
        return self.parse(header, data)

    def get_many(self, tenant: str, digests: Sequence[bytes]) -> list[StoredChunk | None]:
        keys = [[self.info_key(tenant, d), self.key(tenant, d)] for d in digests]

        def _run(client: Any) -> list[list[bytes | None]]:
            pipe = client.pipeline(transaction=False)
            for pair in keys:
                pipe.execute_command("MGET", *pair)
            return list(pipe.execute())

        values = self.link.call(_run, "reading chunks from Redis")
        return [self.parse(header, data) for header, data in values]

    def present(self, tenant: str, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` Redis holds (one pipelined EXISTS per chunk)."""
        if not digests:
            return set()
        keys = [(self.info_key(tenant, d), self.key(tenant, d)) for d in digests]

        def _run(client: Any) -> list[int]:
            pipe = client.pipeline(transaction=False)
            for pair in keys:
                pipe.execute_command("EXISTS", *pair)
            return list(pipe.execute())

        found = self.link.call(_run, "looking chunks up in Redis")
        return {d for d, n in zip(digests, found, strict=True) if n == 2}

    def scan_chunks(self) -> Iterator[tuple[str, bytes]]:
        """(tenant tag, digest) of every chunk header under this prefix (SCAN, on every
        master of a cluster): the orphan sweep's census. Slow on a big keyspace."""
        pattern = _glob_escape(f"{self.prefix}:chunkinfo:{{") + "*"

        def _scan(client: Any) -> list[bytes]:
            return list(client.scan_iter(match=pattern, count=1000))

        for key in self.link.call(_scan, "listing chunks in Redis"):
            text = key.decode() if isinstance(key, bytes) else str(key)
            inner = text[text.find("{") + 1 : text.rfind("}")]
            tag, _, hexd = inner.rpartition(":")
            try:
                digest = bytes.fromhex(hexd)
            except ValueError:
                continue
            yield tag, digest

    def remove_many(self, tenant: str, digests: Sequence[bytes]) -> None:
        if not digests:
            return
        keys = [(self.info_key(tenant, d), self.key(tenant, d)) for d in digests]

        def _run(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for pair in keys:
                pipe.execute_command("DEL", *pair)
            pipe.execute()

        self.link.call(_run, "removing chunks from Redis")
