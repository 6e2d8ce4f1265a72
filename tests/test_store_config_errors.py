"""Every store config error raised at start names the full key path of the setting.

Value errors are caught by :mod:`ucm.config` (with paths); what only the store can
find out -- a root that cannot be created, a DRAM budget below one block -- is raised
when the store is built or first reserves memory, and must name the key too.
"""

from __future__ import annotations

import pytest

from ucm.config import UcmConfig, UcmConfigError
from ucm.store.dram_store import UcmDramStore
from ucm.store.factory import build_store_chain

TIER0 = "ucm_connectors[0].ucm_connector_config"
TIER1 = "ucm_connectors[1].ucm_connector_config"


def build(*tiers: tuple[str, dict]):
    """Parse like the connector does, then build the chain like the connector does."""
    config = UcmConfig.from_dict({"ucm_connectors": [
        {"ucm_connector_name": name, "ucm_connector_config": cfg} for name, cfg in tiers]})
    return build_store_chain([(s.name, s.config) for s in config.stores])


def refusal(*tiers: tuple[str, dict]) -> UcmConfigError:
    with pytest.raises(UcmConfigError) as info:
        build(*tiers)
    return info.value


def test_root_under_a_regular_file_names_the_key(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = refusal(("UcmNfsStore", {"storage_backends": str(afile / "sub")}))
    assert err.key == f"{TIER0}.storage_backends"
    assert str(err).startswith(f"{TIER0}.storage_backends: ")
    assert "ENOTDIR" in str(err) and str(afile / "sub") in str(err) and "UcmNfsStore" in str(err)


def test_root_that_is_a_regular_file_names_the_key(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = refusal(("UcmNfsStore", {"storage_backends": str(afile)}))
    assert err.key == f"{TIER0}.storage_backends" and str(afile) in str(err)


def test_a_later_tier_names_its_own_index(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = refusal(("UcmDramStore", {}), ("UcmNfsStore", {"storage_backends": str(afile / "sub")}))
    assert err.key == f"{TIER1}.storage_backends"


@pytest.mark.parametrize("value,words", [(5, ["expected str", "int"]), ("", ["non-empty"]),
                                         ("   ", ["non-empty"]), (["/kv"], ["expected str", "list"])],
                         ids=["int", "empty", "blank", "list"])
def test_bad_root_values_name_the_key(value, words) -> None:
    err = refusal(("UcmNfsStore", {"storage_backends": value}))
    assert err.key == f"{TIER0}.storage_backends"
    for word in words:
        assert word in str(err), (word, str(err))


def test_raw_dict_config_errors_name_the_key() -> None:
    """build_store_chain also takes dicts the config never saw: the store's own check names the key."""
    with pytest.raises(UcmConfigError) as info:
        build_store_chain([("UcmDramStore", {"capacity_bytes": -5})])
    assert info.value.key == f"{TIER0}.capacity_bytes"


def test_a_good_chain_still_builds(tmp_path) -> None:
    store = build(("UcmDramStore", {"capacity_bytes": 1 << 20}), ("UcmNfsStore", {"storage_backends": str(tmp_path)}))
    store.close()


# ---- DRAM budget below one block: known once the KV layout is (reserve) ----------------------


def test_dram_capacity_below_one_block_is_refused_at_reserve() -> None:
    store = build(("UcmDramStore", {"capacity_bytes": 1000}))
    with pytest.raises(UcmConfigError) as info:
        store.reserve(4096, in_flight_blocks=4)
    err = info.value
    assert err.key == f"{TIER0}.capacity_bytes"
    for word in ("1000", "4096", "at least 4096", "no block"):
        assert word in str(err), (word, str(err))


def test_dram_tier_of_a_pipeline_is_refused_at_reserve(tmp_path) -> None:
    store = build(("UcmNfsStore", {"storage_backends": str(tmp_path)}), ("UcmDramStore", {"capacity_bytes": 1000}))
    with pytest.raises(UcmConfigError) as info:
        store.reserve(4096)
    assert info.value.key == f"{TIER1}.capacity_bytes"
    store.close()


def test_dram_capacity_of_exactly_one_block_is_fine() -> None:
    store = UcmDramStore(capacity_bytes=4096)
    store.reserve(4096)
    with pytest.raises(UcmConfigError) as info:
        UcmDramStore(capacity_bytes=4095).reserve(4096)
    assert info.value.key == "capacity_bytes"  # built outside a chain: the bare key
