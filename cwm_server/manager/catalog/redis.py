"""The window catalog in Redis (or Redis Cluster), shared by every manager of a fleet.

Key layout (``prefix`` defaults to ``cwm``; ``T`` is the tenant, see
`tiers.redis_link.tenant_tag`)::

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
their own tag (tenant + digest, see `tiers.redis`) and spread over every master.

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

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import Aborted, FailedPrecondition, Unavailable
from cwm_server.manager.catalog.base import (
    ChunkRow,
    CommitAbandoned,
    NewChunk,
    WindowCatalog,
    WindowExists,
    WindowGone,
    basic_view,
)
from cwm_server.manager.catalog.redis_scripts import (
    CLAIM,
    CLONE,
    COMMIT,
    DELETE,
    KEY_NAMES,
    PREPARE,
    chunk_meta,
    chunk_row,
    expiry_score,
    is_expired,
    pack_digests,
)
from cwm_server.manager.catalog.redis_window_cache import WindowCache
from cwm_server.manager.quotas import Usage
from cwm_server.manager.tiers.redis_link import RedisLink, tenant_tag

FREED_KEPT = 10_000
COMMIT_ATTEMPTS = 50
STALE_CLAIM_S = 30.0


class RedisCatalog(WindowCatalog):
    """`WindowCatalog` in Redis; see the module docstring for keys and atomicity."""

    def __init__(
        self,
        link: RedisLink,
        prefix: str = "cwm",
        window_cache_bytes: int = 64 << 20,
        bytes_present: Callable[[str, list[bytes]], set[bytes]] | None = None,
    ) -> None:
        """`bytes_present(tenant, digests)`: which of a tenant's chunks have their bytes in
        Redis, after restoring there what this manager's local tiers hold (the manager's
        store; without one, every chunk counts as present)."""
        self.link = link
        self.prefix = prefix
        self._cache = WindowCache(window_cache_bytes)
        self._bytes_present = bytes_present or (lambda tenant, digests: set(digests))
        self._known_tenants: set[str] = set()

    # -- keys -------------------------------------------------------------------------

    def keys(self, tenant: str) -> list[str]:
        tag = tenant_tag(tenant)
        return [f"{self.prefix}:cat:{{{tag}}}:{what}" for what in KEY_NAMES]

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

    # -- the catalog as a whole -------------------------------------------------------

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
            if is_expired(window, time.time()):
                return None
            return window if full else basic_view(window)
        if blob is None:
            self._cache.discard(tenant, name)
            return None
        window = pb.WindowInfo.FromString(blob)
        if is_expired(window, time.time()):
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
        return chunk_row(digest, count, row)

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
                if is_expired(window, now):
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
                row = chunk_row(bytes(digest), count, metas.get(digest))
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
        packed = pack_digests(ref.digest for ref in window.chunks)
        for _ in range(COMMIT_ATTEMPTS):
            prepared = self._run(PREPARE, tenant, digests)
            epoch, flags = int(prepared[0]), [int(f) for f in prepared[1:]]
            if any(f == 2 for f in flags):
                time.sleep(0.005)  # a collector is deleting one of them: let it finish
                continue
            absent = [d for d, f in zip(digests, flags, strict=True) if f == 1]
            if absent:
                present = self._bytes_present(tenant, absent)
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
                expiry_score(window),
            ]
            for digest in digests:
                new = new_chunks.get(digest)
                args += [digest, counts[digest], chunk_meta(new) if new is not None else b""]
            result = self._run(COMMIT, tenant, args)
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
        packed = pack_digests(ref.digest for ref in source.chunks)
        result = self._run(
            CLONE,
            tenant,
            [repr(time.time()), source.name, clone.name, full, basic, packed, expiry_score(clone)],
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
        result = self._run(DELETE, tenant, [repr(now), name, "1" if only_expired else "0"])
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
            CLAIM, tenant, [repr(now), FREED_KEPT, repr(now - STALE_CLAIM_S), *wanted]
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
        """As `WindowCatalog.expired_windows`; with `tenant`, only that tenant's expiry index
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
