"""The connector's worker side, in vLLM's worker process: it owns the KV tensors.

It learns the block layout from the attention backend (`backends.block_placement`), writes
`engine.json` for the agent, and performs the step's orders:

- loads: each staged chunk is mapped from the chunk root (shared memory by default), its
  size and BLAKE3 digest checked on the mapping before a single byte reaches the cache, and
  then copied once, a request's blocks at a time, into the paged cache. A load runs on the
  loader thread, off the engine's step (vLLM's `load_kv_async`: the request waits in
  WAITING_FOR_REMOTE_KVS while every other request keeps running), unless the connector
  was configured with `cwm_async_load: false`. A chunk that fails is reported through
  `get_block_ids_with_load_errors`, so vLLM applies its `kv_load_failure_policy` (recompute
  those blocks, or fail the request) and never uses them;
- saves: on the saver thread, the blocks are gathered straight into mapped chunk files and
  digested there; vLLM keeps the request's blocks allocated until `get_finished` reports
  the save done (`request_finished` returned True), so the step never waits for a save.

Under tensor parallelism each rank moves only its KV heads' columns of every chunk (its
`parallel.HeadShare`): a load checks the whole chunk's digest and scatters its columns; a
save's ranks fill one shared chunk file side by side, and the agent digests the file once
every rank has reported (vLLM reports a request's transfer finished only when all ranks
have).

Outcomes reach the agent as `result.json` beside the staged window or the save order (rank
r > 0: `result.rank<r>.json`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch
from vllm.logger import init_logger

from cwm_server.agent.engines.vllm import lanes, staging
from cwm_server.agent.engines.vllm.backends import block_placement
from cwm_server.agent.engines.vllm.lanes import Lane
from cwm_server.agent.engines.vllm.layout import KVGeometry, PagedKV, canonical_view
from cwm_server.agent.engines.vllm.parallel import HeadShare
from cwm_server.agent.engines.vllm.transfers import LoadOp, SaveOp, blocks_by_chunk

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig

# Under "vllm.": vLLM configures only its own loggers' handlers.
logger = init_logger(f"vllm.cwm.{__name__.rsplit('.', 1)[-1]}")


class CwmConnectorWorker:
    """The worker-side half of `CwmConnector` (which forwards vLLM's calls here)."""

    def __init__(
        self,
        root: Path,
        chunk_root: Path,
        geometry: KVGeometry,
        share: HeadShare,
        vllm_config: VllmConfig,
        kv_transfer_config: KVTransferConfig,
        *,
        transfer_cpus: str = "auto",
    ) -> None:
        self.root = root
        self.chunk_root = chunk_root
        self.geometry = geometry
        self.share = share
        self.block_size = geometry.block_size
        self.bytes_per_token = geometry.bytes_per_token
        self._vllm_config = vllm_config
        self._kv_transfer_config = kv_transfer_config
        self._paged: PagedKV | None = None
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._async_errors: set[int] = set()
        self._loads_done: set[str] = set()
        self._saves_running: set[str] = set()
        self._saves_done: set[str] = set()
        self._finished_requests: set[str] = set()
        # Off the forward pass's cores where there are others (see `lanes`).
        self.transfer_cpus = lanes.transfer_cpus(
            transfer_cpus, os.sched_getaffinity(0), lanes.online_cpus()
        )
        self._loader = Lane("cwm-load", self.transfer_cpus)
        self._saver = Lane("cwm-save", self.transfer_cpus)

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
        context = self._vllm_config.compilation_config.static_forward_context
        choice = block_placement(
            context.get(names[0]),
            names[0],
            tensors[0],
            geometry,
            str(self._vllm_config.cache_config.cache_dtype),
        )
        self._paged = PagedKV(
            tensors,
            choice.placement,
            num_kv_heads=self.share.num_heads,
            head_dim=geometry.head_dim,
            block_size=geometry.block_size,
        )
        if self.share.rank == 0:
            self._write_engine_file(choice.platform, choice.description)
        logger.info(
            "cwm connector: rank %d of %d, %d layers, KV heads %d..%d of %d x %d, %s, blocks "
            "of %d, layout from %s (%s), chunks in %s",
            self.share.rank,
            self.share.world,
            geometry.num_layers,
            self.share.first_head,
            self.share.first_head + self.share.num_heads - 1,
            geometry.num_kv_heads,
            geometry.head_dim,
            geometry.dtype,
            geometry.block_size,
            choice.description,
            "strided" if self._paged.strided else "permuted",
            self.chunk_root,
        )
        logger.info(
            "cwm connector: loads and saves run on CPUs %s",
            sorted(self.transfer_cpus) if self.transfer_cpus else "inherited from the worker",
        )

    def _write_engine_file(self, platform: str, attention: str) -> None:
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
                "bytes_per_token": geometry.bytes_per_token,
                "tensor_parallel_size": self.share.world,
                "vllm_version": vllm.__version__,
                "torch_version": str(torch.__version__),
                "platform": platform,
                "attention_isa": attention,
                "chunk_root": str(self.chunk_root),
                "kv_load_failure_policy": self._kv_transfer_config.kv_load_failure_policy,
                "pid": os.getpid(),
                "started_at": time.time(),
            },
        )

    def _canonical(self, buffer: memoryview, tokens: int) -> torch.Tensor:
        """This rank's columns of the canonical chunk in `buffer` (all of it without TP)."""
        geometry = self.geometry
        whole = canonical_view(buffer, geometry.dtype, geometry.num_layers, tokens, geometry.hidden)
        return self.share.of(whole, geometry.head_dim)

    # -- loads ---------------------------------------------------------------------------

    def start_loads(self, loads: list[LoadOp]) -> None:
        for op in loads:
            if op.asynchronous:
                self._loader.submit(functools.partial(self._load, op))
            else:
                self._load(op)

    def _load(self, op: LoadOp) -> None:
        """Load one staged window into its blocks; on any failure report the blocks from the
        first one not loaded onwards, so vLLM recomputes (or fails) them."""
        assert self._paged is not None
        directory = Path(op.directory)
        chunk_dir = staging.op_dir(self.chunk_root, staging.LOAD_DIR, op.op_id)
        loaded = 0
        error = ""
        started = time.perf_counter()
        try:
            for chunk, positions in blocks_by_chunk(op, self.block_size):
                expected = chunk.token_count * self.bytes_per_token
                with staging.MappedFile(chunk_dir / chunk.file) as mapped:
                    if mapped.size != expected:
                        raise ValueError(
                            f"{chunk.file} holds {mapped.size} bytes, {expected} expected"
                        )
                    if blake3.blake3(mapped.buffer).hexdigest() != chunk.digest:
                        raise ValueError(f"{chunk.file} does not match its BLAKE3 digest")
                    kv = self._canonical(mapped.buffer, chunk.token_count)
                    first_index, first_offset = positions[0]
                    count = len(positions)
                    self._paged.scatter(
                        op.block_ids[first_index : first_index + count],
                        kv[:, :, first_offset : first_offset + count * self.block_size],
                    )
                    del kv
                    loaded += count
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use these blocks
            error = f"{type(exc).__name__}: {exc}"
            if self.share.world > 1:
                error = f"rank {self.share.rank}: {error}"
            logger.error("cwm load %s failed after %d blocks: %s", op.op_id, loaded, error)
        failed = set(op.block_ids[loaded:]) if error else set()
        staging.write_json_atomic(
            staging.result_path(directory, self.share.rank),
            {
                "rank": self.share.rank,
                "blocks": len(op.block_ids),
                "loaded_blocks": loaded,
                "first_token": op.first_token,
                "loaded_tokens": loaded * self.block_size,
                "seconds": round(time.perf_counter() - started, 4),
                "asynchronous": op.asynchronous,
                "error": error,
            },
        )
        with self._lock:
            if op.asynchronous:
                # Published with the request's completion, never before it (vLLM's rule).
                self._async_errors |= failed
                self._loads_done.add(op.req_id)
            else:
                self._load_errors |= failed

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(requests whose save is done and that vLLM has finished, requests whose load is
        done). A load's failed blocks become visible to `get_block_ids_with_load_errors` in
        the same call that reports the request, as vLLM requires."""
        with self._lock:
            self._finished_requests |= finished_req_ids & (self._saves_running | self._saves_done)
            sending = self._saves_done & self._finished_requests
            self._saves_done -= sending
            self._finished_requests -= sending
            recving, self._loads_done = self._loads_done, set()
            self._load_errors |= self._async_errors
            self._async_errors = set()
        return sending, recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ---------------------------------------------------------------------------

    def start_saves(self, saves: list[SaveOp]) -> None:
        """Hand this step's saves to the saver thread. The blocks are complete after the
        forward and stay allocated until `get_finished` reports the save (vLLM was told so
        by `request_finished`), so the step does not wait."""
        for op in saves:
            with self._lock:
                self._saves_running.add(op.req_id)
            self._saver.submit(functools.partial(self._save, op))

    def _save(self, op: SaveOp) -> None:
        try:
            self._write_save(op)
        except Exception as exc:  # noqa: BLE001 - reported to the agent, never raised into vLLM
            self._save_failed(op, exc)
        finally:
            with self._lock:
                self._saves_running.discard(op.req_id)
                self._saves_done.add(op.req_id)

    def _write_save(self, op: SaveOp) -> None:
        assert self._paged is not None
        directory = Path(op.directory)
        chunk_dir = staging.op_dir(self.chunk_root, staging.SAVE_DIR, op.op_id)
        chunk_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        alone = self.share.world == 1
        chunks: list[dict[str, Any]] = []
        for index, start in enumerate(range(0, op.num_tokens, op.chunk_tokens)):
            count = min(op.chunk_tokens, op.num_tokens - start)
            blocks = op.block_ids[start // self.block_size : (start + count) // self.block_size]
            name = staging.chunk_file_name(index)
            digest = None
            # Alone: gathered under a temporary name, digested and renamed. Under tensor
            # parallelism the ranks fill the file side by side, and the agent digests it
            # once all have reported (it reads nothing before that).
            path = chunk_dir / (f".{name}.tmp" if alone else name)
            if alone or self.share.writer:
                size = count * self.bytes_per_token
                with staging.MappedFile(path, size, shared=not alone) as mapped:
                    out = self._canonical(mapped.buffer, count)
                    self._paged.gather(blocks, out=out)
                    del out
                    if alone:
                        digest = blake3.blake3(mapped.buffer).hexdigest()
            if alone:
                os.replace(path, chunk_dir / name)
            chunks.append(
                {"file": name, "token_start": start, "token_count": count, "digest": digest}
            )
        staging.write_json_atomic(
            staging.result_path(directory, self.share.rank),
            {
                "rank": self.share.rank,
                "tokens": op.num_tokens,
                "chunk_tokens": op.chunk_tokens,
                "chunks": chunks,
                "seconds": round(time.perf_counter() - started, 4),
                "error": "",
            },
        )

    def _save_failed(self, op: SaveOp, exc: BaseException) -> None:
        logger.error("cwm save %s failed: %s", op.op_id, exc)
        staging.write_json_atomic(
            staging.result_path(Path(op.directory), self.share.rank),
            {
                "rank": self.share.rank,
                "error": f"rank {self.share.rank}: {type(exc).__name__}: {exc}",
            },
        )
