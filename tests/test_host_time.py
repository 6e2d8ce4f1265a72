"""Host time per phase: off by default, accumulates per phase when on, resets on take."""

from __future__ import annotations

import time

from ucm.engine.host_time import HostTimes


def test_disabled_records_nothing():
    times = HostTimes()
    start = times.start()
    time.sleep(0.001)
    times.add("load", start)
    assert start == 0.0 and times.take() == {}


def test_enabled_accumulates_per_phase_and_take_resets():
    times = HostTimes()
    times.enabled = True
    for _ in range(2):
        start = times.start()
        time.sleep(0.002)
        times.add("load", start)
    start = times.start()
    times.add("plan", start)
    totals = times.take()
    assert set(totals) == {"load", "plan"}
    assert totals["load"] >= 0.004 and totals["plan"] < totals["load"]
    assert times.take() == {}
