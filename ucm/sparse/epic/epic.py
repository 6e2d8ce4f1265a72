"""EPIC: the registered sparse method and its per-forward step.

Like Blend, EPIC runs in a forward whose reused chunk KV was loaded and re-rotated;
unlike Blend it never computes every row of any layer. :class:`EpicStep` fixes the
rows from layer 0 (:func:`~ucm.sparse.epic.selection.epic_rows`) and offers the same
step interface as :class:`~ucm.sparse.blend.blend.BlendStep`, so the engine
integration drives it with the same machinery: the hidden states shrink to the kept
rows before layer 0, each layer writes their K/V into the paged cache and computes
their exact-mask attention over the whole context (the other rows' K/V are the loaded
ones, in every layer), and the last layer scatters them back to the full batch.

Plain torch, no engine import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ucm.sparse.base import UcmSparseBase
from ucm.sparse.epic.selection import epic_rows
from ucm.sparse.rows import RequestOutcome, RequestRows

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EpicStep:
    """Row selection of one forward pass, made when it begins.

    ``rows`` are the global row indices computed (all rows until the shrink before layer
    0 is taken, then the kept ones); ``row_counts[req]`` of each request, in batch order.
    """

    requests: list[RequestRows]
    num_rows: int
    recompute_tokens: int
    rows: torch.Tensor = field(init=False)
    row_counts: dict[str, int] = field(init=False)
    outcomes: dict[str, RequestOutcome] = field(init=False)
    _pending_local: Optional[torch.Tensor] = field(init=False, default=None)
    _active: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.rows = torch.arange(self.num_rows)
        self.row_counts, self.outcomes = {}, {}
        keep = torch.zeros(self.num_rows, dtype=torch.bool)
        for req in self.requests:
            k = req.recompute_tokens if req.recompute_tokens is not None else self.recompute_tokens
            mine = epic_rows(req.reusable, req.first_position, req.chunk_starts, k)
            if req.always is not None:
                mine |= req.always.to(torch.bool)
            keep[req.row_start:req.row_start + req.num_rows] = mine
            reusable = req.reusable.to(torch.bool)
            self.row_counts[req.req_id] = int(mine.sum())
            self.outcomes[req.req_id] = RequestOutcome(req.num_rows, int(reusable.sum()), int((mine & reusable).sum()))
        self._active = any(outcome.num_reusable for outcome in self.outcomes.values())
        if self._active:
            self._pending_local = torch.nonzero(keep).flatten()  # host tensors: no device wait

    @property
    def active(self) -> bool:
        """Whether any request reuses KV in this forward (else run the plain path)."""
        return self._active

    @property
    def first_check_layer(self) -> int:
        return 0

    def is_check_layer(self, layer: int) -> bool:
        return False  # the rows are fixed before the forward: no layer selects

    def computes_all_rows(self, layer: int) -> bool:
        """No layer computes every row once anything is reused (loaded KV serves the rest)."""
        return not self.active

    def select(self, *args, **kwargs) -> torch.Tensor:
        raise RuntimeError("EPIC selects its rows before the forward; no layer is a check layer")

    @property
    def kept_local(self) -> Optional[torch.Tensor]:
        return self._pending_local

    def take_shrink(self) -> Optional[torch.Tensor]:
        """Indices of the kept rows, once (taken before layer 0), else None."""
        local, self._pending_local = self._pending_local, None
        if local is not None:
            self.rows = local
        return local


class Epic(UcmSparseBase):
    """The registered sparse method "EPIC": holds the config and builds steps."""

    def __init__(self, config, role: str) -> None:
        super().__init__(config, role)
        self.recompute_tokens = config.recompute_tokens
        self.step: Optional[EpicStep] = None

    @property
    def first_reused_layer(self) -> int:
        """Loaded chunk KV stands in every layer, so chunk loads fill all of them."""
        return 0

    def begin_step(self, requests: list[RequestRows], num_rows: int,
                   all_reduce: Optional[AllReduce] = None) -> EpicStep:
        """``all_reduce`` is unused: the rows follow from positions and from the reusable
        rows, which the integration already agreed on across TP ranks."""
        self.step = EpicStep(requests, num_rows, self.recompute_tokens)
        return self.step

    def end_step(self) -> Optional[EpicStep]:
        step, self.step = self.step, None
        return step
