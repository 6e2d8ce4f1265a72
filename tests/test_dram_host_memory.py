"""The DRAM tier against the host's memory, checked at start.

On CPU vLLM sizes its own KV cache to most of the host (20.5 of 23.5 GiB on the 2-core
VM, leaving 1.5 GiB), and the tier's arena is committed only as blocks are written: a
budget larger than what is left would run the host out of memory hours later, once the
tier fills. So an explicit ``capacity_bytes`` that does not fit is refused when the
worker registers its KV caches, and the default budget shrinks to fit, saying so.
"""

from __future__ import annotations

import logging

import pytest

from ucm.config import DramStoreConfig, UcmConfig, UcmConfigError
from ucm.store.dram_store import DEFAULT_DRAM_CAPACITY, UcmDramStore
from ucm.store.host_memory import available_bytes

GiB, MiB = 1 << 30, 1 << 20
KEY = "ucm_connectors[0].ucm_connector_config"
BLOCK = 1 * MiB


def test_explicit_capacity_beyond_the_host_memory_is_refused_at_reserve() -> None:
    store = UcmDramStore(capacity_bytes=8 * GiB, config_key=KEY, host_memory=lambda: 2 * GiB)
    with pytest.raises(UcmConfigError) as info:
        store.reserve(BLOCK)
    err = info.value
    assert err.key == f"{KEY}.capacity_bytes"
    for word in ("8.0 GiB", "2.0 GiB", "available", "KV cache"):
        assert word in str(err), (word, str(err))
    assert store.stats()["capacity_bytes"] == 8 * GiB  # nothing was laid out


def test_default_capacity_shrinks_to_half_of_what_the_host_has(caplog) -> None:
    store = UcmDramStore(host_memory=lambda: 1 * GiB + 3 * BLOCK // 2)
    assert store.capacity_bytes == DEFAULT_DRAM_CAPACITY
    with caplog.at_level(logging.WARNING, logger="ucm.store.host_memory"):
        store.reserve(BLOCK)
    assert store.capacity_bytes == 512 * BLOCK  # half of what is available, whole blocks
    assert store._arena is not None and store._arena.num_slots == 512
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "capacity_bytes" in said and "0.5 GiB" in said, said


def test_a_capacity_that_fits_is_kept() -> None:
    store = UcmDramStore(capacity_bytes=8 * BLOCK, host_memory=lambda: 64 * GiB)
    store.reserve(BLOCK)
    assert store.capacity_bytes == 8 * BLOCK and store._arena.num_slots == 8


def test_the_default_that_fits_is_kept() -> None:
    store = UcmDramStore(host_memory=lambda: 64 * GiB)
    assert store._fitted_capacity(BLOCK) == DEFAULT_DRAM_CAPACITY


def test_unknown_host_memory_keeps_the_budget() -> None:
    store = UcmDramStore(capacity_bytes=8 * BLOCK, host_memory=lambda: None)
    store.reserve(BLOCK)
    assert store.capacity_bytes == 8 * BLOCK


def test_default_that_cannot_hold_one_block_is_refused() -> None:
    store = UcmDramStore(config_key=KEY, host_memory=lambda: BLOCK)
    with pytest.raises(UcmConfigError) as info:
        store.reserve(BLOCK)
    assert info.value.key == f"{KEY}.capacity_bytes" and "available" in str(info.value)


def test_the_config_leaves_the_default_to_the_store() -> None:
    """Unset in the config means "the default, fitted to the host", not a fixed 4 GiB."""
    assert DramStoreConfig().capacity_bytes is None
    config = UcmConfig.from_dict({"ucm_connectors": [{"ucm_connector_name": "UcmDramStore"}]})
    assert config.stores[0].config.capacity_bytes is None
    explicit = UcmConfig.from_dict({"ucm_connectors": [{"ucm_connector_name": "UcmDramStore",
                                                        "ucm_connector_config": {"capacity_bytes": 5 * GiB}}]})
    assert explicit.stores[0].config.capacity_bytes == 5 * GiB


def test_available_bytes_reads_memavailable(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:    1536 kB\n")
    assert available_bytes(meminfo) == 1536 * 1024
    assert available_bytes(tmp_path / "absent") is None
    meminfo.write_text("MemTotal: 5 kB\n")
    assert available_bytes(meminfo) is None
