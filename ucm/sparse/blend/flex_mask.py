"""FlexAttention pieces of Blend's exact-mask attention: a block mask from positions.

The exact rule (key j visible to query i iff ``k_pos[j] <= q_pos[i]``) as a
FlexAttention ``BlockMask``, built from per-block position ranges instead of a dense
``[nq, nk]`` evaluation, and the compiled flex call. :mod:`attention` owns backend
choice, fallback and verification; this module only knows how to express the mask.

Pure torch; never imports vLLM. FlexAttention itself is imported lazily, so importing
this module works on a torch without it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

FLEX_BLOCK = 128
"""FlexAttention's sparse block size; query rows are padded to a multiple of it so the
compiled kernel sees few distinct shapes."""

_POS_SENTINEL = torch.iinfo(torch.int32).max
"""Position given to key padding: visible to no query (positions must stay below it)."""

_COMPILED_FLEX: dict[bool, Callable[..., torch.Tensor]] = {}


def _flex_module() -> Any:
    """Import FlexAttention lazily: module import must work on torch without it."""
    from torch.nn.attention import flex_attention as fa  # torch >= 2.5

    return fa


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 position tables padded to whole blocks, read by the mask function.

    Padded query rows copy the largest real position of the last query block, so the
    block's position range -- and with it the block sparsity -- does not change; their
    outputs are dropped. Padded keys get a sentinel no query can see, so the mask
    function never reads out of bounds and never admits a padding key.
    """
    nq, nk = q_pos.numel(), k_pos.numel()
    q_pad = torch.zeros(_round_up(max(nq, 1), block), dtype=torch.int32, device=q_pos.device)
    q_pad[:nq] = q_pos
    if q_pad.numel() > nq > 0:
        q_pad[nq:] = q_pos[(nq - 1) // block * block:].max()
    k_pad = torch.full((_round_up(max(nk, 1), block),), _POS_SENTINEL, dtype=torch.int32,
                       device=k_pos.device)
    k_pad[:nk] = k_pos
    return q_pad, k_pad


def block_classes(q_pad: torch.Tensor, k_pad: torch.Tensor, block: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full, partial)`` bool ``[q_blocks, kv_blocks]`` from per-block position ranges.

    A block pair is *full* when its latest key is at or before its earliest query (every
    pair visible, the kernel skips the mask), *empty* when its earliest key is after
    its latest query (skipped), *partial* otherwise (the mask function decides per
    element). Valid for any order of positions; tight when both are sorted, which is
    the usual case (``k_pos = arange``, selected rows in prompt order).
    """
    qb, kb = q_pad.view(-1, block), k_pad.view(-1, block)
    q_min, q_max = qb.amin(1), qb.amax(1)
    k_min, k_max = kb.amin(1), kb.amax(1)
    full = k_max[None, :] <= q_min[:, None]
    partial = (k_min[None, :] <= q_max[:, None]) & ~full
    return full, partial


def _to_ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's ``(num_blocks [1,1,Q], indices [1,1,Q,K])``: listed blocks first."""
    num = blocks.sum(1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=1, descending=True, stable=True)
    return num[None, None].contiguous(), idx.to(torch.int32)[None, None].contiguous()


def _make_mask_mod(q_pad: torch.Tensor, k_pad: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``mask_mod(b, h, q_idx, kv_idx)``: the exact rule on the padded position tables.

    A fresh closure per plan; torch.compile treats the captured tensors as inputs, so a
    new plan of the same shapes does not recompile.
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return k_pad[kv_idx] <= q_pad[q_idx]

    return mask_mod


def build_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block: int = FLEX_BLOCK) -> Any:
    """FlexAttention ``BlockMask`` for ``[round_up(nq), nk]`` built without a dense mask.

    ``create_block_mask`` would evaluate the mask over all nq x nk pairs; the position
    ranges per block give the same classification (exactly, for sorted positions) in
    O(blocks) work.
    """
    fa = _flex_module()
    q_pad, k_pad = _pad_positions(q_pos, k_pos, block)
    full, partial = block_classes(q_pad, k_pad, block)
    kv_num, kv_idx = _to_ordered(partial)
    full_num, full_idx = _to_ordered(full)
    return fa.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
        mask_mod=_make_mask_mod(q_pad, k_pad), seq_lengths=(q_pad.numel(), k_pos.numel()))


def _flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float,
               enable_gqa: bool) -> torch.Tensor:
    """The call that gets compiled. Our own frame on purpose: dynamo keeps compiled
    entries per code object with a small recompile limit, so compiling flex_attention
    itself would share that budget with every other user of it in the process (a vLLM
    flex backend, say) and could fail with "recompile limit" under fullgraph."""
    return torch.nn.attention.flex_attention.flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _flex_fn(compiled: bool) -> Callable[..., torch.Tensor]:
    """``_flex_call``, compiled once per process with dynamic shapes: every request has
    its own nq and context length, and a per-shape compile would cost seconds each."""
    _flex_module()  # imports the submodule _flex_call reads
    if not compiled:
        return _flex_call
    fn = _COMPILED_FLEX.get(True)
    if fn is None:
        fn = _COMPILED_FLEX[True] = torch.compile(_flex_call, fullgraph=True, dynamic=True)
    return fn
