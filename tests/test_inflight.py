"""The in-flight save registry: lookups wait for exactly the keys being saved."""

import concurrent.futures as cf
import threading
import time

from ucm.engine.inflight import InflightSaves


def test_wait_blocks_until_the_dump_of_a_requested_key_finishes():
    inflight = InflightSaves()
    release = threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(release.wait)
        inflight.add([b"a", b"b"], future)
        assert len(inflight) == 2
        threading.Timer(0.3, release.set).start()
        t0 = time.perf_counter()
        inflight.wait([b"b", b"z"])
        waited = time.perf_counter() - t0
        assert future.done() and waited >= 0.25
    assert len(inflight) == 0  # finished dumps leave the registry


def test_wait_ignores_keys_nobody_is_saving():
    inflight = InflightSaves()
    never: cf.Future = cf.Future()
    inflight.add([b"a"], never)
    t0 = time.perf_counter()
    inflight.wait([b"x", b"y"], timeout=5)
    assert time.perf_counter() - t0 < 1.0
    never.set_result(None)
    assert len(inflight) == 0


def test_a_newer_dump_of_a_key_is_not_dropped_by_an_older_one():
    inflight = InflightSaves()
    old, new = cf.Future(), cf.Future()
    inflight.add([b"k"], old)
    inflight.add([b"k"], new)
    old.set_result(None)
    assert len(inflight) == 1  # still waiting on the newer dump
    new.set_result(None)
    assert len(inflight) == 0
