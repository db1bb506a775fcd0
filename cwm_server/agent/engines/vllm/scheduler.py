"""The connector's scheduler side, in vLLM's engine-core process: which requests load or
save KV, and the session records the agent lists.

- Every finished request that carries a `cache_salt` and no cwm directive is recorded in
  `sessions/` (salt, all token ids, how many have KV), which is how the agent lists
  sessions. Records are written by a background thread: the scheduler never waits on disk.
- A request with `{"cwm": {"op": "load", "id": ID}}` is matched against the window staged in
  `load/ID/` (`transfers.check_load_manifest`): only a request whose `cache_salt` is the
  staged session's salt and whose prompt starts with the staged tokens gets a hit, of whole
  blocks only, loaded into the blocks vLLM allocated: asynchronously by default (the
  request waits in WAITING_FOR_REMOTE_KVS, other requests keep running), synchronously
  before the step's forward with `cwm_async_load: false`. vLLM then hashes those blocks
  under the request's salt like any prefill, so later requests of the session hit them in
  the prefix cache.
- Kept until used: a thawed window lives in vLLM's prefix cache like any prefix, and vLLM
  may evict it before the session's first request. So the agent leaves the window staged
  and writes `load/ID/keep.json` (salt, expiry). The session's first request whose prompt
  starts with the window (`_match_kept`) gets whatever vLLM's prefix cache lost re-loaded
  from that staging, like a thaw; either way its staging is removed when that request
  finishes. A kept window nobody used is removed by the agent once it expires. Who removes
  it is settled by files, in an order that needs no lock: the scheduler writes its claim
  (`first-use/scheduler.json`) before it checks `keep.json`; the agent removes `keep.json`
  before it looks for a claim. Whichever sees the other's file leaves the staging to it.
- A request with `{"cwm": {"op": "save", "id": ID}}` that the agent registered in `save/ID/`
  has its first N tokens' blocks handed to the worker once they are all computed (normally
  at once: the agent re-submits a session's tokens, a prefix-cache hit). Its blocks stay
  allocated after it finishes until the worker reports the save done.

What the scheduler decides reaches the agent as `scheduler.json` (a load's claim or refusal)
or `result.json` (a refused or abandoned save).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.lanes import Lane
from cwm_server.agent.engines.vllm.layout import KVGeometry
from cwm_server.agent.engines.vllm.transfers import (
    ChunkRef,
    LoadOp,
    SaveOp,
    check_load_manifest,
    check_save_order,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Under "vllm.": vLLM configures only its own loggers' handlers.
logger = init_logger(f"vllm.cwm.{__name__.rsplit('.', 1)[-1]}")


@dataclass
class _PendingSave:
    op_id: str
    num_tokens: int
    chunk_tokens: int
    block_ids: list[int] = field(default_factory=list)


@dataclass
class _LoadPlan:
    op_id: str
    tokens: int
    chunks: list[ChunkRef]
    refusal: str = ""
    noted: bool = False
    """The claim went to the agent: a request re-allocated later (vLLM retrying after a
    failed async load recomputes what failed) must not overwrite it."""
    first_use: bool = False
    """Not a thaw's load directive: a session's first request, served from a kept window."""

    def notes_dir(self, root: Path) -> Path:
        """Where the scheduler's claim and the worker's result for this plan go."""
        directory = staging.op_dir(root, staging.LOAD_DIR, self.op_id)
        return directory / staging.FIRST_USE_DIR if self.first_use else directory


# Kept windows the scheduler remembers (their salts); past this, the oldest are forgotten
# (their staging is still removed by the agent when they expire).
MAX_KEPT = 4096


class CwmConnectorScheduler:
    """The scheduler-side half of `CwmConnector` (which forwards vLLM's calls here)."""

    def __init__(
        self,
        root: Path,
        geometry: KVGeometry,
        *,
        chunk_root: Path | None = None,
        async_load: bool = True,
    ) -> None:
        self.root = root
        self.chunk_root = chunk_root or root
        self.async_load = async_load
        self.geometry = geometry
        self.block_size = geometry.block_size
        self._layout = geometry.staging_layout()
        self._plans: dict[str, _LoadPlan] = {}
        self._pending_loads: list[LoadOp] = []
        self._saves: dict[str, _PendingSave] = {}
        self._saves_handed: set[str] = set()
        self._kept: dict[str, str] = {}
        """cache_salt -> id of the thawed window kept for the session's first request."""
        self._first_uses: dict[str, str] = {}
        """request id -> kept window it consumed; its staging goes when the request ends."""
        self._reloading: set[str] = set()
        """First uses whose re-load the worker has not reported done: their chunk files may
        still be read, so they are removed, never handed to the agent's pool for reuse."""
        self._recorder = Lane("cwm-sessions")

    # -- matching a request --------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        command = staging.directive(request.kv_transfer_params)
        if command is None:
            plan = self._match_kept(request)
            if plan is None or plan.tokens <= num_computed_tokens:
                return 0, False  # no kept window, or vLLM's prefix cache still has it all
            return plan.tokens - num_computed_tokens, self.async_load
        if command["op"] == "save":
            self._register_save(request, command["id"])
            return 0, False
        plan = self._plan_load(request, command["id"])
        if plan.refusal or plan.tokens <= num_computed_tokens:
            return 0, False
        return plan.tokens - num_computed_tokens, self.async_load

    def _match_kept(self, request: Request) -> _LoadPlan | None:
        """The kept window this request is the first use of, or None. Claimed at most once:
        whatever happens next, the window's staging goes when this request finishes."""
        cached = self._plans.get(request.request_id)
        if cached is not None and cached.first_use:
            return cached  # vLLM asks again when it could not schedule the request yet
        salt = request.cache_salt
        op_id = self._kept.get(salt) if salt else None
        if salt is None or op_id is None:
            return None
        plan = self._plan_load(request, op_id, quiet=True)
        if plan.refusal:
            # Not this window's continuation (another prompt under the salt): not its use.
            del self._plans[request.request_id]
            return None
        del self._kept[salt]
        plan.first_use = True
        notes = plan.notes_dir(self.root)
        # The claim before the check (see the module docstring).
        staging.write_json_atomic(
            notes / staging.SCHEDULER_FILE, {"request_id": request.request_id, "at": time.time()}
        )
        self._first_uses[request.request_id] = op_id
        expiry = staging.keep_expiry(staging.read_json(notes.parent / staging.KEEP_FILE), salt)
        if expiry is None or expiry <= time.time():
            del self._plans[request.request_id]
            return None  # expired or released: removed when the request finishes
        logger.info("cwm: request %s is the first use of kept window %s", request.request_id, op_id)
        return plan

    def _plan_load(self, request: Request, op_id: str, *, quiet: bool = False) -> _LoadPlan:
        cached = self._plans.get(request.request_id)
        if cached is not None and cached.op_id == op_id:
            return cached
        plan = _LoadPlan(op_id=op_id, tokens=0, chunks=[])
        try:
            manifest = staging.read_json(
                staging.op_dir(self.root, staging.LOAD_DIR, op_id) / staging.MANIFEST_FILE
            )
            plan.tokens, plan.chunks = check_load_manifest(
                manifest,
                request.cache_salt,
                list(request.prompt_token_ids or []),
                self._layout,
                self.block_size,
            )
        except ValueError as exc:
            plan.refusal = str(exc)
            if not quiet:
                logger.warning("cwm load %s refused: %s", op_id, exc)
        self._plans[request.request_id] = plan
        return plan

    def _register_save(self, request: Request, op_id: str) -> None:
        if request.request_id in self._saves:
            return
        directory = staging.op_dir(self.root, staging.SAVE_DIR, op_id)
        order = staging.read_json(directory / staging.REQUEST_FILE)
        try:
            tokens, chunk_tokens = check_save_order(
                order, request.cache_salt, len(request.prompt_token_ids or []), self.block_size
            )
        except ValueError as exc:
            logger.warning("cwm save %s refused: %s", op_id, exc)
            if directory.is_dir():
                staging.write_json_atomic(directory / staging.RESULT_FILE, {"error": str(exc)})
            return
        self._saves[request.request_id] = _PendingSave(op_id, tokens, chunk_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        command = staging.directive(request.kv_transfer_params)
        if command is not None and command["op"] != "load":
            return
        plan = self._plans.get(request.request_id)
        if plan is None or plan.noted or (command is None) != plan.first_use:
            return
        plan.noted = True
        directory = plan.notes_dir(self.root)
        note: dict[str, Any] = {"claimed_tokens": num_external_tokens, "refusal": plan.refusal}
        if num_external_tokens > 0:
            block_ids = blocks.get_block_ids()[0]
            first_token = plan.tokens - num_external_tokens
            first = first_token // self.block_size
            count = num_external_tokens // self.block_size
            self._pending_loads.append(
                LoadOp(
                    op_id=plan.op_id,
                    directory=str(directory),
                    block_ids=list(block_ids[first : first + count]),
                    first_token=first_token,
                    chunks=plan.chunks,
                    req_id=request.request_id,
                    asynchronous=self.async_load,
                )
            )
            if plan.first_use:
                self._reloading.add(request.request_id)
            note["first_token"] = first_token
        elif not plan.refusal:
            note["already_cached"] = True
        if directory.is_dir():
            staging.write_json_atomic(directory / staging.SCHEDULER_FILE, note)

    # -- each step's orders to the worker ------------------------------------------------

    def take_step_orders(
        self, scheduler_output: SchedulerOutput
    ) -> tuple[list[LoadOp], list[SaveOp]]:
        """The loads planned since the last step and the saves whose blocks are now all
        computed: what this step's connector metadata carries to the worker."""
        loads, self._pending_loads = self._pending_loads, []
        saves: list[SaveOp] = []
        if not self._saves:
            return loads, saves
        for new in scheduler_output.scheduled_new_reqs:
            pending = self._saves.get(new.req_id)
            if pending is not None:
                pending.block_ids = list(new.block_ids[0])
                self._maybe_emit_save(saves, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            pending = self._saves.get(req_id)
            if pending is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                pending.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                pending.block_ids.extend(new_ids[0])
            self._maybe_emit_save(saves, req_id, cached.num_computed_tokens[i], scheduler_output)
        return loads, saves

    def _maybe_emit_save(
        self,
        saves: list[SaveOp],
        req_id: str,
        num_computed: int,
        scheduler_output: SchedulerOutput,
    ) -> None:
        pending = self._saves[req_id]
        scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if num_computed + scheduled < pending.num_tokens:
            return
        needed = pending.num_tokens // self.block_size
        if len(pending.block_ids) < needed:
            return
        del self._saves[req_id]
        self._saves_handed.add(req_id)
        saves.append(
            SaveOp(
                op_id=pending.op_id,
                directory=str(staging.op_dir(self.root, staging.SAVE_DIR, pending.op_id)),
                block_ids=pending.block_ids[:needed],
                num_tokens=pending.num_tokens,
                chunk_tokens=pending.chunk_tokens,
                req_id=req_id,
            )
        )

    def loads_finished(self, req_ids: set[str]) -> None:
        """The worker reported these requests' loads done (vLLM's connector output)."""
        self._reloading -= req_ids

    # -- a finished request --------------------------------------------------------------

    def request_finished(self, request: Request) -> bool:
        """Record the session; True when the request's blocks must outlive it until the
        worker reports its save done (vLLM then frees them)."""
        plan = self._plans.pop(request.request_id, None)
        command = staging.directive(request.kv_transfer_params)
        if (
            plan is not None
            and not plan.first_use
            and not plan.refusal
            and command is not None
            and command["op"] == "load"
            and request.cache_salt
        ):
            # A thaw's load: its window may be kept for the session's first request.
            self._kept.pop(request.cache_salt, None)
            self._kept[request.cache_salt] = plan.op_id
            while len(self._kept) > MAX_KEPT:
                del self._kept[next(iter(self._kept))]
        used = self._first_uses.pop(request.request_id, None)
        if used is not None:
            # Its chunk files go to the agent's pool for reuse, unless a re-load that is not
            # known done may still be reading them.
            reusable = request.request_id not in self._reloading
            self._reloading.discard(request.request_id)
            self._recorder.submit(lambda: self._remove_staging(used, reusable))
        pending = self._saves.pop(request.request_id, None)
        if pending is not None:
            directory = staging.op_dir(self.root, staging.SAVE_DIR, pending.op_id)
            staging.write_json_atomic(
                directory / staging.RESULT_FILE,
                {"error": "the request finished before its KV was complete"},
            )
        if request.cache_salt and command is None:
            self._record_session(request)
        if request.request_id in self._saves_handed:
            self._saves_handed.discard(request.request_id)
            return True
        return False

    def _record_session(self, request: Request) -> None:
        assert request.cache_salt is not None
        token_ids = list(request.all_token_ids)
        # The last sampled token has not been through the model yet: it has no KV.
        kv_tokens = max(0, min(request.num_computed_tokens, len(token_ids) - 1))
        record = {
            "cache_salt": request.cache_salt,
            "token_ids": token_ids,
            "kv_tokens": kv_tokens,
            "block_size": self.block_size,
            "finished_at": time.time(),
        }
        path = staging.session_path(self.root, request.cache_salt)
        self._recorder.submit(lambda: self._write_record(path, record))

    def _remove_staging(self, op_id: str, reusable: bool = False) -> None:
        """Remove a kept window's staging (its chunks first: they hold the memory), handing
        its chunk files to the agent's pool (`pool`) when `reusable`."""
        chunks = staging.op_dir(self.chunk_root, staging.LOAD_DIR, op_id)
        if reusable:
            staging.recycle_chunks(chunks, self.chunk_root / staging.POOL_DIR)
        staging.remove_tree(chunks)
        staging.remove_tree(staging.op_dir(self.root, staging.LOAD_DIR, op_id))

    @staticmethod
    def _write_record(path: Path, record: dict[str, Any]) -> None:
        try:
            staging.write_json_atomic(path, record)
        except OSError as exc:
            logger.error("cwm: cannot record session in %s: %s", path, exc)
