"""The manager's one connection (pool) to Redis: `RedisLink`, and how tenants appear in keys.

The chunk tier (`tiers.redis`) and, in shared mode, the catalog (`catalog.redis`) both use
the link. It fails fast: short socket timeouts, no client-side retries, and after a failure
every call answers UNAVAILABLE at once for `retry_after_s` (a circuit breaker), so a manager
whose Redis is gone answers at once instead of queueing callers behind connect timeouts.
The health check (`health.RedisCheck`) pings it and closes the breaker as soon as Redis is
back. Works with a single Redis (or Valkey) and with Redis Cluster.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog

from cwm_client.errors import CwmError, FailedPrecondition, ResourceExhausted, Unavailable

log = structlog.get_logger("cwm.redis")

T = TypeVar("T")

# redis-py is imported on first use (`_load_redis`), not here: it pulls in cryptography and
# OpenSSL, RSS that a manager without Redis should not carry (its memory bound is a
# promise). Until then these are placeholders; `except` clauses read them at run time.
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


def _strip_pipeline_note(detail: str) -> str:
    """Redis's own words from a pipelined command's error ("Command # 2 (MSET ...) of
    pipeline caused error: OOM ..." -> "OOM ...")."""
    marker = "caused error: "
    return detail.split(marker, 1)[1] if marker in detail else detail
