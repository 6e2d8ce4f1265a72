"""Blend only where it pays: a per-request decision from what this process measured.

Blending a request costs a fixed amount on top of its compute (planning, loads, the
check layer's selection, the per-layer work of the exact-mask path, and on a GPU a
step without CUDA graphs), and saves the compute of the rows it does not recompute.
With a small model or a short prompt the fixed part wins, and a blended request is
slower than a plain prefill. So the scheduler asks this policy, once per request,
before it plans any chunk load; a request that does not pay runs as a plain prefill.
Its chunks are still saved, unless reusing them could not pay even in the best case
(:meth:`BlendPayPolicy.worth_saving`): then the save would only slow the request.

The model, fitted online from the worker's step timings (:class:`StepSample`):

* plain prefill: ``seconds = a + b * rows + c * rows**2`` (:class:`_PlainCurve`): the
  step's own cost, the per-row work and attention's growth, fitted on steps of at least
  ``min_rows`` rows (decode steps are per-step overhead only);
* a Blend step: ``seconds = fixed + per_token(rows) * equivalent_rows`` with
  ``equivalent_rows = rows * pre + kept * (1 - pre)``: every row runs the layers up to
  and including the first check layer (share ``pre`` of the layers), the kept rows run
  the rest (that share of a plain step of its size); ``fixed`` is what is left over,
  the median over the recent Blend steps, refitted whenever the plain curve moves (a request the policy ran plain is itself a
  plain sample at its size, so a wrong "does not pay" corrects itself);
* chunk tokens read from a store before the forward cost ``load seconds per token``
  (the store's read in the step's load phase: large for the file tier, small for host
  memory, whose copies to the device overlap the first layers).

Until both a plain rate and ``explore`` Blend steps are known the policy blends (it must
measure Blend to judge it); the fixed cost is the median of the recent Blend steps', so
one slow first step does not condemn Blend; after a long run of "does not pay" one
near-paying request is blended again to re-measure (``remeasure_every``), and after a long
run of "pays" one near-tie request runs plain ("re-measuring plain"). A "pays" at a size
with fewer than ``explore`` plain steps runs plain first ("measuring plain", at most
``explore`` runs a half-octave of rows): the plain price there rests on one slow step or
on an extrapolation from other sizes, which was off by 2-3x on an H100.
Pure Python, no vLLM, no tensors.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np


MIN_PLAIN_ROWS = 128  # a plain step this short (a decode step) is mostly its own overhead: not a rate


@dataclass(frozen=True)
class StepSample:
    """One measured forward of the worker: its rows, what Blend kept, and its time."""

    rows: int
    seconds: float
    blend: bool = False
    kept: int = 0  # rows computed after the last check layer (Blend steps)
    load_tokens: int = 0  # chunk tokens read from the store before the forward
    load_seconds: float = 0.0


@dataclass(frozen=True)
class PayDecision:
    blend: bool
    reason: str  # "pays", "does not pay", "cannot pay", "measuring", "always", ...
    plain_ms: Optional[float] = None
    blend_ms: Optional[float] = None

    def to_stats(self) -> dict:
        out: dict = {"blend_decision": "blend" if self.blend else "plain", "blend_reason": self.reason}
        if self.plain_ms is not None and self.blend_ms is not None:
            out.update(est_plain_ms=round(self.plain_ms, 3), est_blend_ms=round(self.blend_ms, 3))
        return out


class _Ewma:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: Optional[float] = None
        self.count = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


class _PlainCurve:
    """A plain prefill's seconds as ``a + b * rows + c * rows**2`` (a, b, c >= 0).

    ``a`` is the step's own cost (vLLM's and ucm's host work, launches): on a small model
    on a fast GPU it is most of a 1-4K prefill (Qwen2.5-0.5B on an H100: 11.8 / 12.7 / 13.2
    ms at 1.1K / 2.1K / 4.2K rows), so a price per row learned there made an 8K prefill
    look 4-6x dearer than it is. ``b`` is the per-row work, ``c`` attention's growth with
    the context (a CPU prefill is near ``b * rows + c * rows**2``). Samples are kept per
    half-octave of rows (the last ``keep`` of each, so the curve follows the host), each
    size counted once as the median of its bin; the coefficients are the non-negative least
    squares fit over those points. With fewer sizes than coefficients the fit uses fewer
    terms: one size gives a price per row, two a line with an intercept (which, extended
    past the largest size, errs low: a plain prefill priced too low only makes the policy
    choose plain, and the plain run is then a sample at its own size)."""

    TERMS = ((0,), (1,), (0, 1), (1, 2), (0, 2), (0, 1, 2), (2,))

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._bins: dict[int, deque[tuple[int, float]]] = {}
        self._fit: Optional[tuple[float, float, float]] = None

    @property
    def known(self) -> bool:
        return bool(self._bins)

    @staticmethod
    def bin_of(rows: int) -> int:
        """The half-octave of ``rows`` that samples are kept under."""
        return round(2 * math.log2(max(rows, 1)))

    def add(self, rows: int, seconds: float) -> None:
        self._bins.setdefault(self.bin_of(rows), deque(maxlen=self.keep)).append((rows, seconds))
        self._fit = None

    def count(self, rows: int) -> int:
        """Plain steps kept in the half-octave of ``rows``."""
        return len(self._bins.get(self.bin_of(rows), ()))

    def _points(self) -> list[tuple[float, float]]:
        points = []
        for samples in self._bins.values():
            rows = sorted(r for r, _ in samples)
            secs = sorted(t for _, t in samples)
            points.append((float(rows[len(rows) // 2]), secs[len(secs) // 2]))
        return sorted(points)

    def _solve(self) -> tuple[float, float, float]:
        points = self._points()
        if len(points) == 1:
            x, y = points[0]
            return 0.0, y / x, 0.0
        if len(points) == 2:
            candidates: tuple[tuple[int, ...], ...] = ((0, 1), (1,), (0,))
        else:
            candidates = self.TERMS
        xs = np.array([x for x, _ in points])
        ys = np.array([y for _, y in points])
        columns = np.stack([np.ones_like(xs), xs, xs * xs], axis=1)
        scale = np.abs(columns).max(axis=0)
        best: Optional[tuple[float, np.ndarray, tuple[int, ...]]] = None
        for terms in candidates:
            design = columns[:, terms] / scale[list(terms)]
            coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
            if (coef < 0).any():
                continue
            residual = float(np.sum((design @ coef - ys) ** 2))
            if best is None or residual < best[0] * (1 - 1e-9):  # ties: the fewer terms, listed first
                best = (residual, coef / scale[list(terms)], terms)
        full = [0.0, 0.0, 0.0]
        if best is None:  # cannot happen with (1,) among the candidates; stay proportional
            x, y = points[-1]
            return 0.0, y / x, 0.0
        for term, value in zip(best[2], best[1]):
            full[term] = float(value)
        return full[0], full[1], full[2]

    def __call__(self, rows: float) -> float:
        if self._fit is None:
            self._fit = self._solve()
        a, b, c = self._fit
        return max(a + b * rows + c * rows * rows, 1e-12)


class BlendPayPolicy:
    """Decides per request whether blending beats a plain prefill (see the module doc).

    ``pre``: share of the layers every row runs (first check layer + 1 over the depth).
    ``margin``: blend only when its estimate is at least this share below the plain
    one, so that noise in the estimates does not make Blend the slower choice.
    ``enabled`` False: always blend (experiments and tests).
    """

    def __init__(self, pre: float, *, enabled: bool = True, min_rows: int = MIN_PLAIN_ROWS, alpha: float = 0.25,
                 margin: float = 0.05, explore: int = 3, keep_blend_samples: int = 16,
                 remeasure_every: int = 64, remeasure_within: float = 1.5) -> None:
        if not 0.0 <= pre <= 1.0:  # 0: no layer computes every row (EPIC)
            raise ValueError(f"pre must be in [0, 1], got {pre}")
        self.pre = pre
        self.enabled = enabled
        self.min_rows = min_rows
        self.margin = margin
        self.explore = explore
        # A "does not pay" that rests on old Blend samples (a one-off slow step, a busy
        # host) would never be revisited, since only blending measures Blend: after
        # ``remeasure_every`` plain decisions in a row, one request whose Blend estimate is
        # within ``remeasure_within`` of plain blends again ("re-measuring").
        self.remeasure_every = remeasure_every
        self.remeasure_within = remeasure_within
        # The mirror: a "pays" resting on a plain price from a slow step (an engine's first
        # forward) would never be revisited either, since only plain runs measure plain: after
        # ``remeasure_every`` blend decisions in a row, one near-tie request runs plain.
        self._plain_streak = 0
        self._blend_streak = 0
        # Plain runs asked per half-octave of rows to price a size ("measuring plain"), so
        # requests decided before those runs report do not all run plain.
        self._plain_asked: dict[int, int] = {}
        self._plain = _PlainCurve()
        self._load = _Ewma(alpha)
        # Recent Blend steps: their fixed cost is refitted against the current plain line,
        # so a plain rate learned later (at the sizes Blend runs) corrects it.
        self._blend: deque[StepSample] = deque(maxlen=keep_blend_samples)

    def equivalent_rows(self, rows: int, kept: float) -> float:
        return rows * self.pre + kept * (1.0 - self.pre)

    def observe(self, sample: StepSample) -> None:
        if sample.load_tokens > 0 and sample.load_seconds > 0:
            self._load.add(sample.load_seconds / sample.load_tokens)
        if sample.blend:
            self._blend.append(sample)
        elif sample.rows >= self.min_rows and sample.seconds > 0:
            self._plain.add(sample.rows, sample.seconds)

    def _plain_sparse(self, rows: int) -> bool:
        """Fewer than ``explore`` plain steps of this size measured or asked for."""
        asked = self._plain_asked.get(_PlainCurve.bin_of(rows), 0)
        return self._plain.count(rows) + asked < self.explore

    def plain_seconds(self, rows: int) -> float:
        """What a plain prefill of ``rows`` rows costs here, from the plain steps measured."""
        return self._plain(rows)

    def _compute(self, rows: int, kept: float) -> float:
        """Seconds of the rows a Blend step computes: its share of a plain step of its size."""
        return self._plain(rows) * self.equivalent_rows(rows, kept) / rows

    def fixed_cost(self) -> float:
        """A Blend step's seconds beyond its rows' compute: the median over recent steps, so
        one step that paid a one-time cost (the first call of a kernel) does not set it."""
        extra = sorted(max(0.0, s.seconds - self._compute(s.rows, s.kept)) for s in self._blend)
        mid = len(extra) // 2
        return extra[mid] if len(extra) % 2 else 0.5 * (extra[mid - 1] + extra[mid])

    @property
    def measured(self) -> bool:
        return self._plain.known and len(self._blend) >= self.explore

    def worth_saving(self, rows: int, chunk_tokens: int, ratio: float) -> bool:
        """Whether storing a request's chunks could ever pay back: reusing all
        ``chunk_tokens`` of a ``rows``-row prompt (its best case) must not cost more than
        ``remeasure_within`` times a plain prefill. Beyond that even the re-measuring
        requests would not blend, and a save is only time the saving request pays."""
        if not self.enabled or not self.measured:
            return True
        if ratio >= 1.0:
            return False
        return self.cannot_pay(rows, chunk_tokens, ratio) is None

    def cannot_pay(self, rows: int, chunk_tokens: int, ratio: float) -> Optional[PayDecision]:
        """"cannot pay" where even the best case -- every one of ``chunk_tokens`` reused, at
        ``ratio`` -- would cost more than ``remeasure_within`` times a plain prefill of
        ``rows`` rows, else None. Asked before a request's chunks are looked up: such a
        request would run plain whatever the lookup found (no re-measuring request blends
        that far from plain), so the lookup and its chunk saves are skipped too. Side-effect
        free: the streaks count only :meth:`decide`'s answers."""
        if not self.enabled or not self.measured or ratio >= 1.0 or chunk_tokens <= 0:
            return None
        plain = self._plain(rows)
        blend = self._blend_seconds(rows, min(chunk_tokens, rows), ratio)
        if blend <= plain * self.remeasure_within:
            return None
        return PayDecision(False, "cannot pay", plain * 1e3, blend * 1e3)

    def _blend_seconds(self, rows: int, reusable: int, ratio: float) -> float:
        """A Blend step's estimate: its fixed cost, the compute of the rows it keeps, and
        the store's read of the reusable tokens."""
        kept = (rows - reusable) + ratio * reusable
        return self.fixed_cost() + self._compute(rows, kept) + reusable * (self._load.value or 0.0)

    def decide(self, rows: int, reusable: int, ratio: float) -> PayDecision:
        """Blend this request or not: ``rows`` it computes, ``reusable`` of them loadable
        from chunk blocks (read from the store first), ``ratio`` of those recomputed."""
        if not self.enabled:
            return PayDecision(True, "always")
        if reusable <= 0:
            return PayDecision(False, "nothing to reuse")
        if ratio >= 1.0:
            # Every row is computed either way: loads and the Blend step (which leaves
            # vLLM's compiled path) are pure cost, and a plain prefill is vLLM's own answer.
            return PayDecision(False, "recomputes every row")
        if not self.measured:
            return PayDecision(True, "measuring")
        plain = self._plain(rows)
        blend = self._blend_seconds(rows, reusable, ratio)
        pays = blend <= plain * (1.0 - self.margin)
        if pays and self._plain_sparse(rows):
            # Priced from fewer than ``explore`` plain steps of this size: one slow first step
            # read 2x high (8B shape, 1.1K tokens), and a price per row carried from 550-row
            # steps read 3x high (0.5B shape, 8K). Run plain, which is never slower than vLLM
            # alone, and let the run price the size; a wide gap is no proof either way.
            size = _PlainCurve.bin_of(rows)
            self._plain_asked[size] = self._plain_asked.get(size, 0) + 1
            self._blend_streak = 0
            return PayDecision(False, "measuring plain", plain * 1e3, blend * 1e3)
        if pays:
            self._plain_streak = 0
            self._blend_streak += 1
            if self._blend_streak >= self.remeasure_every and plain <= blend * self.remeasure_within:
                self._blend_streak = 0
                return PayDecision(False, "re-measuring plain", plain * 1e3, blend * 1e3)
            return PayDecision(True, "pays", plain * 1e3, blend * 1e3)
        self._blend_streak = 0
        self._plain_streak += 1
        if self._plain_streak >= self.remeasure_every and blend <= plain * self.remeasure_within:
            self._plain_streak = 0
            return PayDecision(True, "re-measuring", plain * 1e3, blend * 1e3)
        return PayDecision(False, "does not pay", plain * 1e3, blend * 1e3)
