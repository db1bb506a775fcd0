"""What `cwm fsck` found: problems by kind (stable strings that scripts read from
`--json`), and the report that gathers them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Problem kinds: stable strings, scripts read them from `--json`.
MISSING_FILE = "missing_file"
CORRUPT = "corrupt"
MISSING_ROW = "missing_row"
REFCOUNT = "refcount"
UNREFERENCED_ROW = "unreferenced_row"
BAD_WINDOW = "bad_window"
ORPHAN_FILE = "orphan_file"
TEMP_FILE = "temp_file"
STRAY_FILE = "stray_file"
UNVERIFIABLE = "unverifiable"
"""A warning: a chunk sealed with a key fsck was not given (encryption at rest)."""


@dataclass
class Problem:
    kind: str
    message: str
    tenant: str = ""
    window: str = ""
    key: str = ""
    """Set instead of `window` when the chunk's user is a key (KeyedChunkService)."""
    chunk_index: int | None = None
    digest: str = ""
    path: str = ""
    repairable: bool = False
    repaired: bool = False

    def line(self) -> str:
        if self.repaired:
            return f"{self.message} [repaired]"
        if self.repairable:
            return f"{self.message} [repairable with --repair]"
        return self.message


@dataclass
class FsckReport:
    data_dir: str
    manager_running: bool
    repair: bool
    windows: int = 0
    chunk_rows: int = 0
    chunk_files: int = 0
    chunks_verified: int = 0
    in_flight_skipped: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    """Oddities that do not make the store unclean (stray files nobody wrote there)."""
    unrecoverable_windows: dict[str, list[int]] = field(default_factory=dict)
    """'tenant/name' -> indices of its chunks that are missing or corrupt."""
    unrecoverable_keys: list[tuple[str, str]] = field(default_factory=list)
    """(tenant, key) of each key (KeyedChunkService) whose value is missing or corrupt."""

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repaired(self) -> int:
        return sum(1 for p in self.problems if p.repaired)

    @property
    def remaining(self) -> int:
        return sum(1 for p in self.problems if not p.repaired)

    def as_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "manager_running": self.manager_running,
            "repair": self.repair,
            "clean": self.clean,
            "windows": self.windows,
            "chunk_rows": self.chunk_rows,
            "chunk_files": self.chunk_files,
            "chunks_verified": self.chunks_verified,
            "in_flight_skipped": self.in_flight_skipped,
            "problem_count": len(self.problems),
            "repaired_count": self.repaired,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
            "unrecoverable_windows": [
                {"window": key, "chunks": indices}
                for key, indices in sorted(self.unrecoverable_windows.items())
            ],
            "unrecoverable_keys": [
                {"tenant": tenant, "key": key} for tenant, key in sorted(self.unrecoverable_keys)
            ],
        }
