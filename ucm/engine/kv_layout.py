"""One small adapter per paged-KV layout: K and V views of one layer's cache.

Backends store a layer's paged KV differently (CPU_ATTN in vLLM 0.32 keeps, per
block and head, K in an ISA-dependent order then V rows, so its order is probed;
FLASH_ATTN in vLLM 0.32 keeps K and V planes of ``[blocks, block_size, heads, head_dim]``,
in vLLM 0.26 one ``[blocks, heads, block_size, 2 * head_dim]`` tensor with K and V
packed in the last dim). Blend needs only four operations on
it, all by *slot* (``block_id * block_size + offset``): gather and scatter token
rows, and gather a request's whole context by its block ids. Every view here is
``[num_blocks, block_size, heads, head_dim]`` over the engine's own storage, so
writes land in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np
import torch


class PendingLoad:
    """A load of some layers that is not issued yet (see ``EngineOptions.defer_chunk_loads``).

    It stands in those layers' :attr:`PagedKV.ready` until issued; the first access to
    any of them issues it, which replaces every such ``ready`` with the real event.
    """

    def __init__(self, issue: Callable[[], None]) -> None:
        self.issue = issue  # idempotent: a load already issued is not issued again


@dataclass
class PagedKV:
    """K and V of one layer as ``[num_blocks, block_size, heads, head_dim]`` views."""

    k: torch.Tensor
    v: torch.Tensor
    # ``k``/``v`` are strided views of the cache (last dim contiguous), so kernels can
    # address them directly (the load and paged-attention kernels); probed layouts are not.
    strided = True
    # A CUDA event recorded on the worker's load stream once this layer's loaded KV is
    # in place (layer-wise loading); the first access from the compute stream waits on it.
    # A PendingLoad while the load is deferred: the first access issues it.
    ready: Optional[Any] = field(default=None, repr=False, compare=False)
    # K and V as ``[num_blocks * block_size, heads, head_dim]`` views, where each plane's
    # blocks lie back to back (vLLM 0.32 planes; 0.26's NHD stride order): a slot is then a
    # row index and a write one index_copy_ per plane (less host time than indexing by
    # block and offset, in every layer of a Blend step).
    planes: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, init=False, repr=False,
                                                                compare=False)

    def __post_init__(self) -> None:
        if self.strided:
            k, v = _slot_rows(self.k), _slot_rows(self.v)
            self.planes = (k, v) if k is not None and v is not None else None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    def wait_ready(self) -> None:
        """Order the current stream after this layer's pending load (no host sync)."""
        event = self.ready
        if isinstance(event, PendingLoad):
            event.issue()  # sets this view's ready: the load's event (CUDA) or None
            event = self.ready
            if isinstance(event, PendingLoad):
                raise RuntimeError("ucm: a deferred KV load was not written (its issue failed)")
        if event is not None:
            self.ready = None
            torch.cuda.current_stream(self.k.device).wait_event(event)

    def _split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slots // self.block_size, slots % self.block_size

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, heads, head_dim]`` K and V at ``slots`` (copies)."""
        return self.gather_at(self.locate(slots))

    def gather_at(self, where: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`gather` of slots already :meth:`located <locate>` (a save reads every layer
        at the same slots)."""
        self.wait_ready()
        if self.planes is not None:
            assert len(where) == 1, "slots located for another layout"
            k_rows, v_rows = self.planes
            return k_rows.index_select(0, where[0]), v_rows.index_select(0, where[0])
        blocks, offsets = where
        return self.k[blocks, offsets], self.v[blocks, offsets]

    @property
    def layout_key(self) -> tuple:
        """Views with equal keys address slots alike (:meth:`locate` can be shared)."""
        return (type(self), self.block_size, self.planes is not None)

    def locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Where ``slots`` live, for :meth:`scatter_at`: computed once, reused by every
        layer of the same layout (two kernels and ~30 us of host time saved per layer)."""
        if self.planes is not None:
            return (slots,)
        return self._split(slots)

    def scatter(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``[n, heads, head_dim]`` K and V rows into ``slots``."""
        self.scatter_at(self.locate(slots), k, v)

    def scatter_at(self, where: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`scatter` to slots already located."""
        self.wait_ready()
        if self.planes is not None:
            assert len(where) == 1, "slots located for another layout"
            k_rows, v_rows = self.planes
            k_rows.index_copy_(0, where[0], k.to(k_rows.dtype))
            v_rows.index_copy_(0, where[0], v.to(v_rows.dtype))
            return
        blocks, offsets = where
        self.k[blocks, offsets] = k.to(self.k.dtype)
        self.v[blocks, offsets] = v.to(self.v.dtype)

    def context(self, block_ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's first ``num_tokens`` K and V rows, ``[num_tokens, heads, head_dim]``."""
        self.wait_ready()
        heads, dim = self.k.shape[2], self.k.shape[3]
        k = self.k[block_ids].reshape(-1, heads, dim)[:num_tokens]
        v = self.v[block_ids].reshape(-1, heads, self.v.shape[3])[:num_tokens]
        return k, v


def _slot_rows(plane: torch.Tensor) -> Optional[torch.Tensor]:
    """``[blocks, block_size, heads, dim]`` as ``[blocks * block_size, heads, dim]`` (a view),
    or None where the blocks do not lie back to back."""
    blocks, size, heads, dim = plane.shape
    if blocks > 1 and plane.stride(0) != size * plane.stride(1):
        return None
    return plane.view(blocks * size, heads, dim)


@dataclass
class ProbedPagedKV(PagedKV):
    """A paged cache whose per-block element order is learned, not assumed.

    CPU_ATTN stores K in an ISA-dependent order (e.g. transposed to
    ``[head_dim, block_size]`` per head for the "vec" kernels) and V row-major. Rather
    than hard-coding each variant, :func:`probe_cpu_attn` writes known values through
    the backend's own cache-update op and records where each (token, head, dim) of K
    and V lands. ``k_index``/``v_index`` are ``[block_size, heads, head_dim]`` offsets
    into one block's flat storage ``flat[block]``.
    """

    strided = False
    flat: torch.Tensor = None  # type: ignore[assignment]
    k_index: torch.Tensor = None  # type: ignore[assignment]
    v_index: torch.Tensor = None  # type: ignore[assignment]
    size: int = 0

    @property
    def block_size(self) -> int:
        return self.size

    @property
    def layout_key(self) -> tuple:
        return (type(self), self.size, id(self.k_index), id(self.v_index))

    def locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat element offsets of K and V at ``slots`` into the cache's storage: one 1-D
        index each, so that gathering and writing are one ``index_select``/``index_copy_``
        (indexing by block and in-block offset tensors cost a cold 4K-token save ~4x more
        on the CPU)."""
        base = ((slots // self.size) * self.flat.shape[1])[:, None, None]
        within = slots % self.size
        return (base + self.k_index[within]).reshape(-1), (base + self.v_index[within]).reshape(-1)

    def gather_at(self, where: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        self.wait_ready()
        k_at, v_at = where
        storage = self.flat.view(-1)
        shape = (-1,) + tuple(self.k_index.shape[1:])
        return storage.index_select(0, k_at).view(shape), storage.index_select(0, v_at).view(shape)

    def scatter_at(self, where: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        self.wait_ready()
        k_at, v_at = where
        storage = self.flat.view(-1)
        storage.index_copy_(0, k_at, k.to(storage.dtype).reshape(-1))
        storage.index_copy_(0, v_at, v.to(storage.dtype).reshape(-1))

    def context(self, block_ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.arange(num_tokens, device=block_ids.device)
        slots = block_ids[tokens // self.size] * self.size + tokens % self.size
        return self.gather(slots)


def probe_cpu_attn(kv_cache: torch.Tensor, write: Callable[..., None]) -> ProbedPagedKV:
    """Learn CPU_ATTN's per-block order by writing probes with the backend's own op.

    ``write(key, value, cache, slot_mapping)`` must be the backend's cache update.
    Three probes encode token, head and dim index as small integers (+1, exact in
    bf16/fp16); K is written positive and V negative so the two are told apart.
    """
    num_blocks, heads, block_size, width = kv_cache.shape
    head_dim = width // 2
    scratch = torch.zeros((1, heads, block_size, width), dtype=kv_cache.dtype, device=kv_cache.device)
    grid = torch.meshgrid(torch.arange(block_size), torch.arange(heads), torch.arange(head_dim), indexing="ij")
    slots = torch.arange(block_size, device=kv_cache.device)
    found = []
    for coord in grid:
        scratch.zero_()
        probe = (coord + 1).to(kv_cache.dtype).to(kv_cache.device).contiguous()
        write(probe, -probe, scratch, slots)
        found.append(scratch.reshape(-1).float().cpu().clone())
    flat_t, flat_h, flat_d = found
    k_index = torch.full((block_size, heads, head_dim), -1, dtype=torch.long)
    v_index = torch.full((block_size, heads, head_dim), -1, dtype=torch.long)
    for index, sign in ((k_index, 1), (v_index, -1)):
        where = ((flat_t * sign) > 0).nonzero().flatten()
        t = (flat_t[where] * sign).long() - 1
        h = (flat_h[where] * sign).long() - 1
        d = (flat_d[where] * sign).long() - 1
        index[t, h, d] = where
    if (k_index < 0).any() or (v_index < 0).any():
        raise RuntimeError("ucm: could not learn the CPU_ATTN cache layout (probe incomplete)")
    # Layers of one layout share the same index tensors, so their views share a
    # ``layout_key`` and a save or load locates its slots once, not once per layer.
    learned = (tuple(kv_cache.shape[1:]), str(kv_cache.device), k_index.numpy().tobytes(), v_index.numpy().tobytes())
    shared = _LEARNED_LAYOUTS.get(learned)
    if shared is None:
        shared = _LEARNED_LAYOUTS[learned] = (k_index.to(kv_cache.device), v_index.to(kv_cache.device))
    flat = kv_cache.view(num_blocks, -1)
    return ProbedPagedKV(k=kv_cache, v=kv_cache, flat=flat, k_index=shared[0], v_index=shared[1], size=block_size)


_LEARNED_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
"""Index tensors of each CPU_ATTN layout probed in this process (see probe_cpu_attn)."""


def flash_attn_view(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> PagedKV:
    """FLASH_ATTN (and Triton/FlexAttention), by the backend's logical cache shape:

    * vLLM 0.26: ``[blocks, heads, block_size, 2 * head_dim]``, K in ``[..., :head_dim]``,
      V in ``[..., head_dim:]`` (the backend's own ``kv_cache.transpose(1, 2).split``);
    * vLLM 0.32: ``[2, blocks, block_size, heads, head_dim]`` (or ``[blocks, 2, ...]``).

    The physical stride order (NHD/HND) may be permuted; indexing the logical shape
    handles that, and every view below aliases the engine's storage.
    """
    shape = tuple(kv_cache.shape)
    if kv_cache.dim() == 4:
        if shape[1] != num_kv_heads or shape[3] != 2 * head_dim:
            raise ValueError(f"unexpected FLASH_ATTN cache shape {shape} for {num_kv_heads} kv heads "
                             f"of dim {head_dim} (expected [blocks, heads, block_size, 2 * head_dim])")
        tokens_first = kv_cache.transpose(1, 2)  # [blocks, block_size, heads, 2 * head_dim]
        return PagedKV(k=tokens_first[..., :head_dim], v=tokens_first[..., head_dim:])
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        if kv_cache.dim() == 5 and kv_cache.shape[1] == 2:
            return PagedKV(k=kv_cache[:, 0], v=kv_cache[:, 1])
        raise ValueError(f"unexpected FLASH_ATTN cache shape {shape}")
    if kv_cache.shape[3] != num_kv_heads or kv_cache.shape[4] != head_dim:
        raise ValueError(f"unexpected FLASH_ATTN cache shape {shape} for "
                         f"{num_kv_heads} kv heads of dim {head_dim}")
    return PagedKV(k=kv_cache[0], v=kv_cache[1])


LAYOUTS = {
    "FLASH_ATTN": flash_attn_view,
    "TRITON_ATTN": flash_attn_view,
}


def request_slots(owners: Sequence[Any], rows_per_item: np.ndarray, positions: np.ndarray,
                  block_size: int) -> np.ndarray:
    """Paged-cache slots of ``positions``, whose rows come item by item (``rows_per_item``
    rows each) from the requests in ``owners`` (objects with ``block_ids``; the items of
    one request lie together, so each request's block table is looked up once)."""
    out = np.empty_like(positions)
    row = 0
    for i, j in owner_runs(owners):
        n = int(rows_per_item[i:j].sum())
        table = np.asarray(owners[i].block_ids, dtype=np.int64)
        out[row:row + n] = token_slots(table, positions[row:row + n], block_size)
        row += n
    return out


def owner_runs(owners: Sequence[object]) -> list[tuple[int, int]]:
    """``[i, j)`` ranges of consecutive items with the same owner (by identity)."""
    runs = []
    i = 0
    while i < len(owners):
        j = i + 1
        while j < len(owners) and owners[j] is owners[i]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


_Ints = TypeVar("_Ints", torch.Tensor, np.ndarray)


def token_slots(block_ids: _Ints, tokens: _Ints, block_size: int) -> _Ints:
    """Paged-cache slot of each prompt token index (torch tensors or numpy arrays)."""
    return block_ids[tokens // block_size] * block_size + tokens % block_size


def paged_kv_view(backend_name: str, kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int,
                  write: Optional[Callable[..., None]] = None) -> PagedKV:
    """The view for ``backend_name``; an unknown backend is refused, never guessed.

    ``write`` is the backend's own cache-update op, needed for layouts that are probed.
    """
    if backend_name == "CPU_ATTN":
        if write is None:
            raise RuntimeError("CPU_ATTN layout needs the backend's cache-update op to probe")
        view = probe_cpu_attn(kv_cache, write)
        if view.k_index.shape[1:] != (num_kv_heads, head_dim):
            raise RuntimeError(f"unexpected CPU_ATTN cache shape {tuple(kv_cache.shape)}")
        return view
    try:
        make = LAYOUTS[backend_name]
    except KeyError:
        raise RuntimeError(
            f"ucm does not support the attention backend {backend_name!r}; "
            f"supported: {', '.join(sorted(LAYOUTS) + ['CPU_ATTN'])}"
        ) from None
    return make(kv_cache, num_kv_heads, head_dim)
