"""Worker half of the ucm connector: move KV blocks between the store and the paged cache.

Loads run at the start of a step (before the forward): prefix blocks fill every
layer as they are; chunk blocks fill only the layers Blend does not recompute
(from the first check layer on), with K re-rotated to the chunk's new position.
Saves run after the forward: a block's tokens are gathered from the paged cache,
K rotated back to the positions its key stands for, and dumped asynchronously.

A block that fails to load is never used: a failed prefix block is reported to
vLLM (which recomputes from there), a failed chunk block leaves its rows marked
not reusable, so Blend recomputes them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ucm.hashing import rank_key
from ucm.integration.vllm.kv_layout import PagedKV, ProbedPagedKV, paged_kv_view
from ucm.integration.vllm.metadata import BlockLoad, RequestStep, UcmConnectorMetadata
from ucm.sparse.blend.rope import RopeSpec, delta_rotate
from ucm.store.base import KVStoreBase, StoreError, Task

logger = logging.getLogger(__name__)

BLOCK_LAYOUT = "ucm-kv-v1:L,KV,T,H,D"
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


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


class WorkerSide:
    """Store <-> paged KV transfers of one worker (one TP rank)."""

    def __init__(self, store: KVStoreBase, block_tokens: int, tp_rank: int, rope: Optional[RopeSpec],
                 first_check_layer: Optional[int]) -> None:
        self.store = store
        self.block_tokens = block_tokens
        self.tp_rank = tp_rank
        self.rope = rope
        self.first_check_layer = first_check_layer
        self.layers: list[LayerInfo] = []
        self.views: dict[str, PagedKV] = {}
        self.vllm_block_size = 0
        self.reusable: dict[str, torch.Tensor] = {}  # req_id -> bool [num_scheduled] for this step
        self.load_errors: set[int] = set()
        self.pending_saves: list[Task] = []
        self.stats = WorkerStats()

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
        self._write(groups[False], self.layers)
        self._write(groups[True], self._chunk_layers())

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

    def _write(self, loads: list[tuple[RequestStep, BlockLoad, torch.Tensor]], layers: list[LayerInfo]) -> None:
        if not loads or not layers:
            return
        device = self.device
        slots, deltas, sources = [], [], []
        for req, load, block in loads:
            tokens = torch.arange(load.lo, load.hi, device=device)
            slots.append(token_slots(self._block_ids(req), tokens, self.vllm_block_size))
            deltas.append(torch.full((load.hi - load.lo,), load.rope_delta, dtype=torch.long, device=device))
            a = load.lo - load.token_start
            sources.append(block[:, :, a:a + (load.hi - load.lo)])
        slot = torch.cat(slots)
        delta = torch.cat(deltas)
        positions = torch.cat([torch.arange(l.lo, l.hi, device=device) for _, l, _ in loads])
        source = torch.cat(sources, dim=2).to(device, non_blocking=True)
        rotate = bool((delta != 0).any())
        for info in layers:
            view = self.views[info.name]
            k, v = source[self.layers.index(info), 0], source[self.layers.index(info), 1]
            if rotate:
                k = delta_rotate(k.float(), delta, self.rope, from_positions=positions - delta)
            view.scatter(slot, k, v)

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    # ---- save ------------------------------------------------------------------------
    def save(self, meta: UcmConnectorMetadata) -> None:
        saves = [(req, s) for req in meta.requests.values() for s in req.saves]
        if not saves:
            return
        device = self.device
        b = self.block_tokens
        tokens = torch.cat([torch.arange(s.token_start, s.token_start + b, device=device) for _, s in saves])
        slot = torch.cat([token_slots(self._block_ids(req), torch.arange(s.token_start, s.token_start + b,
                                                                          device=device), self.vllm_block_size)
                          for req, s in saves])
        delta = torch.cat([torch.full((b,), -s.rope_delta, dtype=torch.long, device=device) for _, s in saves])
        rotate = bool((delta != 0).any())
        per_layer = []
        for info in self.layers:
            k, v = self.views[info.name].gather(slot)
            if rotate:
                k = delta_rotate(k.float(), delta, self.rope, from_positions=tokens).to(v.dtype)
            per_layer.append(torch.stack([k, v]))
        # [L, 2, N, H, D] -> one [L, 2, b, H, D] tensor per block, on the host.
        stacked = torch.stack(per_layer).cpu()
        blocks = [stacked[:, :, i * b:(i + 1) * b].contiguous() for i in range(len(saves))]
        keys = [rank_key(s.key, self.tp_rank) for _, s in saves]
        self.pending_saves.append(self.store.dump(keys, blocks, BLOCK_LAYOUT))
        self.stats.saved_blocks += len(blocks)

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
