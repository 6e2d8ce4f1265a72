"""Scheduler half of the ucm connector: plan reuse per request, ship per-step work.

Per request (once, at its first lookup): split the prompt (Blend only), hash the
prefix chain and each chunk's chain, look the keys up in the store, keep the
:class:`ReusePlan`. Per step: tell the worker which blocks to load into which
prompt tokens, which blocks to save, and (when Blend runs) every scheduled
request's block ids and token range. No tensors here.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional, Sequence

from ucm.config import SELECTIONS, UcmConfig
from ucm.hashing import HashContext, rank_key
from ucm.engine.inflight import INFLIGHT
from ucm.engine.step_meta import BlockLoad, RequestStep, ScheduledRequest, StepPlan, new_load, new_save
from ucm.sparse.blend.chunking import Delimiter, PromptSplit, split_prompt
from ucm.sparse.blend.pay_policy import BlendPayPolicy, PayDecision
from ucm.sparse.blend.plan import ReusePlan, build_plan
from ucm.store.base import KVStoreBase
from ucm.store.journal import HeldKeys

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """Scheduler-side state of one live request."""

    plan: ReusePlan
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    external_tokens: int = 0  # prefix tokens vLLM counts as loaded by us
    local_computed: int = 0  # tokens vLLM had computed itself before our load
    prefix_loaded: bool = False
    saved: bool = False
    ratio: Optional[float] = None
    precompute: bool = False
    selection: Optional[str] = None  # Blend's per-request ranking
    epic_tokens: Optional[int] = None  # EPIC's per-request k
    suffix_start: Optional[int] = None  # where the question after the last chunk begins
    decision: Optional[PayDecision] = None  # whether chunk reuse pays (None: no chunk hit to weigh)
    chunk_saves_skipped: bool = False  # its chunks were not saved: reusing them could not pay

    @property
    def blends(self) -> bool:
        """Chunk blocks are loaded and blended (the pay policy said yes, or never asked)."""
        return self.decision is None or self.decision.blend

    def decision_stats(self) -> dict:
        out = self.decision.to_stats() if self.decision is not None else {}
        if self.chunk_saves_skipped:
            out["chunk_saves"] = "skipped: reuse cannot pay"
        return out


RATIO_ARG = "ucm_blend_ratio"
SELECTION_ARG = "ucm_blend_selection"  # Blend: "deviation", "query" or "mixed" for this request
EPIC_TOKENS_ARG = "ucm_epic_tokens"  # EPIC: k for this request
PRECOMPUTE_ARG = "ucm_chunk_precompute"  # set by precompute_chunks: store chunks under chunk keys only


def ratio_error(extra_args: Optional[dict]) -> Optional[str]:
    """Why ``extra_args[ucm_blend_ratio]`` cannot be used, or None (absent or fine). The one
    rule: the API server refuses such a request (a 400), the scheduler ignores the value."""
    if not extra_args or RATIO_ARG not in extra_args:
        return None
    value = extra_args[RATIO_ARG]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{RATIO_ARG} must be a number in [0, 1], got {value!r} ({type(value).__name__})"
    if not 0.0 <= float(value) <= 1.0:
        return f"{RATIO_ARG} must be a number in [0, 1], got {value!r}"
    return None


def request_ratio(extra_args: Optional[dict]) -> Optional[float]:
    """The per-request Blend ratio from ``SamplingParams.extra_args`` (None: the config's).

    A bad value is logged and ignored (the config's ratios apply) rather than failing
    the engine from inside the scheduler (a request through the API server was refused
    at admission already).
    """
    error = ratio_error(extra_args)
    if error is not None:
        logger.error("ucm: %s; using the configured ratios", error)
        return None
    if not extra_args or RATIO_ARG not in extra_args:
        return None
    return float(extra_args[RATIO_ARG])


def request_selection(extra_args: Optional[dict]) -> Optional[str]:
    """The per-request Blend ranking from ``SamplingParams.extra_args`` (None: the config's);
    a bad value is logged and ignored, like a bad ratio."""
    if not extra_args or SELECTION_ARG not in extra_args:
        return None
    value = extra_args[SELECTION_ARG]
    if value not in SELECTIONS:
        logger.error("ucm: extra_args[%r]=%r is not one of %s; using the configured selection",
                     SELECTION_ARG, value, ", ".join(SELECTIONS))
        return None
    return value


def request_epic_tokens(extra_args: Optional[dict]) -> Optional[int]:
    """The per-request EPIC k from ``SamplingParams.extra_args`` (None: the config's); a bad
    value (not an int >= 0) is logged and ignored."""
    if not extra_args or EPIC_TOKENS_ARG not in extra_args:
        return None
    value = extra_args[EPIC_TOKENS_ARG]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        logger.error("ucm: extra_args[%r]=%r is not an int >= 0; using the configured recompute_tokens",
                     EPIC_TOKENS_ARG, value)
        return None
    return value


def request_is_precompute(extra_args: Optional[dict]) -> bool:
    """Whether the request is a chunk precompute (``extra_args[PRECOMPUTE_ARG]`` true)."""
    return bool(extra_args and extra_args.get(PRECOMPUTE_ARG))


class SchedulerSide:
    """Lookup, planning and step metadata; owned by the connector's scheduler role."""

    def __init__(self, config: UcmConfig, store: KVStoreBase, hash_context: HashContext,
                 block_tokens: int, tp_size: int, delimiter: Optional[Delimiter], num_layers: int = 1) -> None:
        self.config = config
        self.store = store
        self.hash_context = hash_context
        self.block_tokens = block_tokens
        self.tp_size = tp_size
        self.delimiter = delimiter
        self.requests: dict[str, _Tracked] = {}
        # Tracked requests that may still need a step's work (a load, a save, a prefill
        # row); the rest are decoding. With none, a step needs no planning (idle_step).
        self._pending: set[str] = set()
        # Keys the workers' private tiers hold, as they report them (they may run in other
        # processes, whose host memory the store here cannot see).
        self.held = HeldKeys()
        method = config.chunk_method
        self._told_chunk_saves_skipped = False  # logged once per process
        self.pay_policy = BlendPayPolicy(self._full_layers_share(config, num_layers),
                                         enabled=bool(method and method.pay_policy == "auto"))

    @staticmethod
    def _full_layers_share(config: UcmConfig, num_layers: int) -> float:
        """Share of the layers that compute every row of a reusing request (the pay
        policy's ``pre``): Blend's layers up to its first check layer, which selects;
        none for EPIC, whose rows are fixed from layer 0."""
        method = config.chunk_method
        if method is None:
            return 1.0
        full = method.first_reused_layer + (1 if config.blend is not None else 0)
        return min(1.0, full / max(num_layers, 1))

    # ---- lookup ------------------------------------------------------------------
    def _exists(self, keys: Sequence[bytes]) -> list[bool]:
        """A logical key exists only if every TP rank's shard is stored (in the store, or
        in a worker's private tier as the workers report it). Element-wise in C: a lookup
        asks ~1,000 keys for an 8K-token prompt, on the scheduler's path."""
        if not keys:
            return []
        found: Optional[list[bool]] = None
        for rank in range(self.tp_size):
            shard_keys = keys if rank == 0 else [rank_key(k, rank) for k in keys]  # rank 0's key is the key
            INFLIGHT.wait(shard_keys)  # a save of these keys in this process lands first
            hits = list(self.store.lookup(shard_keys))
            if len(self.held):
                hits = list(map(operator.or_, hits, self.held.contains_each(shard_keys)))
            found = hits if found is None else list(map(operator.and_, found, hits))
        assert found is not None
        return found

    def plan_request(self, req_id: str, prompt: Sequence[int], cache_salt: Optional[str],
                     ratio: Optional[float] = None, precompute: bool = False, *,
                     selection: Optional[str] = None, epic_tokens: Optional[int] = None) -> _Tracked:
        tracked = self.requests.get(req_id)
        if tracked is not None:
            return tracked
        method = self.config.chunk_method
        split = split_prompt(prompt, self.delimiter) if self.delimiter is not None else None
        cannot = None
        if split is not None and split.has_chunks and not precompute:
            cannot = self._cannot_pay(len(prompt), split, ratio, epic_tokens)
        plan = build_plan(
            prompt, split, self.hash_context.seed(cache_salt), self.block_tokens, self._exists,
            min_chunk_tokens=method.min_chunk_tokens if method else 1,
            save_chunks=bool(method and method.save_chunks), chunk_precompute=precompute,
            reuse_chunks=cannot is None,
        )
        tracked = _Tracked(plan=plan, prompt_len=len(prompt), ratio=ratio, precompute=precompute,
                           selection=selection, epic_tokens=epic_tokens,
                           suffix_start=split.suffix.start if split is not None and split.has_chunks else None)
        if cannot is not None:
            tracked.decision = cannot
            tracked.chunk_saves_skipped = True
            self._tell_chunk_saves_skipped(len(prompt))
        self.requests[req_id] = tracked
        self._pending.add(req_id)
        logger.debug("request %s: %d tokens, prefix hit %d, chunk hit %d", req_id, len(prompt),
                     plan.prefix_hit_tokens, plan.chunk_hit_tokens)
        return tracked

    def num_new_matched_tokens(self, req_id: str, prompt: Sequence[int], cache_salt: Optional[str],
                               num_computed: int, ratio: Optional[float] = None, precompute: bool = False, *,
                               selection: Optional[str] = None, epic_tokens: Optional[int] = None) -> int:
        """Prefix tokens we can load beyond what vLLM already has (never the whole prompt:
        vLLM must compute at least the last token to produce logits)."""
        tracked = self.plan_request(req_id, prompt, cache_salt, ratio, precompute, selection=selection,
                                    epic_tokens=epic_tokens)
        # vLLM's own prefix cache already holds [0, num_computed); the last call before
        # allocation is the one that counts, so remember it for the load range.
        tracked.local_computed = num_computed
        hit = min(tracked.plan.prefix_hit_tokens, len(prompt) - 1)
        if tracked.decision is None and self.delimiter is not None and not precompute:
            tracked.decision = self._weigh(tracked, max(hit, num_computed))
            self._maybe_skip_chunk_saves(tracked, max(hit, num_computed))
        return max(0, hit - num_computed)

    def _maybe_skip_chunk_saves(self, tracked: _Tracked, computed: int) -> None:
        """Drop a request's chunk saves where reusing its chunks could not pay even if they
        all hit (``BlendPayPolicy.worth_saving``): a save costs the saving request time and
        nothing would ever load it. A request that blends keeps them."""
        plan = tracked.plan
        if not plan.chunk_saves or (tracked.decision is not None and tracked.decision.blend):
            return
        chunk_tokens = plan.num_chunk_tokens
        if self.pay_policy.worth_saving(tracked.prompt_len - computed, chunk_tokens,
                                        self._recompute_share(tracked, max(1, chunk_tokens))):
            return
        tracked.plan = replace(plan, chunk_saves=())
        tracked.chunk_saves_skipped = True
        self._tell_chunk_saves_skipped(tracked.prompt_len)

    def _tell_chunk_saves_skipped(self, prompt_len: int) -> None:
        if not self._told_chunk_saves_skipped:
            self._told_chunk_saves_skipped = True
            logger.info("ucm: reusing chunks cannot pay here (a %d-token prompt: a plain prefill is faster than "
                        "blending even with every chunk stored); chunks that could not pay are no longer "
                        "looked up or saved (per-request stats: blend_reason, chunk_saves)", prompt_len)

    def _cannot_pay(self, rows: int, split: PromptSplit, ratio: Optional[float],
                    epic_tokens: Optional[int]) -> Optional[PayDecision]:
        """The pay policy's "cannot pay" for a prompt before its chunks are looked up: its
        best case reuses every token of its chunks (:meth:`BlendPayPolicy.cannot_pay`)."""
        chunk_tokens = split.num_chunk_tokens
        if chunk_tokens <= 0:
            return None
        share = self._share(ratio, epic_tokens, len(split.chunks), chunk_tokens)
        return self.pay_policy.cannot_pay(rows, chunk_tokens, share)

    def _weigh(self, tracked: _Tracked, computed: int) -> Optional[PayDecision]:
        """Ask the pay policy, once per request, whether reusing its chunks beats computing them."""
        plan = tracked.plan
        b = self.block_tokens
        if plan.chunk_hits and plan.first_reused_token() >= computed:  # none computed yet: every hit whole
            reusable = len(plan.chunk_hits) * b
        else:
            reusable = sum(min(b, h.token_start + b - max(h.token_start, computed)) for h in plan.chunk_hits
                           if h.token_start + b > computed)
        if reusable <= 0:
            return None
        return self.pay_policy.decide(tracked.prompt_len - computed, reusable, self._recompute_share(tracked, reusable))

    def _recompute_share(self, tracked: _Tracked, reusable: int) -> float:
        """The share of a request's reusable tokens its method will recompute, expected."""
        return self._share(tracked.ratio, tracked.epic_tokens, len(tracked.plan.reused_chunk_starts()), reusable)

    def _share(self, ratio: Optional[float], epic_tokens: Optional[int], num_chunks: int, reusable: int) -> float:
        """Blend: its ratio; EPIC: k tokens of each of ``num_chunks`` reused chunks over the
        ``reusable`` tokens; no chunk method: every token."""
        blend, epic = self.config.blend, self.config.epic
        if blend is not None:
            return ratio if ratio is not None else blend.final_ratio
        if epic is not None:
            k = epic_tokens if epic_tokens is not None else epic.recompute_tokens
            return min(1.0, k * num_chunks / max(reusable, 1))
        return 1.0

    def first_reused_token(self, req_id: str) -> Optional[int]:
        """Where the request's KV turns approximate (its first chunk token Blend may reuse
        beyond what vLLM already computed), or None when it reuses no chunk."""
        tracked = self.requests.get(req_id)
        if tracked is None or self.delimiter is None or not tracked.blends:
            return None
        return tracked.plan.first_reused_token(tracked.local_computed)

    def after_alloc(self, req_id: str, num_external_tokens: int) -> None:
        tracked = self.requests.get(req_id)
        if tracked is None:
            return
        tracked.external_tokens = num_external_tokens
        tracked.prefix_loaded = num_external_tokens == 0

    # ---- per step -------------------------------------------------------------------
    def has_pending(self) -> bool:
        """Whether any tracked request may still need work in a step (see :meth:`idle_step`)."""
        return bool(self._pending)

    def idle_step(self, new_blocks: Iterable[tuple[str, Optional[Sequence[int]]]]) -> None:
        """A step of running requests only, none of them pending (no new or resumed request,
        every tracked one decoding): its plan would be empty, so only the blocks they
        gained are kept, for a later Blend step that lists every request's blocks.
        ``new_blocks``: ``(request id, its new block ids or None)`` per scheduled request.

        Why: most steps are decode steps, and planning each of their requests (32 at batch
        32) cost ~30 us of host time per step on the 2-core VM, a step of a small model
        being ~1.5-4 ms on a GPU."""
        for req_id, ids in new_blocks:
            if ids:
                tracked = self.requests.get(req_id)
                if tracked is not None:
                    tracked.block_ids.extend(ids)

    def build_meta(self, scheduled: Sequence[ScheduledRequest]) -> StepPlan:
        """The step's plan from the requests the engine scheduled (in batch order)."""
        meta = StepPlan()
        # (request, its step) in batch order; None for a request with nothing left to do
        # (prompt loaded, computed and saved: a decode step), planned only if another
        # request's Blend step needs every row of the batch. Decode steps are most steps:
        # their planning is host time each of them pays.
        entries: list[tuple[ScheduledRequest, _Tracked, Optional[RequestStep]]] = []
        for req in scheduled:
            tracked = self.requests.get(req.req_id)
            if tracked is None:
                continue
            if req.new or req.resumed:
                # A resumed request was preempted: the engine recomputes it from
                # num_computed into new blocks, so its loads and saves start again.
                tracked.block_ids = list(req.block_ids or [])
                if req.resumed:
                    tracked.prefix_loaded = tracked.external_tokens == 0
                    tracked.saved = False
            elif req.block_ids:
                tracked.block_ids.extend(req.block_ids)
            idle = tracked.prefix_loaded and tracked.saved and req.num_computed >= tracked.prompt_len
            if idle:
                self._pending.discard(req.req_id)
            else:
                self._pending.add(req.req_id)
            step = None if idle else self._step(req.req_id, tracked, req.num_computed, req.num_scheduled)
            meta.blend_active = meta.blend_active or (step is not None and step.blend)
            entries.append((req, tracked, step))
        for req, tracked, step in entries:
            if step is None and meta.blend_active:
                step = self._step(req.req_id, tracked, req.num_computed, req.num_scheduled)
            if step is not None and (meta.blend_active or step.loads or step.saves):
                meta.requests[step.req_id] = step
        return meta

    def _step(self, req_id: str, tracked: _Tracked, num_computed: int, num_scheduled: int) -> RequestStep:
        plan = tracked.plan
        lo, hi = num_computed, num_computed + num_scheduled
        step = RequestStep(req_id, list(tracked.block_ids), num_computed, num_scheduled, tracked.prompt_len,
                           ratio=tracked.ratio, precompute=tracked.precompute, selection=tracked.selection,
                           recompute_tokens=tracked.epic_tokens, suffix_start=tracked.suffix_start)
        b = self.block_tokens
        if not tracked.prefix_loaded:
            load_lo, load_hi = tracked.local_computed, tracked.local_computed + tracked.external_tokens
            for ref in plan.prefix_hits:
                a, z = max(ref.token_start, load_lo), min(ref.token_start + b, load_hi)
                if a < z:
                    step.loads.append(BlockLoad(ref.key, ref.token_start, a, z, 0, chunk=False))
            tracked.prefix_loaded = True
        if lo < tracked.prompt_len and tracked.blends and plan.chunk_hits:
            end = min(hi, tracked.prompt_len)
            hits = plan.chunk_hits
            before = len(step.loads)
            if lo <= hits[0].token_start and hits[-1].token_start + b <= end:
                # The usual case (the whole prompt in one step): every hit whole, in C.
                step.loads += [new_load((key, start, start, start + b, start - stored, True))
                               for key, start, stored in hits]
            else:  # a chunked prefill: the hits this piece overlaps, clipped to it
                for ref in plan.chunk_hits_in(lo, end):
                    a, z = max(ref.token_start, lo), min(ref.token_start + b, hi)
                    step.loads.append(BlockLoad(ref.key, ref.token_start, a, z, ref.rope_delta, chunk=True))
            if len(step.loads) > before:
                step.blend = True
                step.chunk_starts = plan.reused_chunk_starts()
        if not tracked.saved and hi >= tracked.prompt_len:
            step.saves = [new_save((key, start, start - stored))
                          for key, start, stored in plan.prefix_saves + plan.chunk_saves]
            tracked.saved = True
        return step

    def finished(self, req_id: str) -> Optional[_Tracked]:
        self._pending.discard(req_id)
        return self.requests.pop(req_id, None)
