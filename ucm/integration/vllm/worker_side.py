"""Worker half of the ucm connector: move KV blocks between the store and the paged cache.

Loads run at the start of a step (before the forward): prefix blocks fill every
layer as they are; chunk blocks fill only the layers Blend does not recompute
(from the first check layer on), with K re-rotated to the chunk's new position.
Saves run after the forward: a block's tokens are gathered from the paged cache,
K rotated back to the positions its key stands for, and dumped asynchronously. On
CUDA the device-to-host copy runs on a side stream and the store insert in a
background thread, so the saving request's first token never waits for either.

On CUDA nothing here waits for the host: blocks are copied straight from the
store's tensors (no host-side concatenation; asynchronous when they are pinned)
into a device staging buffer, then re-rotated and scattered per layer. Prefix loads
run on the compute stream (vLLM's backend reads them). Chunk loads run on a side
stream, in layer groups (the first check layer alone first), and each layer's
:class:`PagedKV` view carries an event that Blend's first access to that layer waits
on, so layer ``i + 1``'s transfer overlaps layer ``i``'s compute.

A block that fails to load is never used: a failed prefix block is reported to
vLLM (which recomputes from there), a failed chunk block leaves its rows marked
not reusable, so Blend recomputes them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ucm.hashing import rank_key
from ucm.integration.vllm.inflight import INFLIGHT
from ucm.integration.vllm.kv_layout import PagedKV, ProbedPagedKV, paged_kv_view
from ucm.integration.vllm.metadata import BlockLoad, RequestStep, UcmConnectorMetadata
from ucm.sparse.blend.rope import RopeSpec, _delta_cos_sin, apply_rotation, delta_rotate
from ucm.store import pinned
from ucm.store.base import KVStoreBase, StoreError, Task

logger = logging.getLogger(__name__)

BLOCK_LAYOUT = "ucm-kv-v1:L,KV,T,H,D"
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# Chunk loads on CUDA: layers per transfer group after the first check layer (which is
# always a group of its own, so that selection can start early); 0: all of them in one
# group. Each group costs one copy call per block (~10 us of host time each, measured
# on an H100), so fewer groups start the forward sooner; more groups overlap the
# transfer of later layers with the compute of earlier ones more finely.
LOAD_LAYER_GROUP = 0


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
    saved_blocks: int = 0
    failed_saves: int = 0
    per_request: dict[str, dict[str, int]] = field(default_factory=dict)


def token_slots(block_ids: torch.Tensor, tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Paged-cache slot of each prompt token index."""
    return block_ids[tokens // block_size] * block_size + tokens % block_size


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync on CUDA (a pageable source would make the
    copy synchronous and stall the host until the GPU is idle)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class WorkerSide:
    """Store <-> paged KV transfers of one worker (one TP rank)."""

    def __init__(self, store: KVStoreBase, block_tokens: int, tp_rank: int, rope: Optional[RopeSpec],
                 first_check_layer: Optional[int], max_step_tokens: int = 0) -> None:
        self.store = store
        self.max_step_tokens = max_step_tokens  # tokens one forward may save (staging headroom)
        self.block_tokens = block_tokens
        self.tp_rank = tp_rank
        self.rope = rope
        self.first_check_layer = first_check_layer
        self.layers: list[LayerInfo] = []
        self.views: dict[str, PagedKV] = {}
        self.vllm_block_size = 0
        self.block_nbytes = 0  # one stored block, set by register()
        self.reusable: dict[str, torch.Tensor] = {}  # req_id -> bool [num_scheduled] for this step
        self.load_errors: set[int] = set()
        self.pending_saves: list[Task] = []
        self.stats = WorkerStats()
        self._load_stream: Any = None
        self._save_stream: Any = None
        self._save_pool: Optional[cf.ThreadPoolExecutor] = None
        self._inflight: Optional[tuple] = None

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
        first = self.views[self.layers[0].name]
        # One stored block: [L, 2, block_tokens, H, D] (BLOCK_LAYOUT) of this rank's heads.
        per_layer = 2 * self.block_tokens * self.layers[0].num_kv_heads * self.layers[0].head_dim
        self.block_nbytes = len(self.layers) * per_layer * first.k.element_size()
        self.store.reserve(self.block_nbytes, in_flight_blocks=self.max_step_tokens // self.block_tokens)

    @property
    def device(self) -> torch.device:
        return self.views[self.layers[0].name].k.device

    def _block_ids(self, req: RequestStep) -> torch.Tensor:
        return torch.tensor(req.block_ids, dtype=torch.long, device=self.device)

    def _chunk_layers(self) -> list[LayerInfo]:
        first = self.first_check_layer or 0
        return [info for info in self.layers if info.index >= first]

    # ---- load ------------------------------------------------------------------------
    def start_load(self, meta: UcmConnectorMetadata) -> None:
        self._release_inflight()
        self.reusable = {rid: torch.zeros(r.num_scheduled, dtype=torch.bool) for rid, r in meta.requests.items()}
        items = [(req, load) for req in meta.requests.values() for load in req.loads]
        if not items:
            return
        keys = [rank_key(load.key, self.tp_rank) for _, load in items]
        try:
            blocks = self.store.wait(self.store.load(keys, BLOCK_LAYOUT))
        except StoreError as err:
            logger.warning("ucm: loading %d blocks failed (%s); recomputing them", len(keys), err)
            blocks = [None] * len(items)
        groups: dict[bool, list[tuple[RequestStep, BlockLoad, torch.Tensor]]] = {False: [], True: []}
        for (req, load), block in zip(items, blocks):
            if block is None or not self._block_fits(block):
                self._load_failed(req, load)
                continue
            groups[load.chunk].append((req, load, block))
            self.stats.loaded_blocks += 1
            if load.chunk:
                self.reusable[req.req_id][load.lo - req.num_computed:load.hi - req.num_computed] = True
        self._write(groups[False], self.layers, side_stream=False)
        self._write(groups[True], self._chunk_layers(), side_stream=True)

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

    def _indices(self, loads: list[tuple[RequestStep, BlockLoad, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Host-side (vectorised) index tensors of one group of loads.

        ``source``: row of each loaded token in the staged ``[num_loads * block_tokens]``
        rows; ``slot``: its paged-cache slot; ``position``: its prompt position;
        ``delta``: its RoPE shift.
        """
        b = self.block_tokens
        lo = torch.tensor([load.lo for _, load, _ in loads], dtype=torch.long)
        hi = torch.tensor([load.hi for _, load, _ in loads], dtype=torch.long)
        start = torch.tensor([load.token_start for _, load, _ in loads], dtype=torch.long)
        delta = torch.tensor([load.rope_delta for _, load, _ in loads], dtype=torch.long)
        counts = hi - lo
        which = torch.repeat_interleave(torch.arange(len(loads)), counts)
        offset = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum())) - offset[which]
        position = lo[which] + within
        source = which * b + (lo - start)[which] + within
        slot = torch.empty_like(position)
        tables: dict[str, torch.Tensor] = {}
        req_of = [req for req, _, _ in loads]
        for i, req in enumerate(req_of):  # one table per request, reused by its loads
            if req.req_id not in tables:
                tables[req.req_id] = torch.tensor(req.block_ids, dtype=torch.long)
        # Group token rows by request (loads of one request are contiguous in `loads`).
        row = 0
        i = 0
        while i < len(loads):
            j = i
            while j < len(loads) and req_of[j] is req_of[i]:
                j += 1
            n = int(counts[i:j].sum())
            tokens = position[row:row + n]
            slot[row:row + n] = token_slots(tables[req_of[i].req_id], tokens, self.vllm_block_size)
            row += n
            i = j
        return {"source": source, "slot": slot, "position": position, "delta": delta[which]}

    def _layer_groups(self, layers: list[LayerInfo]) -> list[list[LayerInfo]]:
        if not layers:
            return []
        rest = layers[1:]
        size = int(LOAD_LAYER_GROUP) if int(LOAD_LAYER_GROUP) > 0 else max(1, len(rest))
        return [layers[:1]] + [rest[i:i + size] for i in range(0, len(rest), size)]

    def _write(self, loads: list[tuple[RequestStep, BlockLoad, torch.Tensor]], layers: list[LayerInfo],
               side_stream: bool = False) -> None:
        if not loads or not layers:
            return
        device = self.device
        idx = self._indices(loads)
        rotate = bool((idx["delta"] != 0).any())
        cuda = device.type == "cuda"
        stream = None
        if cuda and side_stream:
            if self._load_stream is None:
                self._load_stream = torch.cuda.Stream(device=device)
            stream = self._load_stream
            stream.wait_stream(torch.cuda.current_stream(device))
        sources = [block for _, _, block in loads]
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            dev = {k: to_device(v, device) for k, v in idx.items()}
            cos = sin = None
            if rotate:
                cos, sin = _delta_cos_sin(dev["delta"], self.rope, dev["position"] - dev["delta"], device)
            full_rows = bool(len(loads) * self.block_tokens == dev["source"].numel())
            position_of = {info.name: p for p, info in enumerate(self.layers)}
            for group in (self._layer_groups(layers) if stream is not None else [layers]):
                p0 = position_of[group[0].name]
                p1 = position_of[group[-1].name] + 1
                assert p1 - p0 == len(group), "chunk layers must be consecutive"
                staged = self._stage([block[p0:p1] for block in sources], device)  # [n, G, 2, T, H, D]
                for q, info in enumerate(group):
                    kv = staged[:, q]  # [n, 2, T, H, D]
                    k = kv[:, 0].reshape(-1, kv.shape[-2], kv.shape[-1])
                    v = kv[:, 1].reshape(-1, kv.shape[-2], kv.shape[-1])
                    if not full_rows:
                        k, v = k[dev["source"]], v[dev["source"]]
                    if rotate:
                        k = apply_rotation(k, cos, sin, self.rope)
                    view = self.views[info.name]
                    view.ready = None  # this write is ordered on `stream` itself
                    view.scatter(dev["slot"], k, v)
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                        view.ready = event
        if stream is not None:
            # Host tensors must outlive their asynchronous copies.
            self._inflight = (sources, view.ready)

    @staticmethod
    def _stage(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Copy equally shaped host blocks into one device tensor, block by block (no
        host-side concatenation; asynchronous when the blocks are pinned)."""
        if device.type != "cuda":
            return torch.stack(parts).to(device)
        staged = torch.empty((len(parts),) + tuple(parts[0].shape), dtype=parts[0].dtype, device=device)
        targets = list(staged.unbind(0))
        try:
            torch._foreach_copy_(targets, parts, non_blocking=True)
        except (RuntimeError, TypeError):  # no cross-device foreach copy in this torch
            for target, part in zip(targets, parts):
                target.copy_(part, non_blocking=True)
        return staged

    def _release_inflight(self) -> None:
        if self._inflight is not None:
            _, event = self._inflight
            if event is not None:
                event.synchronize()
            self._inflight = None

    def wait_loads(self) -> None:
        """Order the compute stream after every pending chunk load (no host sync)."""
        if self._load_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._load_stream)
            for view in self.views.values():
                view.ready = None

    def wait_layer(self, layer_name: str) -> None:
        view = self.views.get(layer_name)
        if view is not None:
            view.wait_ready()

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    # ---- save ------------------------------------------------------------------------
    def save(self, meta: UcmConnectorMetadata) -> None:
        self.wait_loads()
        saves = [(req, s) for req in meta.requests.values() for s in req.saves]
        if not saves:
            return
        device = self.device
        b = self.block_tokens
        within = torch.arange(b)
        tokens = torch.cat([within + s.token_start for _, s in saves])
        tables: dict[str, torch.Tensor] = {}
        slots = []
        for req, s in saves:
            table = tables.get(req.req_id)
            if table is None:
                table = tables[req.req_id] = torch.tensor(req.block_ids, dtype=torch.long)
            slots.append(token_slots(table, within + s.token_start, self.vllm_block_size))
        slot = to_device(torch.cat(slots), device)
        delta = torch.tensor([-s.rope_delta for _, s in saves], dtype=torch.long).repeat_interleave(b)
        rotate = bool((delta != 0).any())
        if rotate:
            delta, tokens = to_device(delta, device), to_device(tokens, device)
        # [blocks, L, 2, b, H, D], written layer by layer: each block one contiguous piece,
        # so the host copy is one transfer (into pinned memory on CUDA) and blocks are views.
        per_block: Optional[torch.Tensor] = None
        for i, info in enumerate(self.layers):
            k, v = self.views[info.name].gather(slot)
            if rotate:
                k = delta_rotate(k, delta, self.rope, from_positions=tokens)
            if per_block is None:
                per_block = torch.empty((len(saves), len(self.layers), 2, b) + tuple(v.shape[1:]),
                                        dtype=v.dtype, device=v.device)
            per_block[:, i, 0] = k.view(len(saves), b, *k.shape[1:])
            per_block[:, i, 1] = v.view(len(saves), b, *v.shape[1:])
        assert per_block is not None
        if per_block[0].nbytes != self.block_nbytes:  # reserve() pinned blocks of the wrong size
            raise RuntimeError(f"ucm: saved blocks have {per_block[0].nbytes} bytes, "
                               f"{self.block_nbytes} were reserved")
        keys = [rank_key(s.key, self.tp_rank) for _, s in saves]
        self.stats.saved_blocks += len(saves)
        if per_block.is_cuda:
            self.pending_saves.append(self._dump_when_copied(keys, per_block))
            return
        self.pending_saves.append(self.store.dump(keys, list(per_block.unbind(0)), BLOCK_LAYOUT))

    def _dump_when_copied(self, keys: list[bytes], per_block: torch.Tensor) -> Task:
        """Copy blocks to pinned host memory on a side stream and dump them from a
        background thread once the copy has landed.

        Nothing here waits for the GPU: the request that produced the KV gets its first
        token without paying for the device-to-host copy or the store's insert. A block
        becomes visible to lookups a little later (a request in between recomputes it,
        which is always correct); :meth:`reap_saves` with ``wait=True`` flushes.
        """
        device = per_block.device
        if self._save_stream is None:
            self._save_stream = torch.cuda.Stream(device=device)
            self._save_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucm-save")
        stream = self._save_stream
        stream.wait_stream(torch.cuda.current_stream(device))
        # One pinned host block per saved block, from the pool the store reserved: a single
        # staging tensor for the whole save (1 GiB at 8K tokens) would be a fresh page-lock
        # of that size on the request path whenever the previous one is still being dumped.
        host = [pinned.empty(per_block.shape[1:], per_block.dtype) for _ in range(per_block.shape[0])]
        with torch.cuda.stream(stream):
            torch._foreach_copy_(host, list(per_block.unbind(0)), non_blocking=True)
            per_block.record_stream(stream)  # keep the device buffer until the copy ran
            copied = torch.cuda.Event()
            copied.record(stream)

        def dump() -> Any:
            copied.synchronize()
            return self.store.wait(self.store.dump(keys, host, BLOCK_LAYOUT))

        future = self._save_pool.submit(dump)
        INFLIGHT.add(keys, future)
        return Task([future], lambda results: results[0], f"dump of {len(keys)} blocks")

    def reap_saves(self, wait: bool = False) -> None:
        """Collect finished dumps; a failed dump is a future miss, logged, never fatal."""
        still = []
        for task in self.pending_saves:
            if wait or task.done():
                try:
                    self.store.wait(task)
                except StoreError as err:
                    self.stats.failed_saves += 1
                    logger.warning("ucm: saving KV blocks failed: %s", err)
            else:
                still.append(task)
        self.pending_saves = still
