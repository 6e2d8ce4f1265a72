"""The rows a Blend step's layers compute, planned once per selection.

After a check layer every later layer computes the same rows; their device indices, cache
slots, positions and the paged kernel's launch plan are built once (:class:`RowPlan`), so
no layer needs host bookkeeping or host-to-device copies. Per request, a
:class:`RequestAttention` keeps what its exact-mask attention needs across layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ucm.engine.kv_layout import PagedKV
from ucm.sparse.blend import attention
from ucm.sparse.blend.transfer import to_device


@dataclass
class ReqContext:
    row_start: int
    num_rows: int
    block_ids: torch.Tensor  # host; the gathered path moves it to the device on first use
    seq_len: int
    _block_ids_dev: Optional[torch.Tensor] = None

    def device_block_ids(self, device: torch.device) -> torch.Tensor:
        if self._block_ids_dev is None:
            self._block_ids_dev = to_device(self.block_ids, device)
        return self._block_ids_dev


@dataclass
class RequestAttention:
    """Exact-mask attention of one request's selected rows, for every layer of a selection."""

    ctx: ReqContext
    q_pos: torch.Tensor  # device: positions of the rows
    heads: tuple[int, int]
    # Attention over a gathered context, prepared on first use: the paged kernel needs
    # no preparation; this is its fallback and the CPU path.
    _plan: Optional[attention.ExactMaskAttention] = None

    def gathered_plan(self) -> attention.ExactMaskAttention:
        if self._plan is None:
            k_pos = torch.arange(self.ctx.seq_len, device=self.q_pos.device)
            self._plan = attention.ExactMaskAttention.prepare(
                self.q_pos, k_pos, self.heads[0], self.heads[1], self.q_pos.device,
                max_position=self.ctx.seq_len - 1)
        return self._plan

    def __call__(self, q: torch.Tensor, view: PagedKV, scale: float) -> torch.Tensor:
        """Attention of the rows ``q`` over the request's context in ``view``, gathered
        (the path where the paged kernel does not apply)."""
        k_ctx, v_ctx, _ = self.gathered(view)
        return self.gathered_plan()(q, k_ctx.to(q.dtype), v_ctx.to(q.dtype), scale)

    def gathered(self, view: PagedKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_ctx, v_ctx = view.context(self.ctx.device_block_ids(view.k.device), self.ctx.seq_len)
        return k_ctx, v_ctx, torch.arange(self.ctx.seq_len, device=k_ctx.device)


@dataclass
class RowPart:
    """One request's share of the rows computed in a layer."""

    local: torch.Tensor  # device: indices into the current rows
    span: slice  # its stretch of the plan's rows
    attend: RequestAttention


@dataclass
class RowPlan:
    """Device indices of the rows a layer computes, built once per selection.

    Building them needs host-side bookkeeping and host->device copies; doing that in
    every layer would make the host wait for the GPU once per layer. After a check
    layer the same plan serves every later layer until the next check layer.
    """

    kept: torch.Tensor  # device: indices into the current rows that are computed
    slots: torch.Tensor  # device: their paged-cache slots
    q_pos: torch.Tensor  # device: their positions
    parts: list[RowPart]
    every_row: bool  # kept is all current rows in order: indexing by it would only copy
    located: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # slots per layout
    paged: Any = None  # the paged kernel's launch plan (a PagedBatch), None where it does not apply
