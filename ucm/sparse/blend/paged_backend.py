"""Choosing and checking the paged Triton attention kernel (``UCM_BLEND_ATTENTION=auto|triton``).

:mod:`paged_attention` is the kernel; this module decides when to use it and holds it
to the rule every fast backend of :mod:`attention` follows: its first call in a process
is compared with the SDPA reference, and a failure or mismatch gives it up for the
process (logged once), the caller then gathering the context for an
:class:`~ucm.sparse.blend.attention.ExactMaskAttention` plan. Separate from the kernel
module because importing that one needs a working Triton.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ucm.sparse.blend import attention
from ucm.sparse.blend.attention import PAGED


def _paged_module() -> Any:
    """The kernel module, or None without a working Triton (:data:`attention.KERNEL`)."""
    return attention.KERNEL.module()


def paged_kernel_wanted(device: torch.device) -> bool:
    """Whether to try the paged kernel for rows on ``device`` (``auto`` on CUDA, or
    ``triton``; on CPU only under TRITON_INTERPRET, which is how the tests run it)."""
    name = attention.requested_backend()
    if attention.KERNEL.broken or name not in ("auto", PAGED):
        return False
    if device.type == "cuda":
        return True
    mod = _paged_module() if name == PAGED else None
    return mod is not None and mod.interpreting()


def plan_batch(tables: torch.Tensor, seq_lens: list[int], row_counts: list[int], group: int,
               first_rows: Optional[list[int]] = None) -> Any:
    """The paged kernel's launch plan for these requests (a ``PagedBatch``; see
    :mod:`paged_attention`), or None when the kernel module is unavailable."""
    mod = _paged_module()
    return None if mod is None else mod.PagedBatch.build(tables, seq_lens, row_counts, group,
                                                         first_rows=first_rows)


References = Callable[[], list[tuple[slice, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]
"""Per request of a batch: its rows' slice of ``q`` and its gathered context (k, v, k_pos)."""


def run_paged_batch(q: torch.Tensor, q_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: Any, scale: float, references: References) -> Optional[torch.Tensor]:
    """The paged kernel's output for every request of ``batch`` (a
    :class:`~ucm.sparse.blend.paged_attention.PagedBatch`) in one launch, or None when it
    cannot run (the caller then gathers each context and uses
    :class:`ExactMaskAttention`). The first call in a process with one request, and the
    first with several that have rows, are checked request by request against the
    reference on ``references()``; a failure or mismatch gives the kernel up for the
    process (logged once)."""
    mod = _paged_module()
    if mod is None or not mod.supports(q, k_cache, v_cache):
        return None
    try:
        out = mod.paged_attention_batch(q, q_pos, k_cache, v_cache, batch, scale, checked=True)
        # One-request and several-request launches are checked apart: only the latter
        # read other rows of the block tables, key counts and row offsets.
        verdict = PAGED if batch.seq_lens.shape[0] == 1 else f"{PAGED}:batch"
        if verdict not in attention._VERIFIED:
            parts = references()
            for rows, (k, v, k_pos) in parts:
                attention._check_against_reference(PAGED, out[rows], q[rows], q_pos[rows], k.to(q.dtype),
                                                   v.to(q.dtype), k_pos, scale)
            if verdict == PAGED or len(parts) > 1:  # a batch verdict needs two requests with rows
                attention._VERIFIED.add(verdict)
        return out
    except Exception as exc:  # noqa: BLE001 - never silently wrong: fall back, say so once
        attention.KERNEL.give_up(exc)
        return None


def run_paged(q: torch.Tensor, q_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_table: torch.Tensor, seq_len: int, scale: float,
              gathered: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """:func:`run_paged_batch` for one request's rows over keys ``0..seq_len-1`` through
    ``block_table``; ``gathered()`` = (k, v, k_pos) of that context."""
    mod = _paged_module()
    if mod is None or not mod.supports(q, k_cache, v_cache):
        return None
    group = q.shape[1] // k_cache.shape[2]
    batch = mod.PagedBatch.build(block_table.reshape(1, -1), [seq_len], [q.shape[0]], group)
    return run_paged_batch(q, q_pos, k_cache, v_cache, batch, scale, lambda: [(slice(None), gathered())])
