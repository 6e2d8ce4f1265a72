"""Which reused tokens to recompute: HKVD (high KV deviation) selection.

At a check layer Blend has, for every scheduled token, the K/V it just computed
("fresh") and the K/V loaded from the cache (re-rotated to the new position). Tokens
whose cached KV deviates most from the fresh one are the ones whose meaning depends
on the chunks now in front of them; recomputing only those restores most of the
cross-chunk attention (CacheBlend, EuroSys 2025).

Tensor parallel: each rank holds a subset of the KV heads. The deviation here is a
*sum over heads*, so a rank's value is a partial sum; all-reduce (SUM) it across
ranks before selecting, and every rank then holds the full-head deviation and picks
the same rows (ties break by lower row index, so the choice is deterministic).

Pure torch; never imports vLLM.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from ucm.sparse.blend.transfer import to_device

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], torch.Tensor]
_TARGETS = ("k", "v", "kv")
_NORMS = ("l1", "l2")


def _per_token(fresh: torch.Tensor, cached: torch.Tensor, norm: str) -> torch.Tensor:
    """``[tokens, heads, head_dim]`` pair -> ``[tokens]``: per-head norm, summed over heads."""
    if fresh.shape != cached.shape or fresh.dim() != 3:
        raise ValueError(f"fresh and cached must both be [tokens, heads, head_dim]; got "
                         f"{tuple(fresh.shape)} and {tuple(cached.shape)}")
    diff = fresh.to(torch.float32) - cached.to(torch.float32)
    per_head = diff.abs().sum(-1) if norm == "l1" else torch.linalg.vector_norm(diff, dim=-1)
    return per_head.sum(-1)


def token_deviation(
    fresh_k: torch.Tensor,
    cached_k: torch.Tensor,
    fresh_v: Optional[torch.Tensor] = None,
    cached_v: Optional[torch.Tensor] = None,
    target: str = "k",
    norm: str = "l2",
) -> torch.Tensor:
    """Per-token deviation between fresh and cached KV, float32 ``[tokens]``.

    * ``norm="l1"``: sum of absolute differences over head_dim and heads.
    * ``norm="l2"``: Euclidean norm over head_dim *per head*, then summed over heads.
      (Not the norm over all heads at once: a sum over heads is what keeps the
      tensor-parallel partial results summable.)
    * ``target="kv"`` adds the K and V deviations.

    Under tensor parallel the result is a partial sum over this rank's heads; reduce it
    with SUM across ranks (see ``select_recompute(all_reduce=...)``).
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    dev = None
    if target in ("k", "kv"):
        dev = _per_token(fresh_k, cached_k, norm)
    if target in ("v", "kv"):
        if fresh_v is None or cached_v is None:
            raise ValueError(f"target={target!r} needs fresh_v and cached_v")
        dev_v = _per_token(fresh_v, cached_v, norm)
        dev = dev_v if dev is None else dev + dev_v
    return dev


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"recompute ratio must be in [0, 1], got {ratio}")
    return ratio


def budget(ratio: float, num_reusable: int) -> int:
    """``ceil(ratio * n)``, robust to float noise (0.15 * 20 is 3.0000000000000004)."""
    return min(num_reusable, math.ceil(ratio * num_reusable - 1e-9))


def top_rows(deviation: torch.Tensor, candidates: torch.Tensor, k: int,
             num_candidates: Optional[int] = None) -> torch.Tensor:
    """Bool mask of the ``k`` candidate rows with the largest deviation.

    Ties go to the lower row index (stable sort), so identical inputs give identical
    picks on every rank. NaN deviations sort first: a row we cannot judge is recomputed.
    ``num_candidates`` (``candidates.sum()``, if the caller knows it) keeps the whole
    selection free of host synchronisation when the tensors live on a GPU: the result's
    size is fixed by ``k`` and the count, never read back from the device.
    """
    mask = torch.zeros_like(candidates, dtype=torch.bool)
    if num_candidates is None:
        num_candidates = int(candidates.sum())
    k = min(k, num_candidates)
    if k <= 0:
        return mask
    dev = deviation.to(torch.float32).nan_to_num(nan=float("inf"))
    dev = torch.where(candidates, dev, torch.full_like(dev, float("-inf")))  # deviations are >= 0
    order = torch.sort(dev, descending=True, stable=True).indices[:k]
    # Not ``mask[order] = True``: on CUDA that makes the value a CPU scalar which
    # index_put_ then copies from pageable memory, a stream sync in the middle of the
    # forward (the torch.profiler of an 8K request showed one of 18 ms inside index_put_).
    return mask.index_fill_(0, order, True)


def _reduced(deviation: torch.Tensor, reusable: torch.Tensor, all_reduce: Optional[AllReduce]) -> torch.Tensor:
    """``deviation`` checked against ``reusable [tokens]``, in float32, summed over TP ranks."""
    if deviation.dim() != 1 or reusable.shape != deviation.shape:
        raise ValueError(f"deviation and reusable must both be [tokens]; got {tuple(deviation.shape)} "
                         f"and {tuple(reusable.shape)}")
    deviation = deviation.to(torch.float32)
    return all_reduce(deviation) if all_reduce is not None else deviation


def _always(reusable: torch.Tensor, always: Optional[torch.Tensor]) -> torch.Tensor:
    """``always`` as a bool mask like ``reusable`` (none: all False)."""
    if always is None:
        return torch.zeros_like(reusable, dtype=torch.bool)
    if always.shape != reusable.shape:
        raise ValueError(f"always must be [tokens] like reusable; got {tuple(always.shape)}")
    return always.to(torch.bool)


def _prepare(deviation: torch.Tensor, reusable: torch.Tensor, always: Optional[torch.Tensor],
             all_reduce: Optional[AllReduce]) -> tuple[torch.Tensor, torch.Tensor]:
    forced = _always(reusable, always) | ~reusable.to(torch.bool)
    return _reduced(deviation, reusable, all_reduce), forced


def select_recompute(
    deviation: torch.Tensor,
    reusable: torch.Tensor,
    ratio: float,
    always: Optional[torch.Tensor] = None,
    all_reduce: Optional[AllReduce] = None,
) -> torch.Tensor:
    """Bool mask ``[tokens]`` of rows to recompute from this layer on.

    Selected: every non-reusable row (cache misses, suffix), every ``always`` row, plus
    the top ``ceil(ratio * num_reusable)`` other reusable rows by deviation.
    ``ratio=0`` recomputes nothing reusable; ``ratio=1`` recomputes every row.
    ``all_reduce`` (SUM across TP ranks) is applied to the deviation before ranking.
    """
    ratio = _check_ratio(ratio)
    deviation, forced = _prepare(deviation, reusable, always, all_reduce)
    k = budget(ratio, int(reusable.sum()))
    candidates = reusable.to(torch.bool) & ~forced
    return forced | top_rows(deviation, candidates, k)


class GradualFilter:
    """Several check layers with falling ratios (the paper's gradual filtering).

    At the first check the candidates are all reusable rows; at every later check they
    are the reusable rows still selected, so the selected sets nest (later ⊆ earlier).
    Every ratio is relative to the request's *total* number of reusable tokens: ratios
    0.3 then 0.15 keep 30% then 15% of them, not 15% of the 30%. A ratio larger than
    the previous one cannot grow the set (rows already dropped have no fresh state).

    The masks may live on a GPU (they follow the deviation's device); every count is
    kept on the host (``num_selected``), so a step never waits for the device.
    """

    def __init__(self, reusable: torch.Tensor, always: Optional[torch.Tensor] = None,
                 in_budget: Optional[torch.Tensor] = None) -> None:
        """``always``: rows kept at every check on top of the budget (the logits row);
        ``in_budget``: rows kept at every check whose reusable ones count against it (the
        "boundary" selection's chunk heads), so that a check keeps as many reused rows as
        deviation alone would."""
        self.reusable = reusable.to(torch.bool)
        counted = _always(self.reusable, in_budget) & self.reusable
        self.always = _always(self.reusable, always) | counted
        self.num_reusable = int(self.reusable.sum())
        self.num_counted = int((counted & ~_always(self.reusable, always)).sum())
        self.forced = self.always | ~self.reusable
        self.candidates = self.reusable & ~self.always
        self.num_candidates = int(self.candidates.sum())
        self.num_forced = int(self.forced.sum())
        self.num_forced_reusable = int((self.always & self.reusable).sum())
        self.selected = torch.ones_like(self.reusable)  # before any check: every row computed
        self.steps = 0

    @property
    def num_selected(self) -> int:
        """Rows selected now (host count)."""
        return self.num_forced + self.num_candidates if self.steps else int(self.reusable.numel())

    @property
    def num_selected_reusable(self) -> int:
        """Reusable rows selected now, i.e. reused KV recomputed (host count)."""
        return self.num_forced_reusable + self.num_candidates if self.steps else self.num_reusable

    def step(self, deviation: torch.Tensor, ratio: float, all_reduce: Optional[AllReduce] = None) -> torch.Tensor:
        """Select at one check layer. ``deviation`` is ``[tokens]``; rows outside the
        current selection are ignored (callers may leave them zero). Returns the new mask."""
        ratio = _check_ratio(ratio)
        deviation = _reduced(deviation, self.reusable, all_reduce)
        if self.forced.device != deviation.device:
            self.forced = to_device(self.forced, deviation.device)
            self.candidates = to_device(self.candidates, deviation.device)
        k = max(0, budget(ratio, self.num_reusable) - self.num_counted)
        if k > self.num_candidates:
            logger.debug("check %d: ratio %.3f exceeds the %d rows still selected; keeping them all",
                         self.steps, ratio, self.num_candidates)
        picked = top_rows(deviation, self.candidates, k, self.num_candidates)
        self.candidates = picked
        self.num_candidates = min(k, self.num_candidates)
        self.selected = self.forced | picked
        self.steps += 1
        return self.selected


def agree_reusable(marks: list[torch.Tensor], all_reduce: AllReduce) -> list[torch.Tensor]:
    """Rows reusable on every tensor-parallel rank: ``marks`` (bool CPU masks, one per
    request) AND-ed across ranks with a SUM all-reduce of a CPU tensor.

    Why: each rank loads its own shard of every chunk block, so a block that fails on one
    rank only leaves that rank's rows unreusable; ranks that disagreed would select and
    shrink different rows and their matmuls and all-reduces would no longer line up. One
    host all-reduce per Blend step (a CPU group: the host never waits for the GPU here).
    """
    if not marks:
        return marks
    sizes = [int(m.shape[0]) for m in marks]
    flat = torch.cat([torch.cat(marks).to(torch.float32), torch.ones(1)])  # last: counts the ranks
    total = all_reduce(flat)  # float32 sums of 0/1 are exact
    agreed = total[:-1] == total[-1]
    return list(agreed.split(sizes))


def query_attention(query: torch.Tensor, key: torch.Tensor, num_queries: int, scale: float) -> torch.Tensor:
    """Attention the question pays each row, float32 ``[rows]``: query-aware selection.

    ``query`` ``[rows, heads, head_dim]`` and ``key`` ``[rows, kv_heads, head_dim]`` are one
    request's current rows in prompt order; its last ``num_queries`` rows are the question
    (the suffix after the last chunk). Each question row's softmax over the rows it may see
    (causal: rows up to itself) is summed over question rows and heads. Rows the question
    attends to are the ones whose KV must be right for the answer (ProphetKV, arXiv
    2602.02579; A3, arXiv 2511.17560), which deviation alone does not see.

    The softmax runs over these rows only: context computed before this step (a prefix
    hit) is left out of each question row's normaliser. Under tensor parallel the result
    is a partial sum over this rank's heads; reduce it with SUM, as the deviation.
    """
    rows = int(key.shape[0])
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != rows or query.shape[1] % key.shape[1]:
        raise ValueError(f"query [rows, heads, dim] and key [rows, kv_heads, dim] do not match: "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    num_queries = min(max(int(num_queries), 0), rows)
    if num_queries == 0:
        return torch.zeros(rows, dtype=torch.float32, device=key.device)
    q = query[rows - num_queries:].to(torch.float32)  # [S, H, D]
    k = key.to(torch.float32).repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # [rows, H, D]
    logits = torch.einsum("shd,nhd->hsn", q, k) * scale
    seen_to = torch.arange(rows - num_queries, rows, device=key.device)  # last key index each question row sees
    hidden = torch.arange(rows, device=key.device)[None, :] > seen_to[:, None]
    logits = logits.masked_fill(hidden[None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1))


def descending_ranks(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each row's rank by ``score``, 0 for the highest, float32; candidates rank before
    every other row, ties by lower row index, NaN first (as in :func:`top_rows`)."""
    s = score.to(torch.float32).nan_to_num(nan=float("inf"))
    s = torch.where(candidates.to(torch.bool), s, torch.full_like(s, float("-inf")))
    order = torch.sort(s, descending=True, stable=True).indices
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(s.shape[0], device=s.device, dtype=torch.float32)
    return ranks


def mixed_score(deviation: torch.Tensor, attention: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Deviation and question attention combined by their ranks among the candidates:
    higher is better, so :func:`top_rows` keeps the rows best on both on average.

    Ranks, not raw values: deviation is in units of KV norm and attention in probability
    mass, so a sum of raw values lets whichever is larger on this model decide alone.
    Both rankings weigh the same; normalising each rank by the candidate count would not
    change the order (the count is the same for both), so the sum of ranks is used as is.
    """
    return -(descending_ranks(deviation, candidates) + descending_ranks(attention, candidates))
