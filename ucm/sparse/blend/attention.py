"""Attention for an arbitrary subset of query rows with an exact causal mask by position.

After Blend's check layer only the selected rows are computed, but they attend over the
whole context (selected rows' fresh KV, everyone else's cached KV). Which keys a query
may see must follow *true positions*: key j is visible to query i iff
``k_pos[j] <= q_pos[i]``. The usual bottom-right-aligned causal mask of a paged
backend (treating the nq queries as the last nq tokens) would let a selected token in
the middle of the prompt see keys after it, which changes its output.

Layout-free on purpose: callers gather a request's K/V (from a paged cache or
wherever) into ``[tokens, kv_heads, head_dim]`` tensors first.

Pure torch; never imports vLLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool ``[nq, nk]``: True where query i may attend to key j (``k_pos[j] <= q_pos[i]``)."""
    return k_pos[None, :] <= q_pos[:, None]


def causal_attention_by_position(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of ``q [nq, Hq, D]`` over ``k, v [nk, Hkv, D]``; returns ``[nq, Hq, D]``.

    GQA: ``Hq`` must be a multiple of ``Hkv``; query head h reads KV head
    ``h // (Hq // Hkv)`` (the grouping of HF ``repeat_kv`` and vLLM). Rows and keys
    may come in any order; only the positions decide visibility.

    Every query must see at least one key (normally its own, so ``k_pos`` should
    contain each ``q_pos``); a query with no visible key would produce NaN.

    The computation stays in the input dtype; torch's SDPA kernels accumulate the
    softmax in float32 for bf16/fp16, which is what the serving backends do too.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [nq, Hq, D], k and v [nk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    if hq % hkv or k.shape[-1] != d:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv} with equal head_dim")
    if q_pos.shape != (nq,) or k_pos.shape != (nk,):
        raise ValueError(f"q_pos must be [{nq}] and k_pos [{nk}]; got {tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
    mask = position_mask(q_pos.to(k_pos.device), k_pos)
    if hq != hkv:
        # Expand the KV heads instead of enable_gqa: with a boolean mask, torch's GQA path
        # falls back to the "math" kernel on CUDA, which materializes fp32 scores
        # (8 GiB for 1.3K x 8K x 32 heads) and ran out of memory at 8K tokens.
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, nq, D]
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
    )
    return out[0].transpose(0, 1)
