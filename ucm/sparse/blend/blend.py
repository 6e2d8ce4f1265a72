"""Blend: the engine-agnostic per-forward state machine.

One :class:`BlendStep` lives for one forward pass of a batch. The engine
integration tells it where each request's rows are and which rows hold reused
(cached, re-rotated) KV; Blend then decides, layer by layer, which rows are still
computed:

* before the first check layer every row is computed (a full prefill of those
  layers, which is what makes the deviation check meaningful);
* at a check layer the integration hands over fresh and cached K/V of the rows
  still computed; Blend keeps the top ``ratio`` of each request's reused rows by
  deviation, plus every row that must be recomputed (cache misses, suffix,
  separators, each request's last row that produces logits);
* from then on only the kept rows are computed; every other row keeps its
  cached KV.

Plain torch, no engine import: the reference forward in :mod:`reference` and the
vLLM integration drive the same object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ucm.sparse.base import UcmSparseBase
from ucm.sparse.blend.selection import GradualFilter, budget, mixed_score, query_attention, token_deviation
from ucm.sparse.blend.transfer import to_device
from ucm.sparse.rows import RequestOutcome, RequestRows, chunk_head_rows  # noqa: F401  (RequestRows: re-exported)

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BlendStep:
    """Row selection state of one forward pass.

    ``rows`` is always the sorted global row indices currently computed (on the
    device of the K/V given to :meth:`select`); after a check layer,
    :meth:`take_shrink` gives the local indices (into the previous ``rows``) that the
    next layer keeps. Requests' rows stay in batch order, ``row_counts[req]`` of each.
    """

    requests: list[RequestRows]
    num_rows: int
    check_ratios: dict[int, float]
    target: str = "k"
    norm: str = "l2"
    all_reduce: Optional[AllReduce] = None
    selection: str = "deviation"  # the configured ranking; a request's own (RequestRows.selection) wins
    boundary_tokens: int = 16  # "boundary" ranking: first tokens of each reused chunk kept within the budget
    rows: torch.Tensor = field(init=False)
    row_counts: dict[str, int] = field(init=False)  # rows each request computes now (host)
    outcomes: dict[str, RequestOutcome] = field(init=False)
    _filters: dict[str, GradualFilter] = field(init=False)
    _pending_local: Optional[torch.Tensor] = field(init=False, default=None)
    _active: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.rows = torch.arange(self.num_rows)
        self._filters = {}
        self.outcomes = {}
        self.row_counts = {req.req_id: req.num_rows for req in self.requests}
        for req in self.requests:
            always = req.always if req.always is not None else torch.zeros(req.num_rows, dtype=torch.bool)
            if req.num_rows:
                always = always.clone()
                always[-1] = True  # the last row produces the request's logits
            self._filters[req.req_id] = GradualFilter(req.reusable, always, self._chunk_heads(req))
            self.outcomes[req.req_id] = RequestOutcome(req.num_rows, req.num_reusable, req.num_reusable)
        # Asked in every layer: counted once here (a CPU sum over each request's rows).
        self._active = any(outcome.num_reusable for outcome in self.outcomes.values())

    def _chunk_heads(self, req: RequestRows) -> Optional[torch.Tensor]:
        """A "boundary" request's rows kept at every check within its budget: the first
        ``boundary_tokens`` reused rows of each of its chunks, fewer where the final
        check's budget split over the chunks is smaller (equal budgets keep the method
        comparable with deviation alone, and gradual filtering never drops them)."""
        if (req.selection or self.selection) != "boundary" or not req.chunk_starts or not self.boundary_tokens:
            return None
        final = budget(self.ratio_at(max(self.check_ratios), req.ratio), req.num_reusable)
        k = min(self.boundary_tokens, final // len(req.chunk_starts))
        return chunk_head_rows(req.num_rows, req.first_position, req.chunk_starts, k) & req.reusable.to(torch.bool)

    @property
    def active(self) -> bool:
        """Whether any request reuses KV in this forward (else run the plain path)."""
        return self._active

    @property
    def first_check_layer(self) -> int:
        return min(self.check_ratios)

    def is_check_layer(self, layer: int) -> bool:
        return layer in self.check_ratios

    def computes_all_rows(self, layer: int) -> bool:
        """Layers before the first check layer compute every row with the engine's own path."""
        return not self.active or layer < self.first_check_layer

    def select(self, layer: int, fresh_k: torch.Tensor, cached_k: torch.Tensor,
               fresh_v: Optional[torch.Tensor] = None, cached_v: Optional[torch.Tensor] = None,
               query: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
        """Choose the rows to keep at check layer ``layer``.

        Inputs are ``[len(rows), heads, head_dim]`` for the rows currently computed
        (``query``: their fresh queries, with the attention ``scale``; needed by requests
        ranked by "query" or "mixed"). Returns a bool mask over the current rows; the kept
        rows become ``rows`` once :meth:`take_shrink` is called.

        Nothing here reads a value back from the inputs' device: how many rows each
        request keeps follows from its ratio and masks alone (:attr:`row_counts`), and
        which rows they are stays on the device. On a GPU the host therefore goes on
        queueing the next layers while this layer still runs.
        """
        deviation = token_deviation(fresh_k, cached_k, fresh_v, cached_v, self.target, self.norm)
        ranking = {req.req_id: self._ranking(req, query) for req in self.requests}
        attention = self._question_attention(ranking, fresh_k, query, scale)
        if self.all_reduce is not None:
            # One collective for the whole batch: every TP rank then ranks identical numbers.
            if attention is None:
                deviation = self.all_reduce(deviation)
            else:
                deviation, attention = self.all_reduce(torch.stack([deviation.to(torch.float32), attention]))
        device = deviation.device
        rows = self.rows = to_device(self.rows, device)
        full = torch.zeros(self.num_rows, dtype=torch.float32, device=device)
        full[rows] = deviation.to(torch.float32)
        full_att = None
        if attention is not None:
            full_att = torch.zeros(self.num_rows, dtype=torch.float32, device=device)
            full_att[rows] = attention
        # Forced rows are kept at every check and picks nest, so the kept rows are always
        # a subset of the current ones.
        keep_global = torch.zeros(self.num_rows, dtype=torch.bool, device=device)
        total = 0
        for req in self.requests:
            span = slice(req.row_start, req.row_start + req.num_rows)
            flt = self._filters[req.req_id]
            score = full[span]
            if ranking[req.req_id] == "query":
                score = full_att[span]
            elif ranking[req.req_id] == "mixed":
                score = mixed_score(full[span], full_att[span], to_device(flt.candidates, device))
            keep_global[span] = flt.step(score, self.ratio_at(layer, req.ratio))
            self.outcomes[req.req_id].num_recomputed_reusable = flt.num_selected_reusable
            self.row_counts[req.req_id] = flt.num_selected
            total += flt.num_selected
        keep_local = keep_global[rows]
        # Indices of the kept rows in ascending order, with their count known up front
        # (nonzero() would wait for the device to learn its output size).
        local = torch.argsort((~keep_local).to(torch.uint8), stable=True)[:total]
        self._pending_local = local
        self._next_rows = rows[local]
        return keep_local

    def _ranking(self, req: RequestRows, query: Optional[torch.Tensor]) -> str:
        """How ``req``'s rows are ranked at this check: its own choice, else the config's.
        Query-aware ranking needs the question's rows in this step (a chunked prefill's
        earlier steps have none) and its queries; without them it ranks by deviation."""
        ranking = req.selection or self.selection
        if ranking in ("query", "mixed") and (query is None or req.suffix_rows == 0):
            return "deviation"
        return ranking

    def _question_attention(self, ranking: dict[str, str], key: torch.Tensor, query: Optional[torch.Tensor],
                            scale: Optional[float]) -> Optional[torch.Tensor]:
        """Per current row, the attention its request's question pays it (zeros for requests
        ranked by deviation alone); None when no request is ranked by the question."""
        if query is None or all(r not in ("query", "mixed") for r in ranking.values()):
            return None
        if scale is None:
            raise ValueError("query-aware selection needs the attention scale")
        q = query.view(query.shape[0], -1, key.shape[-1])
        out = torch.zeros(key.shape[0], dtype=torch.float32, device=key.device)
        start = 0
        for req in self.requests:  # each request's current rows: one stretch, in batch order
            count = self.row_counts[req.req_id]
            mine = slice(start, start + count)
            start += count
            if ranking[req.req_id] in ("query", "mixed") and count:
                out[mine] = query_attention(q[mine], key[mine], min(req.suffix_rows, count), scale)
        return out

    @property
    def kept_local(self) -> Optional[torch.Tensor]:
        """After :meth:`select`, before :meth:`take_shrink`: indices of the kept rows
        among the current ones, ascending."""
        return self._pending_local

    def ratio_at(self, layer: int, request_ratio: Optional[float]) -> float:
        """The ratio a request gets at check layer ``layer``.

        Without a per-request ratio: the configured one. With one, it is the ratio after
        the *last* check layer, and earlier check layers keep the schedule's proportions
        (``{1: 0.3, 4: 0.15}`` asked at 0.05 runs ``{1: 0.1, 4: 0.05}``, capped at 1), so
        a request can pick its quality/speed point without losing gradual filtering. A
        schedule ending at 0 cannot be scaled: then every check layer uses the request's.
        """
        if request_ratio is None:
            return self.check_ratios[layer]
        last_layer = max(self.check_ratios)
        last = self.check_ratios[last_layer]
        if layer == last_layer or last <= 0.0:
            return request_ratio
        return min(1.0, self.check_ratios[layer] * request_ratio / last)

    def take_shrink(self) -> Optional[torch.Tensor]:
        """Local indices the next layer keeps, once, after a check layer (else None)."""
        local = self._pending_local
        if local is None:
            return None
        self._pending_local = None
        self.rows = self._next_rows
        return local


class Blend(UcmSparseBase):
    """The registered sparse method "Blend": holds the config and builds steps."""

    def __init__(self, config, role: str) -> None:
        super().__init__(config, role)
        self.check_ratios = {c.layer_index: c.ratio for c in config.check_layers}
        self.target = config.deviation_target
        self.norm = config.deviation_norm
        self.selection = getattr(config, "selection", "deviation")
        self.boundary_tokens = getattr(config, "boundary_tokens", 16)
        self.step: Optional[BlendStep] = None

    @property
    def first_reused_layer(self) -> int:
        """Layers before the first check layer compute every row; loaded chunk KV is used from it on."""
        return min(self.check_ratios)

    def begin_step(self, requests: list[RequestRows], num_rows: int,
                   all_reduce: Optional[AllReduce] = None) -> BlendStep:
        self.step = BlendStep(requests, num_rows, self.check_ratios, self.target, self.norm, all_reduce,
                              self.selection, self.boundary_tokens)
        return self.step

    def end_step(self) -> Optional[BlendStep]:
        step, self.step = self.step, None
        return step
