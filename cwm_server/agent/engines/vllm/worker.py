"""The connector's worker side, in vLLM's worker process: it owns the KV tensors.

It learns the block layout from the attention backend (`layout.probe_block_layout`), writes
`engine.json` for the agent, and performs the step's orders:

- loads: every chunk's size and BLAKE3 digest is checked before a single byte reaches the
  cache; a chunk that fails is reported through `get_block_ids_with_load_errors`, so vLLM
  applies its `kv_load_failure_policy` (recompute those blocks, or fail the request) and
  never uses them;
- saves: the blocks are gathered during the step (they may be reused once it ends) and
  written as canonical chunks by a background thread, so the forward pass never waits on
  encoding or disk.

Outcomes reach the agent as `result.json` beside the staged window or the save order.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch
from vllm.logger import init_logger

from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.layout import (
    BlockLayout,
    KVGeometry,
    LayoutError,
    PagedKV,
    from_canonical_bytes,
    probe_block_layout,
    to_canonical_bytes,
)
from cwm_server.agent.engines.vllm.transfers import LoadOp, SaveOp, blocks_by_chunk

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig

logger = init_logger(__name__)


class CwmConnectorWorker:
    """The worker-side half of `CwmConnector` (which forwards vLLM's calls here)."""

    def __init__(
        self,
        root: Path,
        geometry: KVGeometry,
        vllm_config: VllmConfig,
        kv_transfer_config: KVTransferConfig,
    ) -> None:
        self.root = root
        self.geometry = geometry
        self.block_size = geometry.block_size
        self.bytes_per_token = geometry.bytes_per_token
        self._vllm_config = vllm_config
        self._kv_transfer_config = kv_transfer_config
        self._paged: PagedKV | None = None
        self._load_errors: set[int] = set()
        self._writes: queue.Queue[tuple[SaveOp, torch.Tensor]] = queue.Queue()
        self._write_thread: threading.Thread | None = None

    # -- the KV tensors ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        geometry = self.geometry
        names = sorted(kv_caches, key=extract_layer_index)
        tensors = [kv_caches[name] for name in names]
        distinct = len({t.data_ptr() for t in tensors})
        if len(tensors) != geometry.num_layers or distinct != len(tensors):
            raise ValueError(
                f"the cwm connector expected {geometry.num_layers} distinct layer caches, got "
                f"{len(tensors)} (shared-KV layers are not supported)"
            )
        isa, layout = self._probe(names[0], tensors[0])
        self._paged = PagedKV(tensors, layout)
        self._write_engine_file(isa)
        logger.info(
            "cwm connector: %d layers, %d KV heads x %d, %s, blocks of %d, layout from %s",
            geometry.num_layers,
            geometry.num_kv_heads,
            geometry.head_dim,
            geometry.dtype,
            geometry.block_size,
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
        return isa, probe_block_layout(
            write, heads, tokens, self.geometry.head_dim, content, tensor.dtype
        )

    def _write_engine_file(self, isa: str) -> None:
        import vllm

        config = self._vllm_config
        geometry = self.geometry
        staging.write_json_atomic(
            self.root / staging.ENGINE_FILE,
            {
                "staging_version": staging.STAGING_VERSION,
                "model": config.model_config.model,
                "served_model_name": config.model_config.served_model_name,
                "kv_dtype": geometry.dtype_name,
                "num_layers": geometry.num_layers,
                "num_kv_heads": geometry.num_kv_heads,
                "head_dim": geometry.head_dim,
                "block_size": geometry.block_size,
                "vllm_version": vllm.__version__,
                "torch_version": str(torch.__version__),
                "platform": "cpu",
                "attention_isa": isa,
                "kv_load_failure_policy": self._kv_transfer_config.kv_load_failure_policy,
                "pid": os.getpid(),
                "started_at": time.time(),
            },
        )

    # -- loads ---------------------------------------------------------------------------

    def start_loads(self, loads: list[LoadOp]) -> None:
        for op in loads:
            self._load(op)

    def _load(self, op: LoadOp) -> None:
        """Load one staged window into its blocks; on any failure report the blocks from the
        first one not loaded onwards, so vLLM recomputes (or fails) them."""
        assert self._paged is not None
        geometry = self.geometry
        directory = Path(op.directory)
        loaded = 0
        error = ""
        try:
            by_block = blocks_by_chunk(op, self.block_size)
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
                    data, geometry.dtype, geometry.num_layers, chunk.token_count, geometry.hidden
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

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ---------------------------------------------------------------------------

    def gather_saves(self, saves: list[SaveOp]) -> None:
        """Gather this step's saves now (the blocks are complete after the forward and may be
        reused once the step ends); encode and write them on a background thread."""
        for op in saves:
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
        chunks: list[dict[str, Any]] = []
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
