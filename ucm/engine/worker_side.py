"""Worker half of the ucm connector: move KV blocks between the store and the paged cache.

Loads run at the start of a step (before the forward): prefix blocks fill every
layer as they are; chunk blocks fill only the layers Blend does not recompute
(from the first check layer on), with K re-rotated to the chunk's new position.
Saves run after the forward, in :mod:`ucm.engine.kv_saver`.

On CUDA nothing here waits for the host: blocks are copied straight from the
store's tensors (no host-side concatenation; asynchronous when they are pinned)
into a device staging buffer, then re-rotated and scattered per layer. Prefix loads
run on the compute stream (vLLM's backend reads them). Chunk loads run on a side
stream, in layer groups (the first check layer alone first), and each layer's
:class:`PagedKV` view carries an event that Blend's first access to that layer waits
on, so layer ``i + 1``'s transfer overlaps layer ``i``'s compute. With a Blend agent the
chunk load is not even issued before the forward: the check layer's first read issues
it (``EngineOptions.defer_chunk_loads``), while the GPU computes the layers before it.

A block that fails to load is never used: a failed prefix block is reported to
vLLM (which recomputes from there), a failed chunk block leaves its rows marked
not reusable, so Blend recomputes them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ucm.config import EngineOptions
from ucm.engine.host_time import HOST_TIMES
from ucm.engine.kv_layout import PagedKV, PendingLoad, ProbedPagedKV, paged_kv_view, request_slots
from ucm.engine.kv_load import write_layers
from ucm.engine.kv_saver import BLOCK_LAYOUT, KVSaver
from ucm.engine.step_meta import BlockLoad, RequestStep, StepPlan
from ucm.hashing import rank_key
from ucm.sparse.blend.rope import RopeSpec
from ucm.sparse.blend.transfer import stage_runs, strided_copies_available, to_device
from ucm.store.arena import coalesce_runs
from ucm.store.base import KVStoreBase, StoreError

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
def load_layer_group(options: EngineOptions) -> int:
    """Layers per chunk-load group on CUDA, each written as it arrives (the compute stream
    waits per layer, not for the whole load). Unset: 6 when strided copies are available
    (one pitched copy per run of blocks lying back to back in the arena and group, so a
    group costs ~35 copy calls for an 8K-token prompt), else -1. -1: whole stored blocks
    in one transfer (the check layer waits for the whole load). 0: the first check layer
    alone, then all other layers; k > 0: the first check layer alone, then groups of k."""
    if options.load_layer_group is not None:
        return options.load_layer_group
    return 6 if strided_copies_available() else -1


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise RuntimeError(f"cannot tell the layer index of attention layer {layer_name!r}")
    return int(match.group(1))


@dataclass
class LayerInfo:
    name: str
    index: int
    backend: str
    num_kv_heads: int
    head_dim: int
    write: Optional[Callable[..., None]] = None  # the backend's own cache-update op


@dataclass
class WorkerStats:
    loaded_blocks: int = 0
    failed_blocks: int = 0
    per_request: dict[str, dict[str, int]] = field(default_factory=dict)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class WorkerSide:
    """Store <-> paged KV transfers of one worker (one TP rank)."""

    def __init__(self, store: KVStoreBase, block_tokens: int, tp_rank: int, rope: Optional[RopeSpec],
                 first_check_layer: Optional[int], max_step_tokens: int = 0,
                 options: EngineOptions = EngineOptions()) -> None:
        self.store = store
        self.options = options
        self.saver = KVSaver(store, block_tokens, tp_rank, rope, max_step_tokens, options.save_copies_queued)
        self.block_tokens = block_tokens
        self.tp_rank = tp_rank
        self.rope = rope
        self.first_check_layer = first_check_layer
        self.layers: list[LayerInfo] = []
        self.views: dict[str, PagedKV] = {}
        self.vllm_block_size = 0
        self.reusable: dict[str, torch.Tensor] = {}  # req_id -> bool [num_scheduled] for this step
        self.chunk_read: tuple[int, float] = (0, 0.0)  # this step's chunk tokens read from the store, seconds
        # Set by the Blend agent, which reads every chunk layer through wait_ready (vLLM's
        # backend does not): only then may a chunk load wait for its first reader.
        self.defer_chunk_loads = False
        self._deferred: Optional[tuple[list, list[LayerInfo], Any]] = None
        self._side_loads = False  # load-stream work the compute stream has not waited for
        self.load_errors: set[int] = set()
        self.stats = WorkerStats()
        self._load_stream: Any = None
        # (store tensors, event after their last copy) of this step's loads: the tensors
        # must outlive their asynchronous copies (the store may reuse their memory).
        self._inflight: list[tuple[list[torch.Tensor], Any]] = []

    # ---- setup ---------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], layers: list[LayerInfo]) -> None:
        self.layers = sorted(layers, key=lambda info: info.index)
        probed: dict[tuple, PagedKV] = {}
        for info in self.layers:
            cache = kv_caches[info.name]
            shape_key = (info.backend, tuple(cache.shape), cache.dtype)
            view = paged_kv_view(info.backend, cache, info.num_kv_heads, info.head_dim, info.write)
            if isinstance(view, ProbedPagedKV):
                # Every layer of one shape shares the order; probe once, then re-point.
                first = probed.setdefault(shape_key, view)
                view = ProbedPagedKV(k=cache, v=cache, flat=cache.view(cache.shape[0], -1),
                                     k_index=first.k_index, v_index=first.v_index, size=first.size)
            self.views[info.name] = view
        self.vllm_block_size = self.views[self.layers[0].name].block_size
        first = self.layers[0]
        self.saver.reserve(len(self.layers), first.num_kv_heads, first.head_dim,
                           self.views[first.name].k.element_size())

    @property
    def device(self) -> torch.device:
        return self.views[self.layers[0].name].k.device

    def _block_ids(self, req: RequestStep) -> torch.Tensor:
        return torch.tensor(req.block_ids, dtype=torch.long, device=self.device)

    def _chunk_layers(self) -> list[LayerInfo]:
        first = self.first_check_layer or 0
        return [info for info in self.layers if info.index >= first]

    # ---- load ------------------------------------------------------------------------
    def start_load(self, meta: StepPlan) -> None:
        if self._deferred is not None:
            raise RuntimeError("ucm: the previous step's chunk load was never issued (no reader of its "
                               "layers and no wait_loads); its KV would be missing from the cache")
        if self._inflight:
            start = HOST_TIMES.start()
            self._release_inflight()
            HOST_TIMES.add("load_release", start)
        self.chunk_read = (0, 0.0)
        if not meta.requests:  # a step with nothing planned (decode): no per-step objects
            if self.reusable:
                self.reusable = {}
            return
        self.reusable = {rid: torch.zeros(r.num_scheduled, dtype=torch.bool) for rid, r in meta.requests.items()}
        items = [(req, load) for req in meta.requests.values() for load in req.loads]
        if not items:
            return
        keys = [rank_key(load.key, self.tp_rank) for _, load in items]
        start = HOST_TIMES.start()
        began = time.perf_counter()
        try:
            blocks = self.store.wait(self.store.load(keys, BLOCK_LAYOUT))
        except StoreError as err:
            logger.warning("ucm: loading %d blocks failed (%s); recomputing them", len(keys), err)
            blocks = [None] * len(items)
        HOST_TIMES.add("load_store", start)
        chunk = [load for _, load in items if load.chunk]
        # The chunk blocks' share of the store's read, for the Blend pay policy.
        self.chunk_read = (sum(load.hi - load.lo for load in chunk),
                           (time.perf_counter() - began) * len(chunk) / len(items))
        groups: dict[bool, list[tuple[RequestStep, BlockLoad, torch.Tensor]]] = {False: [], True: []}
        marks: dict[str, np.ndarray] = {}  # reusable rows (numpy: no per-row Python objects)
        for (req, load), block in zip(items, blocks):
            if block is None or not self._block_fits(block):
                self._load_failed(req, load)
                continue
            groups[load.chunk].append((req, load, block))
            self.stats.loaded_blocks += 1
            if load.chunk:
                mark = marks.get(req.req_id)
                if mark is None:
                    mark = marks[req.req_id] = np.zeros(req.num_scheduled, dtype=np.bool_)
                mark[max(0, load.lo - req.num_computed):max(0, load.hi - req.num_computed)] = True
        for req_id, mark in marks.items():
            self.reusable[req_id] = torch.from_numpy(mark)
        self._write(groups[False], self.layers, side_stream=False)
        if groups[True] and self.defer_chunk_loads and self.options.defer_chunk_loads:
            self._defer(groups[True], self._chunk_layers())
        else:
            self._write(groups[True], self._chunk_layers(), side_stream=True)

    def _defer(self, loads: list[tuple[RequestStep, BlockLoad, torch.Tensor]], layers: list[LayerInfo]) -> None:
        """Leave a chunk load for its first reader (``EngineOptions.defer_chunk_loads``): its
        host work (index rows, ~35 copy calls per layer group, the load kernels: ~4 ms for an
        8K-token prompt) then runs while the GPU computes the layers before the check layer.

        On CUDA its copies will be ordered after the work queued so far (an event recorded
        now), as if issued here: not after the layers the forward queues in between.
        """
        after = None
        if self.device.type == "cuda":
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        self._deferred = (loads, layers, after)
        pending = PendingLoad(self.issue_deferred)
        for info in layers:
            self.views[info.name].ready = pending

    def issue_deferred(self) -> None:
        """Issue this step's deferred chunk load now; its layers' views then carry its events."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        loads, layers, after = deferred
        start = HOST_TIMES.start()
        try:
            self._write(loads, layers, side_stream=True, after=after)
        except BaseException:
            self._deferred = deferred  # still owed: the next reader or start_load says so
            raise
        HOST_TIMES.add("load_deferred", start)

    def _block_fits(self, block: torch.Tensor) -> bool:
        info = self.layers[0]
        want = (len(self.layers), 2, self.block_tokens, info.num_kv_heads, info.head_dim)
        if tuple(block.shape) != want:
            logger.warning("ucm: stored block has shape %s, expected %s; treating as a miss",
                           tuple(block.shape), want)
            return False
        return True

    def _load_failed(self, req: RequestStep, load: BlockLoad) -> None:
        self.stats.failed_blocks += 1
        if load.chunk:
            logger.info("ucm: chunk block of request %s missing; its %d tokens are recomputed",
                        req.req_id, load.hi - load.lo)
            return
        first, last = load.lo // self.vllm_block_size, (load.hi - 1) // self.vllm_block_size
        self.load_errors.update(req.block_ids[first:last + 1])

    def _indices(self, loads: list[tuple[RequestStep, BlockLoad, torch.Tensor]]) -> torch.Tensor:
        """Host-side index rows of one group of loads, int64 ``[4, R]`` in
        ``kv_load.ROWS`` order: ``source`` (row of each loaded token in the staged ``[num_loads *
        block_tokens]`` rows), ``slot`` (its paged-cache slot), ``position`` (its prompt
        position), ``delta`` (its RoPE shift).

        Built with numpy, not torch: torch's CPU ops here (``repeat_interleave`` runs a
        parallel loop even for a few hundred loads) went through the OpenMP pool, and on a
        16-core H100 host some requests stalled 35-52 ms in this function (HOST_TIMES
        ``load_index`` maximum, 30 requests at 4K and 8K).
        """
        b = self.block_tokens
        n_loads = len(loads)
        lo = np.fromiter((load.lo for _, load, _ in loads), np.int64, n_loads)
        hi = np.fromiter((load.hi for _, load, _ in loads), np.int64, n_loads)
        start = np.fromiter((load.token_start for _, load, _ in loads), np.int64, n_loads)
        delta = np.fromiter((load.rope_delta for _, load, _ in loads), np.int64, n_loads)
        counts = hi - lo
        which = np.repeat(np.arange(n_loads), counts)
        offset = np.cumsum(counts) - counts
        within = np.arange(int(counts.sum())) - offset[which]
        position = lo[which] + within
        rows = np.empty((4, position.shape[0]), dtype=np.int64)
        rows[0] = which * b + (lo - start)[which] + within
        rows[2] = position
        rows[3] = delta[which]
        rows[1] = request_slots([req for req, _, _ in loads], counts, position, self.vllm_block_size)
        return torch.from_numpy(rows)

    def _layer_groups(self, layers: list[LayerInfo]) -> list[list[LayerInfo]]:
        if not layers:
            return []
        group = load_layer_group(self.options)
        if group < 0:
            return [layers]
        rest = layers[1:]
        size = group if group > 0 else max(1, len(rest))
        return [layers[:1]] + [rest[i:i + size] for i in range(0, len(rest), size)]

    def _write(self, loads: list[tuple[RequestStep, BlockLoad, torch.Tensor]], layers: list[LayerInfo],
               side_stream: bool = False, after: Any = None) -> None:
        """Write ``loads`` into ``layers``; on CUDA with ``side_stream``, on the load
        stream, after ``after`` (an event) or else after the work queued so far."""
        if not loads or not layers:
            return
        device = self.device
        start = HOST_TIMES.start()
        idx = self._indices(loads)
        rotate = bool((idx[3] != 0).any())  # host tensors: no device read
        HOST_TIMES.add("load_index", start)
        cuda = device.type == "cuda"
        stream = None
        if cuda and side_stream:
            if self._load_stream is None:
                self._load_stream = torch.cuda.Stream(device=device)
            stream = self._load_stream
            self._side_loads = True
            if after is not None:
                stream.wait_event(after)
            else:
                stream.wait_stream(torch.cuda.current_stream(device))
        sources = [block for _, _, block in loads]
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            # One host->device copy for all four index vectors.
            start = HOST_TIMES.start()
            rows = to_device(idx, device)
            HOST_TIMES.add("load_rows", start)
            full_rows = bool(len(loads) * self.block_tokens == rows.shape[1])
            position_of = {info.name: p for p, info in enumerate(self.layers)}
            located: dict[tuple, tuple[torch.Tensor, ...]] = {}  # slot addresses per layout
            whole = stream is None or load_layer_group(self.options) < 0
            runs = coalesce_runs(sources)
            pinned_runs: dict[int, bool] = {}
            for group in (self._layer_groups(layers) if stream is not None else [layers]):
                p0 = position_of[group[0].name]
                p1 = position_of[group[-1].name] + 1
                assert p1 - p0 == len(group), "chunk layers must be consecutive"
                s0, s1 = (0, len(self.layers)) if whole else (p0, p1)
                start = HOST_TIMES.start()
                staged = stage_runs(runs, len(sources), s0, s1, device, pinned_runs)  # [n, s1-s0, 2, T, H, D]
                HOST_TIMES.add("load_copy", start)
                views = [self.views[info.name] for info in group]
                for view in views:
                    view.ready = None  # this write is ordered on `stream` itself
                start = HOST_TIMES.start()
                write_layers(staged, p0 - s0, views, rows, self.rope, rotate, full_rows, located,
                             self.options.rope_slice_bytes)
                HOST_TIMES.add("load_write", start)
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                    for view in views:
                        view.ready = event
            if cuda:
                done = torch.cuda.Event()
                done.record()  # on the stream of these copies (the side or the compute stream)
                self._inflight.append((sources, done))

    def _release_inflight(self) -> None:
        for _, event in self._inflight:
            event.synchronize()  # long done by the next step: its forward ran after it
        self._inflight = []

    def wait_loads(self) -> None:
        """Order the compute stream after every pending chunk load (no host sync),
        issuing a deferred one first."""
        self.issue_deferred()
        if self._side_loads:
            self._side_loads = False
            torch.cuda.current_stream(self.device).wait_stream(self._load_stream)
            for view in self.views.values():
                view.ready = None

    def abandon_loads(self) -> None:
        """A failed Blend step's chunk load: dropped if not yet issued (the plain rerun
        computes every row it would have written), else waited for, so it cannot land
        over the rerun's KV."""
        if self._deferred is not None:
            self._deferred = None
            for view in self.views.values():
                view.ready = None
        self.wait_loads()

    def wait_layer(self, layer_name: str) -> None:
        view = self.views.get(layer_name)
        if view is not None:
            view.wait_ready()

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    # ---- save ------------------------------------------------------------------------
    def save(self, meta: StepPlan) -> None:
        """Save the step's blocks (kv_saver.KVSaver), after every pending load landed."""
        self.wait_loads()
        self.saver.save(meta, self.views, [info.name for info in self.layers], self.vllm_block_size)

    def reap_saves(self, wait: bool = False) -> None:
        self.saver.reap(wait)
