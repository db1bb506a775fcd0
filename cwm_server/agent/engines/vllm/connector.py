"""cwm as a vLLM v1 KV connector: freeze and thaw live vLLM sessions, block for block.

Load it into a vLLM server with

    --kv-transfer-config '{"kv_connector": "CwmConnector",
      "kv_connector_module_path": "cwm_server.agent.engines.vllm.connector",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"cwm_dir": "/var/lib/cwm/vllm-0"}}'

and run `cwm agent --engine vllm --vllm-url URL --vllm-dir /var/lib/cwm/vllm-0` beside it.
The two meet in `cwm_dir` (see `vllm_staging`); nothing else of cwm runs inside vLLM, and
this module imports neither the manager nor grpc.

What the connector does, by role:

- scheduler (vLLM's engine-core process):
  * every finished request that carries a `cache_salt` and no cwm directive is recorded in
    `sessions/` (salt, all token ids, how many have KV), which is how the agent lists
    sessions;
  * a request with `{"cwm": {"op": "load", "id": ID}}` is matched against the window staged
    in `load/ID/`: only a request whose `cache_salt` is the staged session's salt and whose
    prompt starts with the staged tokens gets a hit, of whole blocks only, synchronously
    loaded into the blocks vLLM allocated. vLLM then hashes those blocks under the request's
    salt like any prefill, so later requests of the session hit them in the prefix cache;
  * a request with `{"cwm": {"op": "save", "id": ID}}` that the agent registered in `save/ID/`
    has its first N tokens' blocks gathered once they are all computed (normally at once:
    the agent re-submits a session's tokens, a prefix-cache hit).
- worker (vLLM's worker process): owns the KV tensors. It learns the block layout from the
  attention backend (`vllm_layout`), writes `engine.json`, performs the loads (every chunk's
  BLAKE3 digest and size is checked before a single byte reaches the cache; a chunk that
  fails is reported through `get_block_ids_with_load_errors`, so vLLM applies its
  `kv_load_failure_policy`: recompute those blocks, or fail the request — never use them)
  and the saves (canonical chunks written by a background thread).

Limits: one KV cache group (plain attention models), one worker (no tensor or pipeline
parallelism), KV dtypes bf16/fp16/fp32, and CPU attention (the GPU layouts are documented in
docs/VLLM.md but not wired up here: no GPU was available to verify them).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.layout import (
    WORD_DTYPES,
    BlockLayout,
    LayoutError,
    PagedKV,
    from_canonical_bytes,
    probe_block_layout,
    to_canonical_bytes,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

EXTRA_DIR_KEY = "cwm_dir"


@dataclass
class ChunkRef:
    file: str
    token_start: int
    token_count: int
    digest: str


@dataclass
class LoadOp:
    op_id: str
    directory: str
    block_ids: list[int]
    first_token: int
    """Window position of the first block loaded (tokens before it were already cached)."""
    chunks: list[ChunkRef]


@dataclass
class SaveOp:
    op_id: str
    directory: str
    block_ids: list[int]
    num_tokens: int
    chunk_tokens: int


@dataclass
class CwmConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


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


def _kv_shape(kv_cache_config: KVCacheConfig) -> tuple[int, int, int, torch.dtype, int]:
    """(num_layers, num_kv_heads, head_dim, dtype, block_size) of the single KV cache group."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"the cwm connector supports models with one KV cache group; this one has "
            f"{len(groups)} (hybrid or sliding-window models are not supported yet)"
        )
    spec: Any = groups[0].kv_cache_spec
    for attr in ("num_kv_heads", "head_size", "dtype", "block_size"):
        if not hasattr(spec, attr):
            raise ValueError(f"the cwm connector needs an attention KV cache, got {spec!r}")
    return (
        len(groups[0].layer_names),
        int(spec.num_kv_heads),
        int(spec.head_size),
        spec.dtype,
        int(spec.block_size),
    )


class CwmConnector(KVConnectorBase_V1, SupportsHMA):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        directory = extra.get(EXTRA_DIR_KEY)
        if not directory:
            raise ValueError(
                f"the cwm connector needs kv_connector_extra_config.{EXTRA_DIR_KEY}: the "
                "directory it shares with `cwm agent --vllm-dir`"
            )
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError(
                "the cwm connector supports one worker (tensor and pipeline parallel size 1)"
            )
        if not vllm_config.cache_config.enable_prefix_caching:
            raise ValueError(
                "the cwm connector needs vLLM's prefix caching: thawed blocks are served from "
                "it and freezes re-read sessions through it"
            )
        self.root = Path(directory).resolve()
        staging.ensure_layout(self.root)
        (
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.kv_dtype,
            self.block_size,
        ) = _kv_shape(kv_cache_config)
        if self.kv_dtype not in WORD_DTYPES:
            raise ValueError(f"the cwm connector does not support KV dtype {self.kv_dtype}")
        self.bytes_per_token = (
            2
            * self.num_layers
            * self.num_kv_heads
            * self.head_dim
            * torch.empty(0, dtype=self.kv_dtype).element_size()
        )
        # scheduler side
        self._plans: dict[str, _LoadPlan] = {}
        self._pending_loads: list[LoadOp] = []
        self._saves: dict[str, _PendingSave] = {}
        self._records: queue.Queue[tuple[Path, dict[str, Any]]] = queue.Queue()
        self._record_thread: threading.Thread | None = None
        # worker side
        self._paged: PagedKV | None = None
        self._load_errors: set[int] = set()
        self._writes: queue.Queue[tuple[SaveOp, torch.Tensor]] = queue.Queue()
        self._write_thread: threading.Thread | None = None
        logger.info("cwm connector (%s) using %s", role.name.lower(), self.root)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        tensors = [kv_caches[name] for name in names]
        if len(tensors) != self.num_layers or len({t.data_ptr() for t in tensors}) != len(tensors):
            raise ValueError(
                f"the cwm connector expected {self.num_layers} distinct layer caches, got "
                f"{len(tensors)} (shared-KV layers are not supported)"
            )
        isa, layout = self._probe(names[0], tensors[0])
        self._paged = PagedKV(tensors, layout)
        self._write_engine_file(isa)
        logger.info(
            "cwm connector: %d layers, %d KV heads x %d, %s, blocks of %d, layout from %s",
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.kv_dtype,
            self.block_size,
            isa,
        )

    def _probe(self, layer_name: str, tensor: torch.Tensor) -> tuple[str, BlockLayout]:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                "the cwm connector handles vLLM's CPU attention layouts only so far; see "
                "docs/VLLM.md for the GPU backends' layouts"
            )
        from vllm import _custom_ops as ops

        context = self._vllm_config.compilation_config.static_forward_context
        layer = context.get(layer_name)
        isa = getattr(layer, "isa", None)
        if not isinstance(isa, str):
            raise LayoutError(f"cannot tell which CPU attention kernel layer {layer_name} uses")
        bound = getattr(layer, "kv_cache", None)
        if isinstance(bound, torch.Tensor) and tuple(bound.shape) != tuple(tensor.shape):
            raise LayoutError(
                f"the attention kernel uses blocks of another size ({tuple(bound.shape)} vs "
                f"{tuple(tensor.shape)}); set --block-size to a size the kernel supports"
            )
        cache_dtype = self._vllm_config.cache_config.cache_dtype

        def write(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
            blocks, heads, tokens, _ = block.shape
            view = block.view(blocks, heads, tokens * 2, -1)
            key_cache, value_cache = view.chunk(2, dim=2)
            slots = torch.arange(tokens, dtype=torch.int64)
            ops.cpu_attn_reshape_and_cache(
                key, value, key_cache, value_cache, slots, isa, 1.0, 1.0, cache_dtype
            )

        _, heads, tokens, content = tensor.shape
        return isa, probe_block_layout(write, heads, tokens, self.head_dim, content, tensor.dtype)

    def _write_engine_file(self, isa: str) -> None:
        import vllm

        config = self._vllm_config
        staging.write_json_atomic(
            self.root / staging.ENGINE_FILE,
            {
                "staging_version": staging.STAGING_VERSION,
                "model": config.model_config.model,
                "served_model_name": config.model_config.served_model_name,
                "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "block_size": self.block_size,
                "vllm_version": vllm.__version__,
                "torch_version": str(torch.__version__),
                "platform": "cpu",
                "attention_isa": isa,
                "kv_load_failure_policy": self._kv_transfer_config.kv_load_failure_policy,
                "pid": os.getpid(),
                "started_at": time.time(),
            },
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, CwmConnectorMetadata)
        for op in metadata.loads:
            self._load(op)

    def _load(self, op: LoadOp) -> None:
        """Load one staged window into its blocks; on any failure report the blocks from the
        first one not loaded onwards, so vLLM recomputes (or fails) them."""
        assert self._paged is not None
        directory = Path(op.directory)
        loaded = 0
        error = ""
        try:
            by_block = self._blocks_by_chunk(op)
            for chunk, positions in by_block:
                data = (directory / chunk.file).read_bytes()
                if len(data) != chunk.token_count * self.bytes_per_token:
                    raise ValueError(
                        f"{chunk.file} holds {len(data)} bytes, "
                        f"{chunk.token_count * self.bytes_per_token} expected"
                    )
                if blake3.blake3(data).hexdigest() != chunk.digest:
                    raise ValueError(f"{chunk.file} does not match its BLAKE3 digest")
                kv = from_canonical_bytes(
                    data,
                    self.kv_dtype,
                    self.num_layers,
                    chunk.token_count,
                    self.num_kv_heads * self.head_dim,
                )
                for block_index, offset in positions:
                    piece = kv[:, :, offset : offset + self.block_size]
                    self._paged.scatter([op.block_ids[block_index]], piece)
                    loaded += 1
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use these blocks
            error = f"{type(exc).__name__}: {exc}"
            self._load_errors.update(op.block_ids[loaded:])
            logger.error("cwm load %s failed after %d blocks: %s", op.op_id, loaded, error)
        staging.write_json_atomic(
            directory / staging.RESULT_FILE,
            {
                "blocks": len(op.block_ids),
                "loaded_blocks": loaded,
                "first_token": op.first_token,
                "loaded_tokens": loaded * self.block_size,
                "error": error,
            },
        )

    def _blocks_by_chunk(self, op: LoadOp) -> list[tuple[ChunkRef, list[tuple[int, int]]]]:
        """For each chunk needed, in order: (chunk, [(index into op.block_ids, token offset
        inside the chunk)])."""
        out: list[tuple[ChunkRef, list[tuple[int, int]]]] = []
        for index in range(len(op.block_ids)):
            start = op.first_token + index * self.block_size
            chunk = next(
                (c for c in op.chunks if c.token_start <= start < c.token_start + c.token_count),
                None,
            )
            if chunk is None or start + self.block_size > chunk.token_start + chunk.token_count:
                raise ValueError(f"no staged chunk holds tokens {start}..{start + self.block_size}")
            if out and out[-1][0] is chunk:
                out[-1][1].append((index, start - chunk.token_start))
            else:
                out.append((chunk, [(index, start - chunk.token_start)]))
        return out

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return

    def wait_for_save(self) -> None:
        """Gather this step's saves now (the blocks are complete after the forward and may be
        reused once the step ends); encode and write them on a background thread."""
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, CwmConnectorMetadata)
        for op in metadata.saves:
            try:
                assert self._paged is not None
                kv = self._paged.gather(op.block_ids)[:, :, : op.num_tokens]
            except Exception as exc:  # noqa: BLE001 - reported to the agent, never raised into vLLM
                self._save_failed(op, exc)
                continue
            if self._write_thread is None:
                self._write_thread = threading.Thread(
                    target=self._write_loop, name="cwm-save", daemon=True
                )
                self._write_thread.start()
            self._writes.put((op, kv))

    def _write_loop(self) -> None:
        while True:
            op, kv = self._writes.get()
            try:
                self._write_save(op, kv)
            except Exception as exc:  # noqa: BLE001
                self._save_failed(op, exc)

    def _write_save(self, op: SaveOp, kv: torch.Tensor) -> None:
        directory = Path(op.directory)
        chunks = []
        for index, start in enumerate(range(0, op.num_tokens, op.chunk_tokens)):
            count = min(op.chunk_tokens, op.num_tokens - start)
            data = to_canonical_bytes(kv[:, :, start : start + count])
            name = staging.chunk_file_name(index)
            staging.write_bytes_atomic(directory / name, data)
            chunks.append(
                {
                    "file": name,
                    "token_start": start,
                    "token_count": count,
                    "digest": blake3.blake3(data).hexdigest(),
                }
            )
        staging.write_json_atomic(
            directory / staging.RESULT_FILE,
            {
                "tokens": op.num_tokens,
                "chunk_tokens": op.chunk_tokens,
                "chunks": chunks,
                "error": "",
            },
        )

    def _save_failed(self, op: SaveOp, exc: BaseException) -> None:
        logger.error("cwm save %s failed: %s", op.op_id, exc)
        staging.write_json_atomic(
            Path(op.directory) / staging.RESULT_FILE, {"error": f"{type(exc).__name__}: {exc}"}
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # --------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        command = staging.directive(request.kv_transfer_params)
        if command is None:
            return 0, False
        if command["op"] == "save":
            self._register_save(request, command["id"])
            return 0, False
        plan = self._plan_load(request, command["id"])
        if plan.refusal or plan.tokens <= num_computed_tokens:
            return 0, False
        return plan.tokens - num_computed_tokens, False

    def _plan_load(self, request: Request, op_id: str) -> _LoadPlan:
        cached = self._plans.get(request.request_id)
        if cached is not None and cached.op_id == op_id:
            return cached
        plan = _LoadPlan(op_id=op_id, tokens=0, chunks=[])
        try:
            plan.tokens, plan.chunks = self._check_manifest(request, op_id)
        except ValueError as exc:
            plan.refusal = str(exc)
            logger.warning("cwm load %s refused: %s", op_id, exc)
        self._plans[request.request_id] = plan
        return plan

    def _check_manifest(self, request: Request, op_id: str) -> tuple[int, list[ChunkRef]]:
        manifest = staging.read_json(
            staging.op_dir(self.root, staging.LOAD_DIR, op_id) / staging.MANIFEST_FILE
        )
        if not isinstance(manifest, dict):
            raise ValueError("nothing is staged under this id")
        if not request.cache_salt or manifest.get("cache_salt") != request.cache_salt:
            raise ValueError("the request's cache_salt is not the staged session's")
        layout = manifest.get("layout", {})
        mine = {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
            "block_size": self.block_size,
        }
        differing = [
            f"{k}: staged {layout.get(k)!r}, engine {v!r}"
            for k, v in mine.items()
            if layout.get(k) != v
        ]
        if differing:
            raise ValueError("the staged KV has another shape: " + "; ".join(differing))
        token_ids = manifest.get("token_ids")
        tokens = manifest.get("tokens")
        prompt = list(request.prompt_token_ids or [])
        if not isinstance(token_ids, list) or not isinstance(tokens, int):
            raise ValueError("the manifest is malformed")
        if tokens <= 0 or tokens % self.block_size or tokens > len(token_ids):
            raise ValueError(f"{tokens} staged tokens is not a positive number of whole blocks")
        if tokens >= len(prompt):
            raise ValueError("the prompt must extend the staged tokens by at least one token")
        if prompt[:tokens] != token_ids[:tokens]:
            raise ValueError("the prompt does not start with the staged tokens")
        chunks = [
            ChunkRef(
                file=str(c["file"]),
                token_start=int(c["token_start"]),
                token_count=int(c["token_count"]),
                digest=str(c["digest"]),
            )
            for c in manifest.get("chunks", [])
        ]
        for chunk in chunks:
            if "/" in chunk.file or chunk.file.startswith("."):
                raise ValueError(f"bad chunk file name {chunk.file!r}")
        return tokens, chunks

    def _register_save(self, request: Request, op_id: str) -> None:
        if request.request_id in self._saves:
            return
        directory = staging.op_dir(self.root, staging.SAVE_DIR, op_id)
        order = staging.read_json(directory / staging.REQUEST_FILE)
        reason = ""
        if not isinstance(order, dict):
            reason = "no save was requested under this id"
        elif not request.cache_salt or order.get("cache_salt") != request.cache_salt:
            reason = "the request's cache_salt is not the one the save was requested for"
        else:
            tokens, chunk_tokens = order.get("tokens"), order.get("chunk_tokens")
            if (
                not isinstance(tokens, int)
                or not isinstance(chunk_tokens, int)
                or tokens <= 0
                or tokens % self.block_size
                or chunk_tokens <= 0
                or chunk_tokens % self.block_size
                or tokens > len(request.prompt_token_ids or [])
            ):
                reason = f"the save order {order!r} does not fit blocks of {self.block_size}"
            else:
                self._saves[request.request_id] = _PendingSave(op_id, tokens, chunk_tokens)
                return
        logger.warning("cwm save %s refused: %s", op_id, reason)
        if directory.is_dir():
            staging.write_json_atomic(directory / staging.RESULT_FILE, {"error": reason})

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        command = staging.directive(request.kv_transfer_params)
        if command is None or command["op"] != "load":
            return
        plan = self._plans.get(request.request_id)
        if plan is None:
            return
        directory = staging.op_dir(self.root, staging.LOAD_DIR, plan.op_id)
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
                )
            )
            note["first_token"] = first_token
        elif not plan.refusal:
            note["already_cached"] = True
        if directory.is_dir():
            staging.write_json_atomic(directory / staging.SCHEDULER_FILE, note)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = CwmConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self._saves:
            return meta
        for new in scheduler_output.scheduled_new_reqs:
            pending = self._saves.get(new.req_id)
            if pending is not None:
                pending.block_ids = list(new.block_ids[0])
                self._maybe_emit_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
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
            self._maybe_emit_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _maybe_emit_save(
        self,
        meta: CwmConnectorMetadata,
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
        meta.saves.append(
            SaveOp(
                op_id=pending.op_id,
                directory=str(staging.op_dir(self.root, staging.SAVE_DIR, pending.op_id)),
                block_ids=pending.block_ids[:needed],
                num_tokens=pending.num_tokens,
                chunk_tokens=pending.chunk_tokens,
            )
        )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        pending = self._saves.pop(request.request_id, None)
        if pending is not None:
            directory = staging.op_dir(self.root, staging.SAVE_DIR, pending.op_id)
            staging.write_json_atomic(
                directory / staging.RESULT_FILE,
                {"error": "the request finished before its KV was complete"},
            )
        if request.cache_salt and staging.directive(request.kv_transfer_params) is None:
            self._record_session(request)
        return False, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

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
        if self._record_thread is None:
            self._record_thread = threading.Thread(
                target=self._record_loop, name="cwm-sessions", daemon=True
            )
            self._record_thread.start()
        self._records.put((staging.session_path(self.root, request.cache_salt), record))

    def _record_loop(self) -> None:
        while True:
            path, record = self._records.get()
            try:
                staging.write_json_atomic(path, record)
            except OSError as exc:
                logger.error("cwm: cannot record session in %s: %s", path, exc)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        return {CacheHitSource.HOST: num_external_tokens} if num_external_tokens else {}
