"""Blend only where it pays: a per-request decision from what this process measured.

Blending a request costs a fixed amount on top of its compute (planning, loads, the
check layer's selection, the per-layer work of the exact-mask path, and on a GPU a
step without CUDA graphs), and saves the compute of the rows it does not recompute.
With a small model or a short prompt the fixed part wins, and a blended request is
slower than a plain prefill. So the scheduler asks this policy, once per request,
before it plans any chunk load; a request that does not pay runs as a plain prefill
(its chunks are still saved).

The model, fitted online from the worker's step timings (:class:`StepSample`):

* plain prefill: ``seconds = per_token * rows`` (steps of at least ``min_rows`` rows,
  where the step's own overhead is small);
* a Blend step: ``seconds = fixed + per_token * equivalent_rows`` with
  ``equivalent_rows = rows * pre + kept * (1 - pre)``: every row runs the layers up to
  and including the first check layer (share ``pre`` of the layers), the kept rows run
  the rest; ``fixed`` is what is left over, averaged over Blend steps;
* chunk tokens read from a store before the forward cost ``load seconds per token``
  (the store's read in the step's load phase: large for the file tier, small for host
  memory, whose copies to the device overlap the first layers).

Until both a plain rate and a Blend fixed cost are known the policy blends (it must
measure Blend to judge it); ``explore`` Blend steps are taken that way. Pure Python,
no vLLM, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
    reason: str  # "pays", "does not pay", "measuring", "always"
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


class BlendPayPolicy:
    """Decides per request whether blending beats a plain prefill (see the module doc).

    ``pre``: share of the layers every row runs (first check layer + 1 over the depth).
    ``margin``: blend only when its estimate is at least this share below the plain
    one, so that noise in the estimates does not make Blend the slower choice.
    ``enabled`` False: always blend (experiments and tests).
    """

    def __init__(self, pre: float, *, enabled: bool = True, min_rows: int = 128, alpha: float = 0.25,
                 margin: float = 0.05, explore: int = 2) -> None:
        if not 0.0 <= pre <= 1.0:  # 0: no layer computes every row (EPIC)
            raise ValueError(f"pre must be in [0, 1], got {pre}")
        self.pre = pre
        self.enabled = enabled
        self.min_rows = min_rows
        self.margin = margin
        self.explore = explore
        self._per_token = _Ewma(alpha)
        self._fixed = _Ewma(alpha)
        self._load = _Ewma(alpha)
        self._blend_samples: list[StepSample] = []  # kept until a plain rate exists to fit them

    def equivalent_rows(self, rows: int, kept: float) -> float:
        return rows * self.pre + kept * (1.0 - self.pre)

    def observe(self, sample: StepSample) -> None:
        if sample.load_tokens > 0 and sample.load_seconds > 0:
            self._load.add(sample.load_seconds / sample.load_tokens)
        if not sample.blend:
            if sample.rows >= self.min_rows and sample.seconds > 0:
                self._per_token.add(sample.seconds / sample.rows)
                for pending in self._blend_samples:
                    self._fit_fixed(pending)
                self._blend_samples.clear()
            return
        if self._per_token.value is None:
            self._blend_samples.append(sample)
            del self._blend_samples[:-8]
        else:
            self._fit_fixed(sample)

    def _fit_fixed(self, sample: StepSample) -> None:
        assert self._per_token.value is not None
        compute = self._per_token.value * self.equivalent_rows(sample.rows, sample.kept)
        self._fixed.add(max(0.0, sample.seconds - compute))

    @property
    def measured(self) -> bool:
        return self._per_token.value is not None and self._fixed.count >= self.explore

    def decide(self, rows: int, reusable: int, ratio: float) -> PayDecision:
        """Blend this request or not: ``rows`` it computes, ``reusable`` of them loadable
        from chunk blocks (read from the store first), ``ratio`` of those recomputed."""
        if not self.enabled:
            return PayDecision(True, "always")
        if reusable <= 0:
            return PayDecision(False, "nothing to reuse")
        if not self.measured:
            return PayDecision(True, "measuring")
        per_token, fixed = self._per_token.value, self._fixed.value
        assert per_token is not None and fixed is not None
        kept = (rows - reusable) + ratio * reusable
        plain = per_token * rows
        blend = fixed + per_token * self.equivalent_rows(rows, kept) + reusable * (self._load.value or 0.0)
        pays = blend <= plain * (1.0 - self.margin)
        return PayDecision(pays, "pays" if pays else "does not pay", plain * 1e3, blend * 1e3)
