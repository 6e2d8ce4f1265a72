"""Host (CPU) time spent in ucm's phases of a step, for finding where TTFT goes.

On a GPU a Blend request is bound by host time as much as by kernels (docs/BENCHMARKS.md,
host profiles): the wall time of one request is the scheduler's plan, the load
setup, the Python of every layer, and the waits. This splits the part ucm owns into
named phases. Off by default; a benchmark in the engine's process turns it on
(``HOST_TIMES.enabled = True``) and reads the totals after each request
(``HOST_TIMES.take()``). Timing is ``time.perf_counter`` around host code only:
it never synchronises with the device, so it measures what the host spends, not what
the GPU runs. Phases nest: ``load_*`` inside ``load``, and a deferred chunk load
(``load_deferred`` and its ``load_*``) inside the check layer's ``select`` and
``blend_attention``, all inside ``forward``.
"""

from __future__ import annotations

import time
from collections import defaultdict


class HostTimes:
    """Accumulated seconds per phase name since the last :meth:`take`."""

    def __init__(self) -> None:
        self.enabled = False
        self._totals: defaultdict[str, float] = defaultdict(float)

    def start(self) -> float:
        """A start mark (0.0 when disabled: then :meth:`add` does nothing)."""
        return time.perf_counter() if self.enabled else 0.0

    def add(self, phase: str, start: float) -> None:
        """Add the time since ``start`` (from :meth:`start`) to ``phase``."""
        if start:
            self._totals[phase] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The totals so far, in seconds, and start over."""
        totals = dict(self._totals)
        self._totals.clear()
        return totals


HOST_TIMES = HostTimes()
