"""Triton kernel: exact-by-position attention of selected rows, reading the paged KV cache.

After the check layer Blend computes a few rows of each request, and each attends to
the request's whole context with key ``j`` visible iff ``j <= position(row)``.
:class:`ucm.sparse.blend.attention.ExactMaskAttention` does that on a gathered copy of
the context through FlexAttention: per layer two gathers of the request's K and V,
a padded copy of Q, and ~0.3 ms of host time in torch.compile's call path (guards,
wrappers). This kernel reads K and V where they are, through the request's block
table, and costs one Triton launch per layer.

One launch serves every request of a step. One program handles ``BLOCK_M`` rows of one
request x all query heads of one KV head (GQA: the group's heads share every K/V tile it
loads) and walks that request's keys up to its last row's position in ``BLOCK_N`` steps
with an online softmax (FlashAttention-2). Key tiles wholly visible to every row in the
program skip the mask; the rest apply ``key <= position``. Key ``j`` of request ``r``
lives in block ``tables[r, j // block_size]`` at offset ``j % block_size``.

Programs differ a lot in cost (a program of rows near a prompt's end walks all its keys,
one near its start a few), so :class:`PagedBatch` lists them heaviest first: the GPU
starts blocks in launch order, and the long ones then no longer trail behind a finished
grid. Its program table ``(request, first row, rows)`` is built once per selection on
the host; rows of request ``r`` are the ``r``-th stretch of ``q``.

Rows need not be sorted, but sorted rows (Blend keeps them in prompt order) make each
program's key range tight. Decorated lazily per interpreter mode like :mod:`rope_triton`,
so CPU tests run it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .rope_triton import _next_pow2, interpreting
from .transfer import to_device

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_Q = 128  # query vectors (rows x heads of a group) per program
MAX_PROGRAMS = 65535  # CUDA's limit on a launch grid's second axis, where the programs go


def _paged_attention_kernel(
    q_ptr, pos_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, programs_ptr, out_ptr,
    table_stride, block_size, sm_scale,
    q_sn, q_sh, o_sn, o_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0).to(tl.int64)  # fastest axis: a program's KV heads start together
    program = programs_ptr + tl.program_id(1) * 3
    req = tl.load(program).to(tl.int64)
    first = tl.load(program + 1).to(tl.int64)
    count = tl.load(program + 2)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int64)
    table_ptr = tables_ptr + req * table_stride
    M: tl.constexpr = BLOCK_M * GROUP_P
    i = tl.arange(0, M)
    local = i // GROUP_P
    row = first + local
    g = i % GROUP_P
    ok = (local < count) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, DIM_P)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row[:, None] * q_sn + head[:, None] * q_sh + d[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    pos = tl.load(pos_ptr + row, mask=ok, other=-1).to(tl.int64)  # -1: a padding row sees nothing
    hi = tl.minimum(tl.max(pos, 0) + 1, seq_len)  # keys any row of this program may see
    lo_pos = tl.min(tl.where(ok, pos, seq_len), 0)
    full_end = tl.minimum(((lo_pos + 1) // BLOCK_N) * BLOCK_N, hi)  # tiles every row sees whole

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, DIM_P], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    n = tl.arange(0, BLOCK_N)
    for start in range(0, hi, BLOCK_N):
        key = (start + n).to(tl.int64)
        key_ok = key < hi
        blk = tl.load(table_ptr + key // block_size, mask=key_ok, other=0).to(tl.int64)
        off = key % block_size
        k = tl.load(k_ptr + blk[:, None] * k_sb + off[:, None] * k_st + kv_head * k_sh + d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if start + BLOCK_N > full_end:
            s = tl.where(key[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk[:, None] * v_sb + off[:, None] * v_st + kv_head * v_sh + d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + row[:, None] * o_sn + head[:, None] * o_sh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@functools.lru_cache(maxsize=2)
def _jit(interpret: bool) -> Any:
    del interpret  # cache key only: triton.jit reads TRITON_INTERPRET when it decorates
    return triton.jit(_paged_attention_kernel, do_not_specialize=["table_stride"])


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_attention` takes these tensors (else gather and use another backend)."""
    return (q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape
            and q.dtype in SUPPORTED_DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and q.shape[-1] == k_cache.shape[-1] and q.shape[-1] >= 16 and q.shape[1] % k_cache.shape[2] == 0
            and q.device == k_cache.device and (q.is_cuda or interpreting()))


def _check_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not supports(q, k_cache, v_cache):
        raise ValueError(f"paged_attention cannot take q {tuple(q.shape)} {q.dtype} on {q.device} with caches "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")


def rows_per_program(group: int, block_q: int = BLOCK_Q) -> int:
    """Rows one program computes: ``block_q`` query vectors over the group's heads."""
    return max(1, block_q // _next_pow2(group))


@dataclass(frozen=True)
class PagedBatch:
    """The requests one launch serves, on the device: block tables, key counts and the
    program table (request, first row, rows), heaviest program first."""

    tables: torch.Tensor  # [requests, max blocks] block ids
    seq_lens: torch.Tensor  # [requests] keys of each request
    programs: torch.Tensor  # [programs, 3] int32
    num_rows: int
    block_m: int

    @classmethod
    def build(cls, tables: torch.Tensor, seq_lens: Sequence[int], row_counts: Sequence[int], group: int,
              block_q: int = BLOCK_Q, heaviest_first: bool = True,
              first_rows: Optional[Sequence[int]] = None) -> "PagedBatch":
        """``tables``: ``[requests, max blocks]`` block ids on the device (rows past a
        request's blocks unused); ``row_counts[r]`` rows of request ``r`` follow those of
        ``r - 1`` in ``q``; ``first_rows[r]``: the position its rows start from (the
        tokens computed in earlier steps; default 0), used only to order the programs.
        Host work only, plus two small host->device copies."""
        if len(seq_lens) != len(row_counts) or tables.dim() != 2 or tables.shape[0] != len(seq_lens):
            raise ValueError(f"PagedBatch: {tables.shape[0] if tables.dim() else '?'} block tables, "
                             f"{len(seq_lens)} key counts, {len(row_counts)} row counts")
        block_m = rows_per_program(group, block_q)
        programs = program_table(row_counts, seq_lens, block_m, heaviest_first, first_rows)
        if programs.shape[0] > MAX_PROGRAMS:  # the launch grid's second axis
            raise ValueError(f"PagedBatch: {programs.shape[0]} programs exceed the grid limit {MAX_PROGRAMS}")
        device = tables.device
        return cls(tables, to_device(torch.tensor(list(seq_lens), dtype=torch.int32), device),
                   to_device(torch.from_numpy(programs), device), int(sum(row_counts)), block_m)


def program_table(row_counts: Sequence[int], seq_lens: Sequence[int], block_m: int,
                  heaviest_first: bool = True, first_rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """``[programs, 3]`` int32 rows (request, first row, rows), ordered by the estimated
    keys the program walks, most first (``heaviest_first=False``: in row order, only for
    comparison). The estimate takes a request's rows as spread evenly over its positions
    ``first_rows[r]..seq_len`` (Blend's rows are in prompt order): a program ending at row
    ``e`` of ``n`` walks about ``a + (seq_len - a) * e / n`` keys, ``a = first_rows[r]``."""
    entries: list[tuple[float, int, int, int]] = []
    first = 0
    starts = first_rows if first_rows is not None else [0] * len(seq_lens)
    for req, (count, seq_len, a) in enumerate(zip(row_counts, seq_lens, starts)):
        for start in range(0, count, block_m):
            rows = min(block_m, count - start)
            entries.append((a + (seq_len - a) * (start + rows) / count, req, first + start, rows))
        first += count
    if heaviest_first:
        entries.sort(key=lambda e: -e[0])  # stable: ties keep request order
    return np.array([e[1:] for e in entries], dtype=np.int32).reshape(-1, 3)


SMALL_TILES = (64, 2)
LARGE_TILES = (128, 3)
_LARGE_TILES_FAILED: set = set()  # devices where a launch with LARGE_TILES failed once


def tiles_for(is_cuda: bool, element_size: int, head_dim: int, shared_memory_per_sm: int) -> tuple[int, int]:
    """(keys per tile, pipeline stages): 128 and 3 where they fit -- 16-bit, head_dim <= 128,
    >= 200 KiB of shared memory per SM (Hopper's 228 yes, Ampere's 164 no); 4-11% faster
    than 64 and 2 on an H100 at 4K-16K keys (docs/BENCHMARKS.md, exact-mask attention)."""
    if is_cuda and element_size == 2 and head_dim <= 128 and shared_memory_per_sm >= 200 * 1024:
        return LARGE_TILES
    return SMALL_TILES


@functools.lru_cache(maxsize=8)
def _shared_memory_per_sm(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_multiprocessor


def launch_tiles(q: torch.Tensor) -> tuple[int, int]:
    """:func:`tiles_for` of ``q``'s device (small tiles after a large-tile launch failed there)."""
    if not q.is_cuda or q.device in _LARGE_TILES_FAILED:
        return SMALL_TILES
    return tiles_for(True, q.element_size(), q.shape[-1], _shared_memory_per_sm(q.device.index or 0))


def paged_attention_batch(q: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          batch: PagedBatch, scale: float, out: Optional[torch.Tensor] = None,
                          block_n: Optional[int] = None, num_warps: int = 8,
                          num_stages: Optional[int] = None, checked: bool = False) -> torch.Tensor:
    """Attention of rows ``q [n, Hq, D]`` at ``positions [n]``, the rows of ``batch``'s
    requests one request after another, each over its own keys in the paged
    ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]`` (any strides with a
    contiguous last dim); key ``j`` is visible to a row iff ``j <= position``.
    Returns ``[n, Hq, D]`` in q's dtype. Defaults: the fastest settings tried on an
    H100 (Llama-3-8B layer, bf16, 4K-16K keys, 5-30% rows; docs/BENCHMARKS.md);
    ``block_n``/``num_stages`` None: :func:`launch_tiles`. ``checked``: the caller has
    already asked :func:`supports` (once a layer on the engine's path is enough)."""
    if not checked:
        _check_supported(q, k_cache, v_cache)
    n, heads, dim = q.shape
    if n != batch.num_rows:
        raise ValueError(f"paged_attention: {n} rows of q for a batch of {batch.num_rows}")
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    programs = batch.programs.shape[0]
    if programs == 0:
        return out
    chosen = block_n is None and num_stages is None
    tiles = launch_tiles(q)
    block_n = tiles[0] if block_n is None else block_n
    num_stages = tiles[1] if num_stages is None else num_stages

    def launch(block_n: int, num_stages: int) -> None:
        _jit(interpreting())[(kv_heads, programs)](
            q, positions, k_cache, v_cache, batch.tables, batch.seq_lens, batch.programs, out,
            batch.tables.stride(0), k_cache.shape[1], scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            GROUP=group, GROUP_P=_next_pow2(group), HEAD_DIM=dim, DIM_P=_next_pow2(dim),
            BLOCK_M=batch.block_m, BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )

    try:
        launch(block_n, num_stages)
    except Exception:  # noqa: BLE001 - e.g. Triton's OutOfResources on a GPU the tile rule misjudged
        if not chosen or (block_n, num_stages) == SMALL_TILES:
            raise
        _LARGE_TILES_FAILED.add(q.device)
        logger.warning("ucm paged attention: %d-key tiles in %d stages failed on %s; using %d and %d",
                       block_n, num_stages, q.device, *SMALL_TILES)
        launch(*SMALL_TILES)
    return out


def paged_attention(q: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_len: int, scale: float,
                    out: Optional[torch.Tensor] = None, block_q: int = BLOCK_Q, heaviest_first: bool = True,
                    **launch: int) -> torch.Tensor:
    """:func:`paged_attention_batch` for one request: rows ``q`` over keys
    ``0..seq_len-1`` through ``block_table``. ``block_q``: query vectors (rows x heads
    of a group) per program; 128 on 8 warps was 10-15% faster than 64 on 4 on an H100."""
    _check_supported(q, k_cache, v_cache)
    group = q.shape[1] // k_cache.shape[2]
    batch = PagedBatch.build(block_table.reshape(1, -1), [seq_len], [q.shape[0]], group, block_q, heaviest_first)
    return paged_attention_batch(q, positions, k_cache, v_cache, batch, scale, out, checked=True, **launch)
