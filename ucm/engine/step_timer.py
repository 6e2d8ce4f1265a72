"""Time each forward of the worker without making the host wait for the device.

The Blend pay policy (``ucm.sparse.blend.pay_policy``) needs what a plain prefill and
a Blend step really cost in this process. On CUDA a forward's kernels run after the
host has queued them, so its time is read from two events once the later one has
completed (a later step, never a synchronisation); the interval also covers the gaps
where the device waited for the host, which is the cost a host-bound step pays. On CPU
the forward is synchronous and the host's clock is the time.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional

import torch

from ucm.sparse.blend.pay_policy import MIN_PLAIN_ROWS, StepSample

MAX_PENDING = 64  # events of forwards whose time is not known yet (older ones are dropped)


class ForwardTimer:
    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda = device.type == "cuda"
        self._clock = clock
        self._start: Optional[Any] = None
        self._mark: Optional[Any] = None  # where the coming step's setup began (mark)
        self._pending: deque[tuple[Any, Any, dict]] = deque()
        self._done: list[StepSample] = []

    def mark(self) -> None:
        """The coming step's ucm work begins here (its load setup, before the forward): a
        step :meth:`start` times is timed from this mark. Called only for steps with a
        plan (loads or saves), so decode steps pay nothing."""
        if self.cuda:
            self._mark = torch.cuda.Event(enable_timing=True)
            self._mark.record()
        else:
            self._mark = self._clock()

    def drop_mark(self) -> None:
        """The step ended: a mark no forward used (a step without one) must not date a later step."""
        self._mark = None

    def start(self, rows: int, blend: bool = False, load_tokens: int = 0) -> None:
        """Begin timing a forward of ``rows`` rows (from the step's :meth:`mark` if it has
        one), unless it is one the policy ignores (a decode step): those are most steps,
        and an event each is host time they pay."""
        marked, self._mark = self._mark, None
        if self.uninformative(rows, blend, load_tokens):
            self._start = None
        elif marked is not None:
            self._start = marked
        elif self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = self._clock()

    def stop(self, **sample: Any) -> None:
        """End the forward begun by :meth:`start`; ``sample`` holds StepSample's other fields."""
        began, self._start = self._start, None
        if began is None or self.uninformative(sample.get("rows", 0), sample.get("blend", False),
                                                sample.get("load_tokens", 0)):
            return
        if not self.cuda:
            self._done.append(StepSample(seconds=self._clock() - began, **sample))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((began, end, sample))
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft()

    @staticmethod
    def uninformative(rows: int, blend: bool, load_tokens: int) -> bool:
        """A short plain step without a store read (a decode step): the pay policy ignores
        it, so it is neither kept (no events on CUDA) nor reported to the scheduler."""
        return not blend and rows < MIN_PLAIN_ROWS and not load_tokens

    def take(self) -> list[StepSample]:
        """The samples whose time is known now (in order), forgetting them."""
        while self._pending and self._pending[0][1].query():
            began, end, sample = self._pending.popleft()
            self._done.append(StepSample(seconds=began.elapsed_time(end) / 1e3, **sample))
        out, self._done = self._done, []
        return out
