"""cwm as a vLLM v1 KV connector: freeze and thaw live vLLM sessions, block for block.

Load it into a vLLM server with

    --kv-transfer-config '{"kv_connector": "CwmConnector",
      "kv_connector_module_path": "cwm_server.agent.engines.vllm.connector",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"cwm_dir": "/var/lib/cwm/vllm-0"}}'

and run `cwm agent --engine vllm --vllm-url URL --vllm-dir /var/lib/cwm/vllm-0` beside it.
The two meet in `cwm_dir` (see `staging`); nothing else of cwm runs inside vLLM, and the
connector imports neither the manager nor grpc.

vLLM builds one `CwmConnector` per role, as it does for its own connectors: in the engine-core
process for the scheduler, in the worker process for the worker. This class checks the
configuration both share and forwards each call to its role's half:

- `scheduler.CwmConnectorScheduler` decides which requests load a staged window or save their
  blocks, and records finished sessions for the agent;
- `worker.CwmConnectorWorker` owns the KV tensors and performs those loads and saves;
- `CwmConnectorMetadata` carries a step's orders (`transfers.LoadOp`, `transfers.SaveOp`)
  from the first to the second.

Options in `kv_connector_extra_config`: `cwm_dir` (required), `cwm_chunk_dir` (where chunks
are staged; default a folder of /dev/shm), `cwm_async_load` (default true: loads run off
the engine's step) and `cwm_transfer_cpus` (where the worker's loads and saves run: "auto",
the default, picks the CPUs vLLM's threads are not pinned to; "inherit"; or a list such as
"0,2-3"; see `lanes`).

Tensor parallelism: each worker rank loads and saves its own KV heads' columns of every
canonical chunk (`parallel`), so a window does not depend on how many ranks wrote it.

Limits: one KV cache group (plain attention models; hybrid models are refused at start with
the groups named), no pipeline parallelism, KV dtypes bf16/fp16/fp32, little-endian hosts;
attention backends CPU_ATTN, FLASH_ATTN, FLASHINFER and TRITON_ATTN (`backends`; MLA and
quantised caches are refused).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from cwm_server.agent.engines.vllm.layout import WORD_DTYPES, KVGeometry
from cwm_server.agent.engines.vllm.parallel import HeadShare, head_share
from cwm_server.agent.engines.vllm.scheduler import CwmConnectorScheduler
from cwm_server.agent.engines.vllm.transfers import LoadOp, SaveOp
from cwm_server.agent.engines.vllm.worker import CwmConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# Under "vllm.": vLLM configures only its own loggers' handlers.
logger = init_logger(f"vllm.cwm.{__name__.rsplit('.', 1)[-1]}")

EXTRA_DIR_KEY = "cwm_dir"
EXTRA_CHUNK_DIR_KEY = "cwm_chunk_dir"
EXTRA_ASYNC_LOAD_KEY = "cwm_async_load"
EXTRA_TRANSFER_CPUS_KEY = "cwm_transfer_cpus"


@dataclass
class CwmConnectorMetadata(KVConnectorMetadata):
    """One step's orders from the scheduler side to the worker side."""

    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


def _describe_group(index: int, group: Any) -> str:
    spec = group.kv_cache_spec
    window = getattr(spec, "sliding_window", None)
    kind = type(spec).__name__ + (f" (sliding window {window})" if window else "")
    names = list(group.layer_names)
    shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    return f"group {index}: {kind}, {len(names)} layers ({shown})"


def kv_geometry(kv_cache_config: KVCacheConfig, total_kv_heads: int | None = None) -> KVGeometry:
    """The shape of the single KV cache group (ValueError naming the groups for any other
    kind of model), with the model's `total_kv_heads` where tensor parallelism gives each
    worker only some of them (the group's spec counts one rank's heads)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        described = "; ".join(_describe_group(i, g) for i, g in enumerate(groups))
        raise ValueError(
            f"the cwm connector supports models with one KV cache group; this one has "
            f"{len(groups)}: {described}. Hybrid (sliding-window beside full attention, or "
            "linear-attention) models are not supported yet"
        )
    spec: Any = groups[0].kv_cache_spec
    if "MLA" in type(spec).__name__:
        raise ValueError(
            f"the cwm connector does not support MLA caches ({type(spec).__name__}): they "
            "hold one latent vector per token, not K and V"
        )
    for attr in ("num_kv_heads", "head_size", "dtype", "block_size"):
        if not hasattr(spec, attr):
            raise ValueError(f"the cwm connector needs an attention KV cache, got {spec!r}")
    if any(kind in type(spec).__name__ for kind in ("SlidingWindow", "ChunkedLocal")):
        # (A FullAttentionSpec with a window keeps every block: that is fine.)
        raise ValueError(
            "the cwm connector does not support sliding-window attention "
            f"({_describe_group(0, groups[0])}): vLLM frees the blocks that fall out of "
            "the window"
        )
    return KVGeometry(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(total_kv_heads or spec.num_kv_heads),
        head_dim=int(spec.head_size),
        dtype=spec.dtype,
        block_size=int(spec.block_size),
    )


def _head_share(geometry: KVGeometry, kv_cache_config: KVCacheConfig, world: int) -> HeadShare:
    """This worker's heads under tensor parallelism (checked against the heads its cache has)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    rank = get_tensor_model_parallel_rank() if world > 1 else 0
    share = head_share(geometry.num_kv_heads, world, rank)
    local = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.num_kv_heads)
    if local != share.num_heads:
        raise ValueError(
            f"rank {rank} of {world} caches {local} KV heads, but splitting the model's "
            f"{geometry.num_kv_heads} would give it {share.num_heads}"
        )
    return share


def _flag(extra: dict[str, Any], key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if isinstance(value, str):
        value = value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


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
        if parallel.pipeline_parallel_size != 1:
            raise ValueError(
                "the cwm connector does not support pipeline parallelism (each stage would "
                "hold some layers of every chunk); tensor parallelism is supported"
            )
        if not vllm_config.cache_config.enable_prefix_caching:
            raise ValueError(
                "the cwm connector needs vLLM's prefix caching: thawed blocks are served from "
                "it and freezes re-read sessions through it"
            )
        if sys.byteorder != "little":
            raise ValueError("the cwm connector needs a little-endian host (canonical chunks are)")
        self.root = Path(directory).resolve()
        staging.ensure_layout(self.root)
        chunk_dir = extra.get(EXTRA_CHUNK_DIR_KEY)
        self.chunk_root = (
            Path(chunk_dir).resolve() if chunk_dir else staging.default_chunk_root(self.root)
        )
        staging.ensure_chunk_root(self.chunk_root)
        self.geometry = kv_geometry(
            kv_cache_config, vllm_config.model_config.get_total_num_kv_heads()
        )
        if self.geometry.dtype not in WORD_DTYPES:
            raise ValueError(f"the cwm connector does not support KV dtype {self.geometry.dtype}")
        self._scheduler: CwmConnectorScheduler | None = None
        self._worker: CwmConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = CwmConnectorScheduler(
                self.root,
                self.geometry,
                chunk_root=self.chunk_root,
                async_load=_flag(extra, EXTRA_ASYNC_LOAD_KEY, True),
            )
        else:
            self._worker = CwmConnectorWorker(
                self.root,
                self.chunk_root,
                self.geometry,
                _head_share(self.geometry, kv_cache_config, parallel.tensor_parallel_size),
                vllm_config,
                self._kv_transfer_config,
                transfer_cpus=str(extra.get(EXTRA_TRANSFER_CPUS_KEY, "auto")),
            )
        logger.info("cwm connector (%s) using %s", role.name.lower(), self.root)

    def _scheduler_side(self) -> CwmConnectorScheduler:
        if self._scheduler is None:
            raise RuntimeError("a scheduler-side call reached the worker's cwm connector")
        return self._scheduler

    def _worker_side(self) -> CwmConnectorWorker:
        if self._worker is None:
            raise RuntimeError("a worker-side call reached the scheduler's cwm connector")
        return self._worker

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, CwmConnectorMetadata)
        self._worker_side().start_loads(metadata.loads)

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
        """Hand this step's saves to the worker side's saver thread (see
        `CwmConnectorWorker.start_saves`); nothing here waits."""
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, CwmConnectorMetadata)
        self._worker_side().start_saves(metadata.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self._worker_side().get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        """vLLM is stopping: what is staged for it can never be loaded now, so its first
        worker removes the chunk root's contents (shared memory, by default)."""
        if self._worker is not None and self._worker.share.rank == 0:
            staging.clear_chunk_root(self.chunk_root)

    # --------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler_side().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler_side().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        loads, saves = self._scheduler_side().take_step_orders(scheduler_output)
        return CwmConnectorMetadata(loads=loads, saves=saves)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler_side().loads_finished(set(connector_output.finished_recving or ()))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler_side().request_finished(request), None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        return {CacheHitSource.HOST: num_external_tokens} if num_external_tokens else {}
