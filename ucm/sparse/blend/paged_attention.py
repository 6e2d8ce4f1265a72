"""Triton kernel: exact-by-position attention of selected rows, reading the paged KV cache.

After the check layer Blend computes a few rows of each request, and each attends to
the request's whole context with key ``j`` visible iff ``j <= position(row)``.
:class:`ucm.sparse.blend.attention.ExactMaskAttention` does that on a gathered copy of
the context through FlexAttention: per layer two gathers of the request's K and V,
a padded copy of Q, and ~0.3 ms of host time in torch.compile's call path (guards,
wrappers). This kernel reads K and V where they are, through the request's block
table, and costs one Triton launch per layer.

One program handles ``BLOCK_M`` rows x all query heads of one KV head (GQA: the group's
heads share every K/V tile it loads) and walks the keys up to its last row's position
in ``BLOCK_N`` steps with an online softmax (FlashAttention-2). Key tiles wholly
visible to every row in the program skip the mask; the rest apply ``key <= position``.
Keys are the request's tokens ``0..seq_len-1``; key ``j`` lives in block
``block_table[j // block_size]`` at offset ``j % block_size``.

Rows need not be sorted, but sorted rows (Blend keeps them in prompt order) make each
program's key range tight. Decorated lazily per interpreter mode like :mod:`rope_triton`,
so CPU tests run it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .rope_triton import _next_pow2, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _paged_attention_kernel(
    q_ptr, pos_ptr, k_ptr, v_ptr, table_ptr, out_ptr,
    n_rows, seq_len, block_size, sm_scale,
    q_sn, q_sh, o_sn, o_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    M: tl.constexpr = BLOCK_M * GROUP_P
    i = tl.arange(0, M)
    row = (pid * BLOCK_M + i // GROUP_P).to(tl.int64)
    g = i % GROUP_P
    ok = (row < n_rows) & (g < GROUP)
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
    return triton.jit(_paged_attention_kernel, do_not_specialize=["n_rows", "seq_len"])


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_attention` takes these tensors (else gather and use another backend)."""
    return (q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape
            and q.dtype in SUPPORTED_DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and q.shape[-1] == k_cache.shape[-1] and q.shape[-1] >= 16 and q.shape[1] % k_cache.shape[2] == 0
            and q.device == k_cache.device and (q.is_cuda or interpreting()))


def paged_attention(q: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_len: int, scale: float,
                    out: Optional[torch.Tensor] = None, block_q: int = 128, block_n: int = 64,
                    num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """Attention of rows ``q [n, Hq, D]`` at ``positions [n]`` over one request's keys
    ``0..seq_len-1`` in the paged ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]``
    (any strides with a contiguous last dim) through ``block_table``; key ``j`` is
    visible to a row iff ``j <= position``. Returns ``[n, Hq, D]`` in q's dtype.
    ``block_q``: query vectors (rows x heads of a group) per program. Defaults: the
    fastest of the settings tried on an H100 (Llama-3-8B layer, bf16, 4K-16K keys,
    5-30% rows; docs/BENCHMARKS.md), 10-15% faster than 64 vectors on 4 warps."""
    if not supports(q, k_cache, v_cache):
        raise ValueError(f"paged_attention cannot take q {tuple(q.shape)} {q.dtype} on {q.device} with caches "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if n == 0:
        return out
    block_m = max(1, block_q // _next_pow2(group))  # rows per program
    grid = (triton.cdiv(n, block_m), kv_heads)
    _jit(interpreting())[grid](
        q, positions, k_cache, v_cache, block_table, out,
        n, seq_len, k_cache.shape[1], scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, GROUP_P=_next_pow2(group), HEAD_DIM=dim, DIM_P=_next_pow2(dim),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
