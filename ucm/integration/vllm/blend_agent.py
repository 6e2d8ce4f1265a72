"""Blend inside a vLLM forward: the process-wide sparse agent of a worker.

The patch points (see :mod:`patches`) call this agent at three places:

* around the model forward (``execute_begin``/``execute_finished``): learn the
  batch's row order from the model runner and the per-request plan from the
  connector metadata, and start a :class:`BlendStep`;
* around every decoder layer (``layer_begin``/``layer_finished``): after a check
  layer shrink ``hidden_states``/``residual``/``positions`` to the kept rows, and
  after the last layer scatter them back to the full batch so that vLLM's
  ``logits_indices`` still point at the right rows;
* instead of the attention backend from the first check layer on
  (``attention_forward``): write the kept rows' fresh K/V into the paged cache and
  compute their attention over each request's whole context with an exact causal
  mask by true position. Layers before the first check layer use the backend over
  all rows, which is exactly a full prefill of those layers.

When a step has no reused rows the agent does nothing and vLLM runs untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ucm.engine import stats
from ucm.engine.host_time import HOST_TIMES
from ucm.engine.step_meta import StepPlan
from ucm.engine.kv_layout import PagedKV, token_slots
from ucm.engine.row_plan import ReqContext, RequestAttention, RowPart, RowPlan
from ucm.engine.step_timer import ForwardTimer
from ucm.engine.worker_side import WorkerSide, layer_index
from ucm.sparse.base import UcmSparseBase, UcmSparseRole
from ucm.sparse.blend import paged_backend
from ucm.sparse.blend.blend import Blend, BlendStep, RequestRows
from ucm.sparse.blend.selection import agree_reusable
from ucm.sparse.blend.transfer import to_device

logger = logging.getLogger(__name__)

@dataclass
class BatchInfo:
    """What the model runner knows about the batch it is about to run."""

    req_ids: list[str]
    positions: torch.Tensor


class VllmBlendAgent(UcmSparseBase):
    """Drives :class:`Blend` through one vLLM worker's forward passes."""

    def __init__(self, method: Blend, worker: WorkerSide, metadata: Callable[[], Optional[StepPlan]],
                 all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 host_all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 shrink_before_mlp: bool = True, eager_kernels: bool = True) -> None:
        super().__init__(method.config, UcmSparseRole.WORKER)
        self.method = method
        self.worker = worker
        worker.defer_chunk_loads = True  # every chunk layer is read through wait_ready here
        self.metadata = metadata
        self.all_reduce = all_reduce  # TP: device tensors (the deviations)
        self.host_all_reduce = host_all_reduce  # TP: CPU tensors, no wait on the GPU (reusable rows)
        self.last_layer = -1
        # Shrink to the kept rows inside a check layer, before its MLP (False: at the next
        # layer's start, running the check layer's MLP on every row). Exact either way.
        self.shrink_before_mlp = shrink_before_mlp
        self.eager_kernels = eager_kernels  # custom ops on their kernels in a Blend step (patches 1 and 2)
        self.step_kernels: Any = None  # the model's switches (eager_kernels.EagerKernels), set by patch 2
        self.step: Optional[BlendStep] = None
        self._began = False  # the model-runner patch announced the current forward
        self._beginning = False  # execute_begin is under way (a failure there is ucm's)
        self._batch: Optional[BatchInfo] = None
        self._fallback_causes: set[str] = set()  # logged once each
        self._layer_index: dict[str, int] = {}
        self._plan: Optional[RowPlan] = None  # rows the current layer frame computes
        self._next_plan: Optional[RowPlan] = None  # the same after the pending shrink
        self.timer = ForwardTimer(getattr(worker, "device", torch.device("cpu")))  # for the pay policy
        self._fell_back = False  # this forward's Blend step failed and its batch ran twice
        self._idle = False  # the model-runner patch found this forward idle (idle_forward)

    # ---- forward boundaries -------------------------------------------------------------
    def _chunk_read(self) -> tuple[int, float]:
        """Chunk tokens the worker read from the store for this step, and the seconds it took."""
        tokens, seconds = getattr(self.worker, "chunk_read", (0, 0.0))
        return int(tokens), seconds

    def idle_forward(self, positions: Optional[torch.Tensor]) -> bool:
        """A forward the agent has nothing to do in: no step plan bound (no load, save or
        Blend work) and too few rows for the pay policy to time (a decode step). It then
        skips :meth:`execute_begin`/:meth:`execute_finished` altogether."""
        if self.step is not None or self._began or positions is None:
            return False
        if self.metadata() is not None:
            return False
        self._idle = self.timer.uninformative(int(positions.shape[0]), False, self._chunk_read()[0])
        return self._idle

    def execute_begin(self, batch: BatchInfo) -> None:
        self.step = None
        self._idle = False
        self._began = self._beginning = True
        self._batch = batch
        meta = self.metadata()
        # A forward without requests (a dummy run) carries one-time costs, not a prefill's
        # price: not timed.
        rows = int(batch.positions.shape[0]) if batch.positions is not None and batch.req_ids else 0
        self.timer.start(rows, blend=bool(meta is not None and meta.blend_active),
                         load_tokens=self._chunk_read()[0])
        if meta is not None and meta.blend_active:
            start = HOST_TIMES.start()
            try:
                self._begin_step(meta, batch)
            finally:
                HOST_TIMES.add("begin", start)
        if self.step is None:
            # vLLM's backend computes every row: loaded KV must land before it writes.
            self.worker.wait_loads()
        self._beginning = False

    def abandon_step(self, exc: BaseException) -> bool:
        """Give up this forward's Blend step after ``exc``, so the caller can run the
        batch again as a plain prefill; False when no step (nor its setup) was under way,
        the failure then not being ucm's.

        Pending chunk loads are dropped or waited for (never left to land over the plain
        run's KV); each request that had reusable rows is recorded as having recomputed
        them all (its stats then say what ran); the fallback is counted
        (``blend_fallbacks``) and its cause logged once.
        """
        if self.step is None and not self._beginning:
            return False
        step = self.method.end_step()
        self.step, self._beginning = None, False
        self._fell_back = True  # the batch's time then covers two runs: not a sample
        self._plan = self._next_plan = None
        self.worker.abandon_loads()
        for req_id, num_reusable in self._reusable_counts(step).items():
            stats.record_fallback(req_id, num_reusable)
        stats.add_interval(blend_fallbacks=1)
        cause = f"{type(exc).__name__}: {exc}"
        if cause not in self._fallback_causes:
            self._fallback_causes.add(cause)
            logger.warning("ucm Blend: a step failed (%s); running its batch as a plain prefill", cause[:500],
                           exc_info=exc)
        return True

    def _reusable_counts(self, step: Optional[BlendStep]) -> dict[str, int]:
        """Reusable rows per request of the failed forward (the step's, else the loads')."""
        if step is not None:
            return {req_id: outcome.num_reusable for req_id, outcome in step.outcomes.items()}
        req_ids = self._batch.req_ids if self._batch is not None else []
        masks = {req_id: self.worker.reusable.get(req_id) for req_id in req_ids}
        return {req_id: int(mask.sum()) for req_id, mask in masks.items() if mask is not None}

    def _begin_step(self, meta: StepPlan, batch: BatchInfo) -> None:
        requests, contexts, slots = [], {}, []
        row = 0
        device = batch.positions.device
        width = max((len(r.block_ids) for r in meta.requests.values()), default=0)
        tables = np.zeros((len(batch.req_ids), max(width, 1)), dtype=np.int32)  # row r: contexts' r-th
        for index, req_id in enumerate(batch.req_ids):
            req = meta.requests.get(req_id)
            if req is None:
                raise RuntimeError(f"ucm Blend: request {req_id} is scheduled but missing from the "
                                   "connector metadata")
            reusable = self.worker.reusable.get(req_id, torch.zeros(req.num_scheduled, dtype=torch.bool))
            # The method (Blend or EPIC) picks its rows from what the plan says of them.
            requests.append(RequestRows(req_id, row, req.num_scheduled, reusable, ratio=req.ratio,
                                        selection=req.selection, first_position=req.num_computed,
                                        chunk_starts=tuple(req.chunk_starts),
                                        recompute_tokens=req.recompute_tokens, suffix_start=req.suffix_start))
            ids = np.asarray(req.block_ids, dtype=np.int64)
            tables[index, :len(ids)] = ids
            # numpy, not torch: torch's CPU ops on 8K-element index vectors went through its
            # OpenMP pool and took ~2-6 ms a request on the H100 host (a host profile).
            tokens = np.arange(req.num_computed, req.num_computed + req.num_scheduled)
            slots.append(token_slots(ids, tokens, self.worker.vllm_block_size))
            contexts[req_id] = ReqContext(row, req.num_scheduled, torch.from_numpy(ids),
                                           req.num_computed + req.num_scheduled)
            row += req.num_scheduled
        if self.host_all_reduce is not None:  # every TP rank must reuse (and so select) the same rows
            for r, mask in zip(requests, agree_reusable([r.reusable for r in requests], self.host_all_reduce)):
                r.reusable = mask
        if row != batch.positions.shape[0]:
            # Padded batch: row bookkeeping would not line up. Running plain is always
            # correct (loaded KV is simply overwritten by the full prefill).
            logger.warning("ucm Blend: batch has %d rows but %d scheduled tokens; running a full prefill",
                           batch.positions.shape[0], row)
            return
        step = self.method.begin_step(requests, row, self.all_reduce)
        if not step.active:
            self.method.end_step()
            return
        self.step = step
        self.contexts = contexts
        self._host_tables, self._tables = tables, None
        self.positions = batch.positions
        self.slots = to_device(torch.from_numpy(np.concatenate(slots)), device)
        self.rows_dev = torch.arange(row, device=device)
        self._plan = self._next_plan = None

    def execute_finished(self, logits_indices: torch.Tensor) -> torch.Tensor:
        step = self.method.end_step()
        if step is not None:
            for req_id, outcome in step.outcomes.items():
                if outcome.num_reusable:
                    stats.record_step(req_id, outcome.num_reusable, outcome.num_recomputed_reusable)
        if self._batch is not None and not self._fell_back:
            tokens, seconds = self._chunk_read()
            self.timer.stop(rows=int(self._batch.positions.shape[0]), blend=step is not None,
                            kept=sum(step.row_counts.values()) if step is not None else 0,
                            load_tokens=tokens, load_seconds=seconds)
        self._fell_back = False
        self.step = None
        self._began = self._beginning = False
        self._batch = None
        return logits_indices

    # ---- decoder layers ------------------------------------------------------------------
    def layer_begin(self, layer_index: int, positions, hidden_states, residual):
        step = self.step
        if step is None:
            return positions, hidden_states, residual
        hidden_states, residual = self._shrink(step, hidden_states, residual)
        if hidden_states.shape[0] != step.num_rows:
            positions = self._kept_positions
        return positions, hidden_states, residual

    def before_mlp(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink to the kept rows inside the check layer, before its MLP.

        Called with the attention output and the residual stream just before the
        layer's post-attention norm. The rows a check layer drops are never read again,
        so running its MLP (most of a layer's FLOPs) only on the kept rows is exact and
        saves ~(1 - ratio) of one layer's MLP.
        """
        step = self.step
        if step is None or not self.shrink_before_mlp:
            return hidden_states, residual
        return self._shrink(step, hidden_states, residual)

    def _shrink(self, step: BlendStep, hidden_states: torch.Tensor, residual: Optional[torch.Tensor]):
        """Apply a pending shrink (once, after a check layer selected its rows)."""
        local = step.take_shrink()
        if local is None:
            return hidden_states, residual
        local = to_device(local, hidden_states.device)
        hidden_states = hidden_states[local]
        residual = residual[local] if residual is not None else None
        self.rows_dev = to_device(step.rows, hidden_states.device)
        self._kept_positions = self.positions[self.rows_dev]  # every later layer's positions
        self._plan, self._next_plan = self._next_plan, None
        return hidden_states, residual

    def layer_finished(self, layer_index: int, positions, hidden_states, residual):
        step = self.step
        if step is None or layer_index != self.last_layer or hidden_states.shape[0] == step.num_rows:
            return positions, hidden_states, residual
        # Back to the full batch: vLLM's logits_indices address rows of the whole batch.
        full = hidden_states.new_zeros((step.num_rows,) + tuple(hidden_states.shape[1:]))
        full[self.rows_dev] = hidden_states
        if residual is not None:
            res = residual.new_zeros((step.num_rows,) + tuple(residual.shape[1:]))
            res[self.rows_dev] = residual
            residual = res
        return self.positions, full, residual

    # ---- attention -----------------------------------------------------------------------------
    def _index(self, layer_name: str) -> int:
        idx = self._layer_index.get(layer_name)
        if idx is None:
            idx = self._layer_index[layer_name] = layer_index(layer_name)
        return idx

    def attention_forward(self, layer: Any, query, key, value) -> Optional[torch.Tensor]:
        step = self.step
        if step is None:
            if self._idle:  # the model-runner patch ran and found nothing to do
                return None
            meta = None if self._began else self.metadata()
            if meta is not None and meta.blend_active:
                raise RuntimeError("ucm Blend: the model-runner patch did not run for this forward; "
                                   "this model runner is not supported (use the classic GPUModelRunner)")
            return None
        idx = self._index(layer.layer_name)
        if step.computes_all_rows(idx):
            return None
        start = HOST_TIMES.start()
        heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_size
        q = query.view(-1, heads, dim)
        k = key.view(-1, kv_heads, dim)
        v = value.view(-1, kv_heads, dim)
        view = self.worker.views[layer.layer_name]
        plan = self._plan
        if step.is_check_layer(idx):
            check_start = HOST_TIMES.start()
            cached_k, cached_v = view.gather(self.slots[self.rows_dev])
            step.select(idx, k, cached_k, v, cached_v, query=q, scale=layer.impl.scale)
            kept = step.kept_local
            assert kept is not None
            rows = step.rows[kept]
            plan = self._row_plan(kept, rows, q.device, (heads, kv_heads), every_row=False)
            # The next layers compute exactly these rows, in this order.
            self._next_plan = self._row_plan(torch.arange(kept.shape[0], device=q.device), rows, q.device,
                                              (heads, kv_heads), every_row=True, like=plan)
            HOST_TIMES.add("select", check_start)
        elif plan is None:
            plan = self._plan = self._row_plan(torch.arange(step.rows.shape[0], device=q.device), step.rows,
                                               q.device, (heads, kv_heads), every_row=True)
        where = plan.located.get(view.layout_key)
        if where is None:
            where = plan.located[view.layout_key] = view.locate(plan.slots)
        if plan.every_row:
            view.scatter_at(where, k, v)
        else:
            view.scatter_at(where, k[plan.kept], v[plan.kept])
        view.wait_ready()
        out = self._attend(plan, q, view, layer.impl.scale)
        HOST_TIMES.add("blend_attention", start)
        return out.reshape(-1, heads * dim)

    def _attend(self, plan: RowPlan, q: torch.Tensor, view: PagedKV, scale: float) -> torch.Tensor:
        """Attention output for every current row (zeros where the plan computes none):
        the paged kernel once for all requests where it applies, else each request
        over its gathered context."""
        if plan.paged is not None and view.strided and paged_backend.paged_kernel_wanted(q.device):
            rows_q = q if plan.every_row else q[plan.kept]
            done = paged_backend.run_paged_batch(
                rows_q, plan.q_pos, view.k, view.v, plan.paged, scale,
                lambda: [(part.span, part.attend.gathered(view)) for part in plan.parts])
            if done is not None:
                if plan.every_row:
                    return done
                out = q.new_zeros(q.shape)
                out[plan.kept] = done
                return out
        if plan.every_row and len(plan.parts) == 1:  # one request computes every row: no gather/scatter
            return plan.parts[0].attend(q, view, scale)
        out = q.new_zeros(q.shape)
        for part in plan.parts:
            out[part.local] = part.attend(q[part.local], view, scale)
        return out

    def _row_plan(self, local: torch.Tensor, rows: torch.Tensor, device: torch.device, heads: tuple[int, int],
                  every_row: bool, like: Optional[RowPlan] = None) -> RowPlan:
        """Plan computing the current rows ``local``, which are the batch rows ``rows``
        (ascending, so each request's rows are one stretch of ``step.row_counts`` of
        them). ``every_row``: ``local`` is all current rows in order. ``like``: a plan
        over the same batch rows whose per-request attention plans (block masks) can be
        shared. Reads nothing back from the device."""
        assert self.step is not None
        local = to_device(local, device)
        rows = to_device(rows, device)
        q_pos = self.positions[rows]
        shared = {id(p.attend.ctx): p.attend for p in like.parts} if like is not None else {}
        parts = []
        start = 0
        for req_id, ctx in self.contexts.items():
            count = self.step.row_counts[req_id]
            mine = slice(start, start + count)
            start += count
            if count == 0:
                continue
            attend = shared.get(id(ctx))
            if attend is None:
                attend = RequestAttention(ctx, q_pos[mine], heads)
            parts.append(RowPart(local[mine], mine, attend))
        if like is not None:
            paged = like.paged
        elif paged_backend.paged_kernel_wanted(device):
            if self._tables is None:  # once per step, only where the paged kernel runs
                self._tables = to_device(torch.from_numpy(self._host_tables), device)
            paged = paged_backend.plan_batch(self._tables, [ctx.seq_len for ctx in self.contexts.values()],
                                             [self.step.row_counts[req_id] for req_id in self.contexts],
                                             heads[0] // heads[1],
                                             [ctx.seq_len - ctx.num_rows for ctx in self.contexts.values()])
        else:
            paged = None
        return RowPlan(local, self.slots[rows], q_pos, parts, every_row, paged=paged)


def tp_all_reduces(tp_size: int) -> tuple[Optional[Callable], Optional[Callable]]:
    """With TP: vLLM's all-reduce of device tensors, and one of CPU tensors over the TP
    group's gloo group (it never waits for the GPU). Without: none."""
    if tp_size == 1:
        return None, None
    from vllm.distributed import get_tp_group, tensor_model_parallel_all_reduce

    def host_all_reduce(t: torch.Tensor, group: Any = get_tp_group().cpu_group) -> torch.Tensor:
        torch.distributed.all_reduce(t, group=group)
        return t

    return tensor_model_parallel_all_reduce, host_all_reduce

