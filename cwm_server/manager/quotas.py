"""Per-tenant quotas: how many bytes of distinct chunks and how many windows a tenant may keep.

What counts
-----------
- **bytes**: the *raw* (uncompressed) size of every distinct chunk the tenant stores, each
  counted once however many windows share it. Raw, not stored, because a freeze header
  declares each chunk's digest and token span, from which its raw size follows (the
  fingerprint fixes bytes per token): the check is exact *before any byte arrives*,
  whatever codec the chunk is later stored with. A clone adds no bytes; re-freezing a grown
  session adds only its new chunks.
  Values stored under keys (KeyedChunkService, the LMCache tier) are chunks too: they
  count, and a put reserves each new value's raw size when the value's first part arrives,
  before a byte of it is stored.
- **windows**: windows of the tenant in the catalog (a freeze, clone or PromoteKeysToWindow
  that adds one is checked; one that replaces a live window adds none).

Windows that expired but are not yet collected still count (their chunks still occupy
space); when a check fails, the manager first collects the tenant's expired windows and
checks again, so an expired window never stands in the way.

Concurrency
-----------
A freeze reserves what it would add (its new chunks, one window unless it replaces one) at
header time, under one lock shared with every other check; the reservation is released when
the freeze commits (after its catalog transaction, so the bytes are counted twice for a
moment, never zero times) or fails. Two freezes that would jointly exceed a quota cannot
both pass. Chunks reserved by two in-flight freezes count once. Streams of one parallel
upload share one reservation (keyed by the upload id). A keyed put holds one reservation
per new value, all released when the stream commits or fails. A reservation made on the
catalog thread for a stream that was cancelled meanwhile is released as soon as it exists
(`reserve_on_catalog_thread`).

The quota file (TOML, ``cwm serve --quota-file PATH``)::

    [default]            # every tenant without its own table (optional)
    max_bytes = "50GiB"  # integer bytes, or a string with B/KiB/MiB/GiB/TiB (KB/MB/GB too)
    max_windows = 10000

    [tenants.alice]
    max_bytes = 1073741824
    max_windows = 100

0 or an absent key means unlimited. Without a quota file nothing is limited.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwm_client.errors import ResourceExhausted
from cwm_server.manager.toml_file import read_toml

QUOTA_EXCEEDED = "QUOTA_EXCEEDED"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


class QuotaFileError(ValueError):
    """The quota file cannot be used; the message names the file, the key and why."""


def parse_size(value: object, where: str = "size") -> int:
    """Bytes from an int or a string like "10GiB", "512 MiB", "2GB"."""
    if isinstance(value, bool):
        raise QuotaFileError(f"{where}: expected bytes, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise QuotaFileError(f"{where}: expected a number >= 0, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise QuotaFileError(f'{where}: expected bytes (e.g. 1073741824 or "1GiB"), got {value!r}')


@dataclass(frozen=True)
class Quota:
    max_bytes: int = 0
    """Raw bytes of distinct chunks; 0: unlimited."""
    max_windows: int = 0
    """Windows; 0: unlimited."""

    @property
    def unlimited(self) -> bool:
        return not self.max_bytes and not self.max_windows


@dataclass(frozen=True)
class QuotaPolicy:
    default: Quota = Quota()
    tenants: Mapping[str, Quota] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> Quota:
        return self.tenants.get(tenant, self.default)

    @classmethod
    def load(cls, path: Path) -> QuotaPolicy:
        return cls.from_mapping(read_toml(path, "quota file", QuotaFileError), str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "quotas") -> QuotaPolicy:
        unknown = set(data) - {"default", "tenants"}
        if unknown:
            raise QuotaFileError(
                f"{source}: unknown table(s) {sorted(unknown)}; use [default] and [tenants.NAME]"
            )
        default = _quota(data.get("default", {}), f"{source}: [default]")
        tenants_table = data.get("tenants", {})
        if not isinstance(tenants_table, dict):
            raise QuotaFileError(f"{source}: [tenants] must hold one table per tenant")
        tenants = {
            name: _quota(table, f"{source}: [tenants.{name}]")
            for name, table in tenants_table.items()
        }
        return cls(default=default, tenants=tenants)


def _quota(table: object, where: str) -> Quota:
    if not isinstance(table, dict):
        raise QuotaFileError(f"{where} must be a table with max_bytes and/or max_windows")
    unknown = set(table) - {"max_bytes", "max_windows"}
    if unknown:
        raise QuotaFileError(f"{where}: unknown key(s) {sorted(unknown)}")
    windows = table.get("max_windows", 0)
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 0:
        raise QuotaFileError(f"{where}: max_windows must be an integer >= 0, got {windows!r}")
    return Quota(
        max_bytes=parse_size(table.get("max_bytes", 0), f"{where} max_bytes"),
        max_windows=windows,
    )


@dataclass(frozen=True)
class Usage:
    """What a tenant holds in the catalog (see `Catalog.tenant_usage`)."""

    windows: int = 0
    chunks: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0


@dataclass
class _Reservation:
    tenant: str
    chunks: dict[bytes, int]
    windows: int
    holders: int = 1


@dataclass
class Reservation:
    """A handle the caller releases exactly once (release is idempotent)."""

    ledger: QuotaLedger | None
    key: tuple[str, str]

    def release(self) -> None:
        if self.ledger is not None:
            self.ledger.release(self.key)
            self.ledger = None


class QuotaLedger:
    """The in-flight reservations of every tenant, and the check that takes one.

    `reserve` must be handed the catalog's counts from the same thread that commits (the
    manager's single catalog thread), so that a commit cannot slip between reading the
    usage and reserving; the lock makes reserve/release safe from any thread."""

    def __init__(self, policy: QuotaPolicy | None) -> None:
        self.policy = policy or QuotaPolicy()
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], _Reservation] = {}
        self._chunk_holds: dict[str, Counter[bytes]] = {}
        self._chunk_sizes: dict[str, dict[bytes, int]] = {}
        self._windows: Counter[str] = Counter()

    def limited(self, tenant: str) -> bool:
        return not self.policy.for_tenant(tenant).unlimited

    def limits_bytes(self, tenant: str) -> bool:
        """True if `tenant` has a max_bytes quota (keyed puts add bytes, never windows)."""
        return bool(self.policy.for_tenant(tenant).max_bytes)

    def open_reservations(self) -> int:
        """How many reservations are held (for tests and diagnostics)."""
        with self._lock:
            return len(self._open)

    def reserved(self, tenant: str) -> tuple[int, int]:
        """(raw bytes, windows) reserved by in-flight freezes of `tenant`."""
        with self._lock:
            sizes = self._chunk_sizes.get(tenant, {})
            return sum(sizes.values()), self._windows[tenant]

    def reserve(
        self,
        tenant: str,
        key: str,
        *,
        usage: Callable[[], Usage],
        new_chunks: Callable[[], Mapping[bytes, int]],
        new_windows: int,
    ) -> Reservation:
        """Check that `new_chunks` (digest -> raw size, those the tenant does not store yet)
        and `new_windows` fit beside what is stored and reserved; reserve them, or raise
        RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED). A second stream with the same `key`
        joins the first's reservation without a check."""
        quota = self.policy.for_tenant(tenant)
        if quota.unlimited:
            return Reservation(None, (tenant, key))
        # Read the catalog before taking the lock (the event loop releases under it): the
        # caller runs on the catalog thread, so no commit can land meanwhile, and a
        # release meanwhile only makes the check below conservative.
        have = usage()
        wanted = dict(new_chunks())
        with self._lock:
            held = self._open.get((tenant, key))
            if held is not None:
                held.holders += 1
                return Reservation(self, (tenant, key))
            holds = self._chunk_holds.setdefault(tenant, Counter())
            sizes = self._chunk_sizes.setdefault(tenant, {})
            reserved_bytes = sum(sizes.values())
            adding = sum(size for digest, size in wanted.items() if digest not in holds)
            if (
                quota.max_windows
                and new_windows
                and (have.windows + self._windows[tenant] + new_windows > quota.max_windows)
            ):
                raise quota_exceeded(
                    tenant,
                    "windows",
                    quota.max_windows,
                    have.windows,
                    self._windows[tenant],
                    new_windows,
                )
            if (
                quota.max_bytes
                and adding
                and (have.raw_bytes + reserved_bytes + adding > quota.max_bytes)
            ):
                raise quota_exceeded(
                    tenant, "bytes", quota.max_bytes, have.raw_bytes, reserved_bytes, adding
                )
            for digest, size in wanted.items():
                holds[digest] += 1
                sizes[digest] = size
            self._windows[tenant] += new_windows
            self._open[(tenant, key)] = _Reservation(tenant, wanted, new_windows)
            return Reservation(self, (tenant, key))

    def release(self, key: tuple[str, str]) -> None:
        with self._lock:
            held = self._open.get(key)
            if held is None:
                return
            held.holders -= 1
            if held.holders > 0:
                return
            del self._open[key]
            tenant = held.tenant
            holds = self._chunk_holds.get(tenant, Counter())
            sizes = self._chunk_sizes.get(tenant, {})
            for digest in held.chunks:
                holds[digest] -= 1
                if holds[digest] <= 0:
                    del holds[digest]
                    sizes.pop(digest, None)
            self._windows[tenant] -= held.windows
            if self._windows[tenant] <= 0:
                del self._windows[tenant]

    def check_windows(self, tenant: str, usage: Callable[[], Usage], adding: int = 1) -> None:
        """A clone: RESOURCE_EXHAUSTED unless `adding` more windows fit (no reservation:
        the caller checks and commits in one catalog-thread call)."""
        quota = self.policy.for_tenant(tenant)
        if not quota.max_windows:
            return
        # The catalog read stays outside the lock, as in `reserve`: the caller is on the
        # catalog thread, so no commit lands meanwhile, and other threads' reserve/release
        # must not wait on SQLite.
        have = usage().windows
        with self._lock:
            reserved = self._windows[tenant]
            if have + reserved + adding > quota.max_windows:
                raise quota_exceeded(tenant, "windows", quota.max_windows, have, reserved, adding)


async def reserve_on_catalog_thread(
    db: Callable[[Callable[[], Reservation]], Awaitable[Reservation]],
    reserve: Callable[[], Reservation],
) -> Reservation:
    """`await db(reserve)`, without leaking the reservation if the caller is cancelled.

    `reserve` runs on the catalog thread, which cannot be interrupted: if the awaiting task
    is cancelled (a client's cancel or deadline) while it runs, or just after it returned,
    the reservation is still made but its handle never reaches the caller. This releases
    such a reservation as soon as it exists (on the catalog thread, if it is still running),
    so every path releases what was reserved. If the cancel came before `reserve` started,
    the executor drops it and nothing is reserved."""
    outcome: concurrent.futures.Future[Reservation] = concurrent.futures.Future()

    def attempt() -> Reservation:
        try:
            made = reserve()
        except BaseException as exc:
            outcome.set_exception(exc)
            raise
        outcome.set_result(made)
        return made

    try:
        return await db(attempt)
    except BaseException:
        outcome.add_done_callback(_release_outcome)
        raise


def _release_outcome(outcome: concurrent.futures.Future[Reservation]) -> None:
    if not outcome.cancelled() and outcome.exception() is None:
        outcome.result().release()


def quota_exceeded(
    tenant: str, what: str, limit: int, used: int, reserved: int, adding: int
) -> ResourceExhausted:
    if what == "bytes":
        detail = (
            f"tenant {tenant!r} would hold {used + reserved + adding} raw bytes of chunks "
            f"({used} stored, {reserved} reserved by freezes and keyed puts in flight, "
            f"{adding} new), over its quota of {limit}; delete windows (`cwm rm`) or keys "
            "(DeleteKeys), or ask for a larger quota"
        )
    else:
        detail = (
            f"tenant {tenant!r} would have {used + reserved + adding} windows ({used} stored, "
            f"{reserved} being frozen, {adding} new), over its quota of {limit}; delete "
            "windows (`cwm rm`) or ask for a larger quota"
        )
    return ResourceExhausted(
        detail,
        reason=QUOTA_EXCEEDED,
        metadata={
            "tenant": tenant,
            "quota": f"max_{what}",
            "limit": str(limit),
            "used": str(used),
            "reserved": str(reserved),
            "requested": str(adding),
        },
    )


def declared_chunks(
    digests: Iterable[bytes], sizes: Iterable[int], present: Callable[[list[bytes]], set[bytes]]
) -> dict[bytes, int]:
    """digest -> raw size of the declared chunks the tenant does not store yet."""
    declared: dict[bytes, int] = {}
    for digest, size in zip(digests, sizes, strict=True):
        declared.setdefault(digest, size)
    stored = present(list(declared))
    return {d: s for d, s in declared.items() if d not in stored}
