"""The window catalog in Redis (or Redis Cluster), shared by every manager of a fleet.

Key layout (``prefix`` defaults to ``cwm``; ``T`` is the tenant, see `redis_tier.tenant_tag`)::

    cwm:cat:{T}:windows   hash  name -> WindowInfo (FULL view, serialized)
    cwm:cat:{T}:basic     hash  name -> WindowInfo (BASIC view)
    cwm:cat:{T}:wchunks   hash  name -> the window's chunk digests, 32 bytes each, in order
    cwm:cat:{T}:names     zset  name (score 0: ordered by name, for paging)
    cwm:cat:{T}:expiry    zset  name -> expires_at (windows with a TTL that are not pinned)
    cwm:cat:{T}:refs      hash  digest -> reference count (windows using the chunk)
    cwm:cat:{T}:meta      hash  digest -> "raw_size stored_size codec"
    cwm:cat:{T}:epoch     int   bumped each time a chunk is claimed for collection
    cwm:cat:{T}:freed     zset  digest -> epoch of its last claim (the newest 10,000)
    cwm:cat:{T}:floor     int   the highest epoch trimmed from `freed`
    cwm:cat:{T}:dying     hash  digest -> time its bytes started being collected
    cwm:tenants           set   tenants that have a catalog

**Atomicity.** Every key of one tenant's catalog carries the hash tag ``{T}``, so in a
cluster they share one slot and each change (commit, clone, delete) is one Lua script:
atomic, with the refcounts of all the window's chunks. The price: one tenant's catalog lives
on one master (its catalog traffic, small messages, does not spread); chunk *bytes* carry
their own tag (tenant + digest, see `redis_tier`) and spread over every master.

**Collection without losing a chunk.** Bytes and catalog live in different slots, so no
script can delete a chunk's bytes and check its refcount at once. Collection therefore
*claims* first (a script: no row and nobody collecting it → mark it dying and bump the
tenant's epoch), deletes the bytes, then clears the claim. A commit that needs a chunk with
no row reads the epoch, checks (outside the script) that the bytes exist, and commits with
that epoch: the script refuses (and the commit retries) if the chunk is dying or was claimed
after that epoch, since its bytes may be gone by then. A chunk with a row is never claimed,
so its bytes stay. Concurrent clones and deletes through any number of managers therefore
neither lose a chunk a window references nor leak one no window references.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import Aborted, FailedPrecondition, Unavailable
from cwm_server.manager.catalog.sqlite import (
    ChunkRow,
    CommitAbandoned,
    NewChunk,
    WindowExists,
    WindowGone,
    basic_view,
)
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.quotas import Usage
from cwm_server.manager.tiers.redis import RedisLink, RedisTier, parse_urls, tenant_tag

log = structlog.get_logger("cwm.redis_catalog")

FREED_KEPT = 10_000
COMMIT_ATTEMPTS = 50
STALE_CLAIM_S = 30.0
REDIS_POLICIES = ("write-through", "redis-only")

_KEY_NAMES = (
    "windows",
    "basic",
    "wchunks",
    "names",
    "refs",
    "meta",
    "expiry",
    "epoch",
    "freed",
    "dying",
    "floor",
)

_LUA_COMMON = """
local function live(name, now)
  if redis.call('HEXISTS', KEYS[1], name) == 0 then return false end
  local e = redis.call('ZSCORE', KEYS[7], name)
  if e and tonumber(e) <= now then return false end
  return true
end
local function counts_of(packed)
  local counts, order = {}, {}
  for i = 1, #packed, 32 do
    local d = string.sub(packed, i, i + 31)
    if not counts[d] then counts[d] = 0; order[#order + 1] = d end
    counts[d] = counts[d] + 1
  end
  return counts, order
end
local function drop(name)
  local packed = redis.call('HGET', KEYS[3], name)
  redis.call('HDEL', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
  redis.call('HDEL', KEYS[3], name)
  redis.call('ZREM', KEYS[4], name)
  redis.call('ZREM', KEYS[7], name)
  local freed = {}
  if not packed then return freed end
  local counts, order = counts_of(packed)
  for _, d in ipairs(order) do
    local n = redis.call('HINCRBY', KEYS[5], d, -counts[d])
    if n <= 0 then
      redis.call('HDEL', KEYS[5], d)
      local m = redis.call('HGET', KEYS[6], d) or ''
      redis.call('HDEL', KEYS[6], d)
      freed[#freed + 1] = d
      freed[#freed + 1] = m
    end
  end
  return freed
end
local function insert(name, full, basic, packed, expires)
  redis.call('HSET', KEYS[1], name, full)
  redis.call('HSET', KEYS[2], name, basic)
  redis.call('HSET', KEYS[3], name, packed)
  redis.call('ZADD', KEYS[4], 0, name)
  if expires ~= '' then redis.call('ZADD', KEYS[7], expires, name) end
end
"""

# ARGV: now, replace, epoch, name, full, basic, packed, expires, then (digest, count, meta)*
_COMMIT = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local name = ARGV[4]
if live(name, now) and ARGV[2] ~= '1' then return {'EXISTS'} end
local e1 = tonumber(ARGV[3])
if e1 < tonumber(redis.call('GET', KEYS[11]) or '0') then return {'RETRY'} end
local n = (#ARGV - 8) / 3
for i = 0, n - 1 do
  local d = ARGV[9 + 3 * i]
  if redis.call('HEXISTS', KEYS[5], d) == 0 then
    if redis.call('HEXISTS', KEYS[10], d) == 1 then return {'RETRY'} end
    local fe = redis.call('ZSCORE', KEYS[9], d)
    if fe and tonumber(fe) > e1 then return {'RETRY'} end
    if ARGV[11 + 3 * i] == '' then return {'GONE', d} end
  end
end
for i = 0, n - 1 do
  local d = ARGV[9 + 3 * i]
  local c = tonumber(ARGV[10 + 3 * i])
  if redis.call('HINCRBY', KEYS[5], d, c) == c then
    redis.call('HSET', KEYS[6], d, ARGV[11 + 3 * i])
  end
end
local freed = {}
if redis.call('HEXISTS', KEYS[1], name) == 1 then freed = drop(name) end
insert(name, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
local out = {'OK'}
for _, v in ipairs(freed) do out[#out + 1] = v end
return out
"""
)

# ARGV: now, source, name, full, basic, packed (the source's chunks as read), expires
_CLONE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local source, name = ARGV[2], ARGV[3]
if live(name, now) then return {'EXISTS'} end
if not live(source, now) then return {'GONE'} end
local packed = redis.call('HGET', KEYS[3], source) or ''
if packed ~= ARGV[6] then return {'CHANGED'} end
local counts, order = counts_of(packed)
for _, d in ipairs(order) do redis.call('HINCRBY', KEYS[5], d, counts[d]) end
local freed = {}
if redis.call('HEXISTS', KEYS[1], name) == 1 then freed = drop(name) end
insert(name, ARGV[4], ARGV[5], packed, ARGV[7])
local out = {'OK'}
for _, v in ipairs(freed) do out[#out + 1] = v end
return out
"""
)

# ARGV: now, name, only_expired
_DELETE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local name = ARGV[2]
if ARGV[3] == '1' then
  local e = redis.call('ZSCORE', KEYS[7], name)
  if not e or tonumber(e) > now then return {'NONE'} end
elseif not live(name, now) then
  return {'NONE'}
end
local out = {'OK'}
for _, v in ipairs(drop(name)) do out[#out + 1] = v end
return out
"""
)

# ARGV: digests. Returns epoch, then per digest 0 (row), 1 (no row), 2 (no row, dying).
_PREPARE = """
local out = {tonumber(redis.call('GET', KEYS[8]) or '0')}
for i = 1, #ARGV do
  local d = ARGV[i]
  if redis.call('HEXISTS', KEYS[5], d) == 1 then out[#out + 1] = 0
  elseif redis.call('HEXISTS', KEYS[10], d) == 1 then out[#out + 1] = 2
  else out[#out + 1] = 1 end
end
return out
"""

# ARGV: now, kept, stale_before, digests. Claims digests without a row that nobody collects
# (or whose collector stalled before `stale_before`). It starts with a write that cannot grow
# memory (HDEL is not deny-oom): Redis checks `maxmemory` only at a script's first write, so
# a claim (a few bytes) still runs when Redis is full, and the bytes it lets the collector
# delete are what frees Redis (a freeze refused with REDIS_FULL cleans up through it).
_CLAIM = """
redis.call('HDEL', KEYS[10], '')
local now, kept, stale = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local claimed = {}
for i = 4, #ARGV do
  local d = ARGV[i]
  if redis.call('HEXISTS', KEYS[5], d) == 0 then
    local since = redis.call('HGET', KEYS[10], d)
    if (not since) or tonumber(since) < stale then
      local e = redis.call('INCR', KEYS[8])
      redis.call('ZADD', KEYS[9], e, d)
      redis.call('HSET', KEYS[10], d, now)
      claimed[#claimed + 1] = d
    end
  end
end
local size = redis.call('ZCARD', KEYS[9])
if size > kept then
  local old = redis.call('ZRANGE', KEYS[9], size - kept - 1, size - kept - 1, 'WITHSCORES')
  redis.call('SET', KEYS[11], old[2])
  redis.call('ZREMRANGEBYRANK', KEYS[9], 0, size - kept - 1)
end
return claimed
"""


def _pack(digests: Iterable[bytes]) -> bytes:
    return b"".join(digests)


def _meta(chunk: NewChunk) -> bytes:
    return f"{chunk.raw_size} {chunk.stored_size} {chunk.codec}".encode()


def _row(digest: bytes, refcount: Any, meta: Any) -> ChunkRow | None:
    if refcount is None or meta is None:
        return None
    raw, stored, codec = (int(x) for x in bytes(meta).split())
    return ChunkRow(digest, int(refcount), raw, stored, codec)


def _expires(window: pb.WindowInfo) -> str:
    """The expiry index's score: none for a pinned window (it never expires)."""
    if not window.HasField("expires_at") or window.pinned:
        return ""
    return repr(window.expires_at.seconds + window.expires_at.nanos / 1e9)


def _expired(window: pb.WindowInfo, now: float) -> bool:
    expires = _expires(window)
    return bool(expires) and float(expires) <= now


class _WindowCache:
    """The FULL views this manager committed or read lately, by bytes: what `get_window`
    answers while Redis is unreachable, so thaws of windows whose chunks the local tiers
    hold keep working (a window deleted through another manager meanwhile may be served:
    windows are immutable, only their deletion goes unseen)."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, tenant: str, name: str, blob: bytes) -> None:
        if len(blob) > self._capacity:
            return
        with self._lock:
            self._discard((tenant, name))
            self._items[(tenant, name)] = blob
            self._bytes += len(blob)
            while self._bytes > self._capacity:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)

    def get(self, tenant: str, name: str) -> bytes | None:
        with self._lock:
            blob = self._items.get((tenant, name))
            if blob is not None:
                self._items.move_to_end((tenant, name))
            return blob

    def discard(self, tenant: str, name: str) -> None:
        with self._lock:
            self._discard((tenant, name))

    def _discard(self, key: tuple[str, str]) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)


class RedisCatalog:
    """`CatalogLike` in Redis; see the module docstring for keys and atomicity."""

    def __init__(
        self, link: RedisLink, prefix: str = "cwm", window_cache_bytes: int = 64 << 20
    ) -> None:
        self.link = link
        self.prefix = prefix
        self._cache = _WindowCache(window_cache_bytes)
        self.bytes_present: Callable[[str, list[bytes]], set[bytes]] = lambda t, d: set(d)
        """Which of a tenant's chunks have their bytes in Redis (restoring from the local
        tiers what they can): set by the WindowManager to its store's check."""
        self._known_tenants: set[str] = set()

    # -- keys -------------------------------------------------------------------------

    def keys(self, tenant: str) -> list[str]:
        tag = tenant_tag(tenant)
        return [f"{self.prefix}:cat:{{{tag}}}:{what}" for what in _KEY_NAMES]

    def _key(self, tenant: str, what: str) -> str:
        return f"{self.prefix}:cat:{{{tenant_tag(tenant)}}}:{what}"

    @property
    def tenants_key(self) -> str:
        return f"{self.prefix}:tenants"

    def _call(self, fn: Callable[[Any], Any], what: str = "the shared catalog") -> Any:
        return self.link.call(fn, what)

    def _do(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """One redis-py command through the link (UNAVAILABLE when Redis is away)."""
        return self._call(lambda c: getattr(c, command)(*args, **kwargs))

    def _run(self, source: str, tenant: str, args: Sequence[object]) -> Any:
        keys = self.keys(tenant)
        return self._call(lambda _c: self.link.script(source)(keys=keys, args=list(args)))

    def _remember_tenant(self, tenant: str) -> None:
        if tenant not in self._known_tenants:
            self._call(lambda c: c.sadd(self.tenants_key, tenant))
            self._known_tenants.add(tenant)

    def _tenants(self) -> list[str]:
        members = self._call(lambda c: c.smembers(self.tenants_key))
        return sorted(m.decode() for m in members)

    # -- housekeeping -----------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Redis offers no read snapshot across keys; reads here see the latest state."""
        yield

    def close(self) -> None:
        """The link is the manager's; nothing of the catalog's own to close."""

    # -- reads ------------------------------------------------------------------------

    def get_window(self, tenant: str, name: str, full: bool = True) -> pb.WindowInfo | None:
        key = self._key(tenant, "windows" if full else "basic")
        try:
            blob = self._call(lambda c: c.hget(key, name))
        except Unavailable:
            cached = self._cache.get(tenant, name)
            if cached is None:
                raise
            window = pb.WindowInfo.FromString(cached)
            if _expired(window, time.time()):
                return None
            return window if full else basic_view(window)
        if blob is None:
            self._cache.discard(tenant, name)
            return None
        window = pb.WindowInfo.FromString(blob)
        if _expired(window, time.time()):
            return None
        if full:
            self._cache.put(tenant, name, blob)
        return window

    def window_exists(self, tenant: str, name: str, include_expired: bool = False) -> bool:
        windows, expiry = self._key(tenant, "windows"), self._key(tenant, "expiry")

        def _read(client: Any) -> tuple[bool, Any]:
            pipe = client.pipeline(transaction=False)
            pipe.hexists(windows, name)
            pipe.zscore(expiry, name)
            exists, expires = pipe.execute()
            return bool(exists), expires

        exists, expires = self._call(_read)
        if not exists:
            return False
        return include_expired or expires is None or float(expires) > time.time()

    def chunk(self, tenant: str, digest: bytes) -> ChunkRow | None:
        refs, meta = self._key(tenant, "refs"), self._key(tenant, "meta")

        def _read(client: Any) -> tuple[Any, Any]:
            pipe = client.pipeline(transaction=False)
            pipe.hget(refs, digest)
            pipe.hget(meta, digest)
            count, row = pipe.execute()
            return count, row

        count, row = self._call(_read)
        return _row(digest, count, row)

    def missing(self, tenant: str, digests: Iterable[bytes]) -> list[bytes]:
        wanted = list(digests)
        if not wanted:
            return []
        refs = self._key(tenant, "refs")
        counts = self._call(lambda c: c.hmget(refs, wanted))
        return [d for d, n in zip(wanted, counts, strict=True) if n is None]

    def has_chunk_rows(self, tenant: str, digests: Iterable[bytes]) -> set[bytes]:
        wanted = list(set(digests))
        return set(wanted) - set(self.missing(tenant, wanted))

    def list_windows(
        self,
        tenant: str,
        *,
        after: str,
        name_prefix: str,
        session_id: str,
        model_id: str,
        search: str,
        limit: int,
        full: bool,
    ) -> list[pb.WindowInfo]:
        """Windows ordered by name after `after`, filtered (here, not in Redis: the names
        index is paged and each page's views are fetched in one HMGET)."""
        names_key = self._key(tenant, "names")
        views_key = self._key(tenant, "windows" if full else "basic")
        start = f"({after}" if after else "-"
        if name_prefix and name_prefix > after:
            start = f"[{name_prefix}"
        needle = search.lower()
        page = max(limit, 100)
        now = time.time()
        found: list[pb.WindowInfo] = []
        while len(found) < limit:
            names = self._do("zrangebylex", names_key, start, "+", start=0, num=page)
            if not names:
                break
            decoded = [n.decode() for n in names]
            blobs = self._do("hmget", views_key, decoded)
            stop = False
            for name, blob in zip(decoded, blobs, strict=True):
                if name_prefix and not name.startswith(name_prefix):
                    stop = True
                    break
                if blob is None:
                    continue
                window = pb.WindowInfo.FromString(blob)
                if _expired(window, now):
                    continue
                if session_id and window.session_id != session_id:
                    continue
                if model_id and window.fingerprint.model_id != model_id:
                    continue
                if (
                    needle
                    and needle not in name.lower()
                    and needle not in (window.description.lower())
                ):
                    continue
                found.append(window)
                if len(found) >= limit:
                    break
            if stop or len(names) < page:
                break
            start = f"({decoded[-1]}"
        return found

    def iter_all_windows(self) -> Iterator[pb.WindowInfo]:
        for tenant in self._tenants():
            after = ""
            while True:
                batch = self.list_windows(
                    tenant,
                    after=after,
                    name_prefix="",
                    session_id="",
                    model_id="",
                    search="",
                    limit=500,
                    full=True,
                )
                yield from batch
                if len(batch) < 500:
                    break
                after = batch[-1].name

    def iter_chunks(self) -> Iterator[tuple[str, ChunkRow]]:
        for tenant in self._tenants():
            refs = self._do("hgetall", self._key(tenant, "refs"))
            metas = self._do("hgetall", self._key(tenant, "meta"))
            for digest, count in refs.items():
                row = _row(bytes(digest), count, metas.get(digest))
                if row is not None:
                    yield tenant, row

    def refcounts(self, tenant: str) -> dict[bytes, int]:
        """Every chunk row's reference count (checks and tests)."""
        refs = self._call(lambda c: c.hgetall(self._key(tenant, "refs")))
        return {bytes(d): int(n) for d, n in refs.items()}

    def claims(self, tenant: str) -> dict[bytes, float]:
        """Chunks being collected now, and since when (checks and tests)."""
        dying = self._call(lambda c: c.hgetall(self._key(tenant, "dying")))
        return {bytes(d): float(t) for d, t in dying.items()}

    # -- writes -----------------------------------------------------------------------

    def commit_window(
        self,
        window: pb.WindowInfo,
        new_chunks: dict[bytes, NewChunk],
        replace: bool,
        still_wanted: Callable[[], bool] | None = None,
    ) -> list[bytes]:
        """Insert `window` and take a reference on each chunk, in one script (see the
        module docstring for why a chunk without a row is checked against the epoch)."""
        tenant = window.tenant
        self._remember_tenant(tenant)
        counts = Counter(ref.digest for ref in window.chunks)
        digests = list(counts)
        full = window.SerializeToString()
        basic = basic_view(window).SerializeToString()
        packed = _pack(ref.digest for ref in window.chunks)
        for _ in range(COMMIT_ATTEMPTS):
            prepared = self._run(_PREPARE, tenant, digests)
            epoch, flags = int(prepared[0]), [int(f) for f in prepared[1:]]
            if any(f == 2 for f in flags):
                time.sleep(0.005)  # a collector is deleting one of them: let it finish
                continue
            absent = [d for d, f in zip(digests, flags, strict=True) if f == 1]
            if absent:
                present = self.bytes_present(tenant, absent)
                lost = [d for d in absent if d not in present]
                if lost:
                    raise FailedPrecondition(
                        f"chunk {lost[0].hex()[:16]}… is no longer stored (a delete collected "
                        "it while this freeze ran); ask FindMissingChunks again and send "
                        "every chunk it lists",
                        reason="CHUNK_NOT_SENT",
                    )
            if still_wanted is not None and not still_wanted():
                raise CommitAbandoned(window.name)
            args: list[object] = [
                repr(time.time()),
                "1" if replace else "0",
                epoch,
                window.name,
                full,
                basic,
                packed,
                _expires(window),
            ]
            for digest in digests:
                new = new_chunks.get(digest)
                args += [digest, counts[digest], _meta(new) if new is not None else b""]
            result = self._run(_COMMIT, tenant, args)
            status = bytes(result[0])
            if status == b"RETRY":
                continue
            if status == b"EXISTS":
                raise WindowExists(window.name)
            if status == b"GONE":
                raise FailedPrecondition(
                    f"chunk {bytes(result[1]).hex()[:16]}… was collected before this commit; "
                    "ask FindMissingChunks again and send every chunk it lists",
                    reason="CHUNK_NOT_SENT",
                )
            self._cache.put(tenant, window.name, full)
            return [bytes(d) for d in result[1::2]]
        raise Unavailable(
            f"committing window {window.name!r}: chunks it uses kept being collected by "
            "concurrent deletes; retry",
            reason="COMMIT_CONTENDED",
        )

    def clone_window(self, source: pb.WindowInfo, clone: pb.WindowInfo) -> list[bytes]:
        tenant = clone.tenant
        full = clone.SerializeToString()
        basic = basic_view(clone).SerializeToString()
        packed = _pack(ref.digest for ref in source.chunks)
        result = self._run(
            _CLONE,
            tenant,
            [repr(time.time()), source.name, clone.name, full, basic, packed, _expires(clone)],
        )
        status = bytes(result[0])
        if status == b"EXISTS":
            raise WindowExists(clone.name)
        if status == b"GONE":
            raise WindowGone(source.name)
        if status == b"CHANGED":
            raise Aborted(
                f"window {source.name!r} was replaced while it was being cloned; retry the clone",
                reason="SOURCE_CHANGED",
            )
        self._cache.put(tenant, clone.name, full)
        return [bytes(d) for d in result[1::2]]

    def delete_window(self, tenant: str, name: str) -> list[tuple[bytes, int]] | None:
        return self._delete(tenant, name, time.time(), only_expired=False)

    def delete_expired_window(
        self, tenant: str, name: str, now: float
    ) -> list[tuple[bytes, int]] | None:
        return self._delete(tenant, name, now, only_expired=True)

    def _delete(
        self, tenant: str, name: str, now: float, only_expired: bool
    ) -> list[tuple[bytes, int]] | None:
        result = self._run(_DELETE, tenant, [repr(now), name, "1" if only_expired else "0"])
        self._cache.discard(tenant, name)
        if bytes(result[0]) == b"NONE":
            return None
        freed = []
        for digest, meta in zip(result[1::2], result[2::2], strict=True):
            parts = bytes(meta).split()
            freed.append((bytes(digest), int(parts[1]) if len(parts) == 3 else 0))
        return freed

    def insert_chunk_row(self, tenant: str, row: ChunkRow) -> None:
        refs, meta = self._key(tenant, "refs"), self._key(tenant, "meta")
        value = f"{row.raw_size} {row.stored_size} {row.codec}".encode()

        def _write(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.hsetnx(refs, row.digest, row.refcount)
            pipe.hsetnx(meta, row.digest, value)
            pipe.execute()

        self._call(_write)

    def set_refcount(self, tenant: str, digest: bytes, refcount: int) -> None:
        refs, meta = self._key(tenant, "refs"), self._key(tenant, "meta")

        def _write(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            if refcount <= 0:
                pipe.hdel(refs, digest)
                pipe.hdel(meta, digest)
            else:
                pipe.hset(refs, digest, refcount)
            pipe.execute()

        self._call(_write)

    # -- collection (see the module docstring) ----------------------------------------

    def claim_unreferenced(self, tenant: str, digests: Iterable[bytes]) -> list[bytes]:
        """Claim for collection the chunks of `digests` that no window references and no
        one else is collecting; the caller deletes their bytes, then `release_claims`."""
        wanted = [d for d in dict.fromkeys(digests) if len(d) == DIGEST_SIZE]
        if not wanted:
            return []
        now = time.time()
        claimed = self._run(
            _CLAIM, tenant, [repr(now), FREED_KEPT, repr(now - STALE_CLAIM_S), *wanted]
        )
        return [bytes(d) for d in claimed]

    def release_claims(self, tenant: str, digests: Sequence[bytes]) -> None:
        if digests:
            dying = self._key(tenant, "dying")
            self._call(lambda c: c.hdel(dying, *digests))

    def stale_claims(self, tenant: str) -> list[bytes]:
        """Chunks whose collector stopped half-way (claimed more than STALE_CLAIM_S ago)."""
        limit = time.time() - STALE_CLAIM_S
        return [d for d, since in self.claims(tenant).items() if since < limit]

    def all_tenants(self) -> list[str]:
        return self._tenants()

    # -- TTLs and quotas --------------------------------------------------------------

    def expired_windows(
        self, now: float, limit: int = 100, tenant: str | None = None
    ) -> list[tuple[str, str]]:
        """As `Catalog.expired_windows`; with `tenant`, only that tenant's expiry index
        is read (one ZRANGEBYSCORE, whatever other tenants hold)."""
        found: list[tuple[float, str, str]] = []
        for owner in [tenant] if tenant is not None else self._tenants():
            expiry = self._key(owner, "expiry")
            rows = self._do(
                "zrangebyscore", expiry, "-inf", now, start=0, num=limit, withscores=True
            )
            found += [(float(score), owner, name.decode()) for name, score in rows]
        found.sort()
        return [(owner, name) for _, owner, name in found[:limit]]

    def tenant_usage(self, tenant: str) -> Usage:
        windows_key, meta_key = self._key(tenant, "windows"), self._key(tenant, "meta")
        windows = int(self._call(lambda c: c.hlen(windows_key)))
        metas = self._call(lambda c: c.hvals(meta_key))
        raw = stored = 0
        for value in metas:
            parts = bytes(value).split()
            raw += int(parts[0])
            stored += int(parts[1])
        return Usage(windows=windows, chunks=len(metas), raw_bytes=raw, stored_bytes=stored)


def open_redis(
    config: ManagerConfig,
) -> tuple[RedisLink | None, RedisTier | None, RedisCatalog | None]:
    """The Redis parts a manager's configuration asks for: the link, the chunk tier, and
    (fleet mode) the shared catalog."""
    if not config.redis_url:
        if config.redis_catalog or config.redis_policy == "redis-only":
            raise ValueError("--redis-catalog and --redis-policy redis-only need --redis-url")
        return None, None, None
    if config.redis_policy not in REDIS_POLICIES:
        raise ValueError(
            f"redis policy must be one of {', '.join(REDIS_POLICIES)}, got {config.redis_policy!r}"
        )
    link = RedisLink(
        parse_urls(config.redis_url),
        cluster=config.redis_cluster,
        timeout_s=config.redis_timeout_s,
        retry_after_s=max(0.2, config.redis_timeout_s),
    )
    tier = RedisTier(link, prefix=config.redis_prefix)
    catalog = RedisCatalog(link, prefix=config.redis_prefix) if config.redis_catalog else None
    return link, tier, catalog
