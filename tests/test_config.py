"""Tests for ucm.config: every bad input must fail at start-up naming its key path."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle

import pytest
import yaml

from ucm.config import (
    GiB,
    STORE_CONFIGS,
    BlendConfig,
    CheckLayer,
    DramStoreConfig,
    NfsStoreConfig,
    StoreSpec,
    UcmConfig,
    UcmConfigError,
    sparse_enabled,
)

L1 = "model.layers.1.self_attn.attn"
L3 = "model.layers.3.self_attn.attn"

# The design's example: what a user writes in KVTransferConfig.kv_connector_extra_config.
EXAMPLE = {
    "ucm_connectors": [{"ucm_connector_name": "UcmNfsStore",
                        "ucm_connector_config": {"storage_backends": "/data/kv"}}],
    "ucm_sparse_config": {"Blend": {"chunk_end_token_id": 2, "compute_meta": {L1: {"ratio": 0.15}}}},
    "use_layerwise": True,
}
NO_ENV: dict[str, str] = {}


def parse(extra, env=NO_ENV) -> UcmConfig:
    return UcmConfig.from_extra_config(extra, env=env)


def blend(**section) -> dict:
    """An extra config whose Blend section is ``section``."""
    return {"ucm_sparse_config": {"Blend": section}}


def store(name: str, **config) -> dict:
    return {"ucm_connectors": [{"ucm_connector_name": name, "ucm_connector_config": config}]}


NFS0 = "ucm_connectors[0].ucm_connector_config"
BLEND = "ucm_sparse_config.Blend"
DELIMS = ("chunk_end_token_id", "blend_special_str", "separator_token_ids")

# (id, extra config, key path the message must start with, other words it must contain)
BAD = [
    ("extra-not-mapping", "chunk_end_token_id=2", "kv_connector_extra_config", ["expected a mapping", "str"]),
    ("top-unknown-key", {"use_layer_wise": True}, "use_layer_wise", ["did you mean 'use_layerwise'", "log_stats"]),
    ("top-non-str-key", {1: True}, "1", ["unknown key", "ucm_connectors"]),
    ("use_layerwise-str", {"use_layerwise": "yes"}, "use_layerwise", ["expected bool", "got str"]),
    ("use_layerwise-false", {"use_layerwise": False}, "use_layerwise", ["always", "layer"]),
    ("log_stats-int", {"log_stats": 1}, "log_stats", ["expected bool", "got int"]),
    ("connectors-empty", {"ucm_connectors": []}, "ucm_connectors", ["at least one store"]),
    ("connectors-str", {"ucm_connectors": "UcmDramStore"}, "ucm_connectors", ["expected a list of store", "got str"]),
    ("connector-not-mapping", {"ucm_connectors": ["UcmDramStore"]}, "ucm_connectors[0]", ["expected a mapping"]),
    ("connector-no-name", {"ucm_connectors": [{"ucm_connector_config": {}}]}, "ucm_connectors[0].ucm_connector_name",
     ["required key is missing", "UcmDramStore", "UcmNfsStore"]),
    ("connector-unknown-store", store("UcmS3Store"), "ucm_connectors[0].ucm_connector_name",
     ["unknown store 'UcmS3Store'", "UcmDramStore", "UcmNfsStore"]),
    ("connector-name-typo", store("UcmNfStore"), "ucm_connectors[0].ucm_connector_name", ["did you mean 'UcmNfsStore'"]),
    ("connector-name-int", store(7), "ucm_connectors[0].ucm_connector_name", ["expected str", "got int"]),
    ("connector-key-typo", {"ucm_connectors": [{"ucm_connector_name": "UcmDramStore", "ucm_connector_cfg": {}}]},
     "ucm_connectors[0].ucm_connector_cfg", ["did you mean 'ucm_connector_config'"]),
    ("second-connector-bad", {"ucm_connectors": [{"ucm_connector_name": "UcmDramStore"},
                                                 {"ucm_connector_name": "UcmNfsStore"}]},
     "ucm_connectors[1].ucm_connector_config.storage_backends", ["required key is missing"]),
    ("nfs-no-backends", store("UcmNfsStore"), f"{NFS0}.storage_backends", ["required key is missing"]),
    ("nfs-empty-backends", store("UcmNfsStore", storage_backends=""), f"{NFS0}.storage_backends", ["non-empty"]),
    ("nfs-backends-int", store("UcmNfsStore", storage_backends=5), f"{NFS0}.storage_backends", ["expected str"]),
    ("nfs-io-threads-0", store("UcmNfsStore", storage_backends="/kv", io_threads=0), f"{NFS0}.io_threads",
     ["between 1 and 64", "got 0"]),
    ("nfs-io-threads-65", store("UcmNfsStore", storage_backends="/kv", io_threads=65), f"{NFS0}.io_threads",
     ["between 1 and 64"]),
    ("nfs-capacity-neg", store("UcmNfsStore", storage_backends="/kv", capacity_bytes=-1), f"{NFS0}.capacity_bytes",
     [">= 1"]),
    ("nfs-pinned-read-neg", store("UcmNfsStore", storage_backends="/kv", pinned_read_bytes=-1),
     f"{NFS0}.pinned_read_bytes", [">= 0"]),
    ("nfs-unknown-key", store("UcmNfsStore", storage_backends="/kv", capacity=5), f"{NFS0}.capacity",
     ["did you mean 'capacity_bytes'", "io_threads"]),
    ("dram-capacity-bool", store("UcmDramStore", capacity_bytes=True), f"{NFS0}.capacity_bytes",
     ["expected int", "got bool"]),
    ("dram-capacity-float", store("UcmDramStore", capacity_bytes=1.5), f"{NFS0}.capacity_bytes",
     ["expected int", "got float"]),
    ("dram-capacity-zero", store("UcmDramStore", capacity_bytes=0), f"{NFS0}.capacity_bytes", [">= 1"]),
    ("dram-config-list", {"ucm_connectors": [{"ucm_connector_name": "UcmDramStore", "ucm_connector_config": []}]},
     NFS0, ["expected a mapping", "list"]),
    ("sparse-list", {"ucm_sparse_config": ["Blend"]}, "ucm_sparse_config", ["expected a mapping"]),
    ("sparse-unknown-method", {"ucm_sparse_config": {"blend": {"chunk_end_token_id": 2}}}, "ucm_sparse_config.blend",
     ["unknown sparse method", "Blend", "did you mean 'Blend'"]),
    ("blend-not-mapping", {"ucm_sparse_config": {"Blend": 2}}, BLEND, ["expected a mapping", "int"]),
    ("blend-no-delimiter", blend(), BLEND, ["exactly one", *DELIMS, "got none"]),
    ("blend-two-delimiters", blend(chunk_end_token_id=2, blend_special_str="##"), BLEND,
     ["exactly one", *DELIMS, "got chunk_end_token_id, blend_special_str"]),
    ("blend-key-typo", blend(chunk_end_tokn_id=2), f"{BLEND}.chunk_end_tokn_id",
     ["did you mean 'chunk_end_token_id'", "compute_meta"]),
    ("chunk-end-neg", blend(chunk_end_token_id=-1), f"{BLEND}.chunk_end_token_id", [">= 0", "got -1"]),
    ("chunk-end-str", blend(chunk_end_token_id="2"), f"{BLEND}.chunk_end_token_id", ["expected int", "got str"]),
    ("chunk-end-bool", blend(chunk_end_token_id=True), f"{BLEND}.chunk_end_token_id", ["expected int", "got bool"]),
    ("special-str-empty", blend(blend_special_str=""), f"{BLEND}.blend_special_str", ["non-empty"]),
    ("special-str-list", blend(blend_special_str=["#"]), f"{BLEND}.blend_special_str", ["expected str", "list"]),
    ("sep-ids-empty", blend(separator_token_ids=[]), f"{BLEND}.separator_token_ids", ["at least one token id"]),
    ("sep-ids-neg", blend(separator_token_ids=[1, -2]), f"{BLEND}.separator_token_ids[1]", [">= 0"]),
    ("sep-ids-str", blend(separator_token_ids="12"), f"{BLEND}.separator_token_ids", ["expected a list", "str"]),
    ("compute-meta-list", blend(chunk_end_token_id=2, compute_meta=[L1]), f"{BLEND}.compute_meta",
     ["expected a mapping"]),
    ("compute-meta-empty", blend(chunk_end_token_id=2, compute_meta={}), f"{BLEND}.compute_meta",
     ["at least one check layer"]),
    ("layer-name-bad", blend(chunk_end_token_id=2, compute_meta={"layers.1.attn": {"ratio": 0.1}}),
     f"{BLEND}.compute_meta.layers.1.attn", ["model.layers.<N>.self_attn.attn"]),
    ("layer-name-trailing", blend(chunk_end_token_id=2, compute_meta={L1 + ".x": {"ratio": 0.1}}),
     f"{BLEND}.compute_meta.{L1}.x", ["model.layers.<N>.self_attn.attn"]),
    ("layer-duplicate", blend(chunk_end_token_id=2, compute_meta={L1: {"ratio": 0.2},
                                                                  "model.layers.01.self_attn.attn": {"ratio": 0.2}}),
     f"{BLEND}.compute_meta", ["layer 1 is given twice"]),
    ("ratio-too-big", blend(chunk_end_token_id=2, compute_meta={L1: {"ratio": 1.5}}),
     f"{BLEND}.compute_meta.{L1}.ratio", ["between 0.0 and 1.0", "1.5"]),
    ("ratio-nan", blend(chunk_end_token_id=2, compute_meta={L1: {"ratio": float("nan")}}),
     f"{BLEND}.compute_meta.{L1}.ratio", ["between 0.0 and 1.0"]),
    ("ratio-str", blend(chunk_end_token_id=2, compute_meta={L1: {"ratio": "0.1"}}),
     f"{BLEND}.compute_meta.{L1}.ratio", ["expected float", "got str"]),
    ("ratio-bool", blend(chunk_end_token_id=2, compute_meta={L1: {"ratio": True}}),
     f"{BLEND}.compute_meta.{L1}.ratio", ["expected float", "got bool"]),
    ("ratio-missing", blend(chunk_end_token_id=2, compute_meta={L1: {}}), f"{BLEND}.compute_meta.{L1}.ratio",
     ["required key is missing"]),
    ("ratio-typo", blend(chunk_end_token_id=2, compute_meta={L1: {"ratoi": 0.1}}), f"{BLEND}.compute_meta.{L1}.ratoi",
     ["did you mean 'ratio'"]),
    ("layer-meta-float", blend(chunk_end_token_id=2, compute_meta={L1: 0.1}), f"{BLEND}.compute_meta.{L1}",
     ["expected a mapping", "float"]),
    ("ratios-increase", blend(chunk_end_token_id=2, compute_meta={L1: {"ratio": 0.1}, L3: {"ratio": 0.3}}),
     f"{BLEND}.compute_meta", ["gradual filtering", "layer 1 has 0.1", "layer 3 has 0.3"]),
    ("deviation-target", blend(chunk_end_token_id=2, deviation_target="q"), f"{BLEND}.deviation_target",
     ["'k', 'v', 'kv'", "got 'q'"]),
    ("deviation-norm", blend(chunk_end_token_id=2, deviation_norm="l3"), f"{BLEND}.deviation_norm",
     ["'l1', 'l2'", "got 'l3'"]),
    ("save-chunks-str", blend(chunk_end_token_id=2, save_chunks="true"), f"{BLEND}.save_chunks", ["expected bool"]),
    ("min-chunk-zero", blend(chunk_end_token_id=2, min_chunk_tokens=0), f"{BLEND}.min_chunk_tokens", [">= 1"]),
    ("eager-kernels-str", {"engine_options": {"eager_kernels": "yes"}}, "engine_options.eager_kernels",
     ["expected bool", "str"]),
]


@pytest.mark.parametrize("extra,key,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_key(extra, key: str, words: list[str]) -> None:
    with pytest.raises(UcmConfigError) as info:
        parse(extra)
    message = str(info.value)
    assert message.startswith(key + ": "), message
    assert info.value.key == key
    for word in words:
        assert word in message, (word, message)


def test_enough_distinct_bad_configs() -> None:
    assert len({b[0] for b in BAD}) == len(BAD) >= 25


def test_defaults() -> None:
    cfg = parse(None)
    assert cfg == parse({}) == UcmConfig()
    assert cfg.stores == (StoreSpec("UcmDramStore", DramStoreConfig(None)),)  # 4 GiB, fitted to the host at start
    assert cfg.blend is None and cfg.use_layerwise is True and cfg.log_stats is True
    b = parse(blend(blend_special_str="\n\n")).blend
    assert b.check_layers == (CheckLayer(1, L1, 0.15),) and b.first_check_layer == 1
    assert (b.deviation_target, b.deviation_norm, b.save_chunks, b.min_chunk_tokens) == ("k", "l2", True, 1)
    nfs = parse(store("UcmNfsStore", storage_backends="/kv")).stores[0].config
    assert nfs == NfsStoreConfig("/kv", capacity_bytes=None, io_threads=4, pinned_read_bytes=4 * GiB)


def test_design_example() -> None:
    cfg = parse(copy.deepcopy(EXAMPLE))
    assert cfg.stores[0].name == "UcmNfsStore" and cfg.stores[0].config.storage_backends == "/data/kv"
    assert cfg.blend.chunk_end_token_id == 2 and cfg.blend.blend_special_str is None
    assert cfg.blend.check_layers == (CheckLayer(1, L1, 0.15),)


def test_tiers_keep_order_and_values_normalize() -> None:
    cfg = parse({"ucm_connectors": [
        {"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {"capacity_bytes": 1 << 20}},
        {"ucm_connector_name": "UcmNfsStore",
         "ucm_connector_config": {"storage_backends": "/kv", "capacity_bytes": 5 << 30, "io_threads": 64}}]})
    assert [s.name for s in cfg.stores] == ["UcmDramStore", "UcmNfsStore"]
    assert cfg.stores[1].config.io_threads == 64
    sep = parse(blend(separator_token_ids=[5, 6], compute_meta={L1: {"ratio": 1}})).blend
    assert sep.separator_token_ids == (5, 6)
    assert sep.check_layers[0].ratio == 1.0 and isinstance(sep.check_layers[0].ratio, float)  # int ok for float


def test_gradual_filtering_sorted_by_numeric_layer_index() -> None:
    meta = {"model.layers.10.self_attn.attn": {"ratio": 0.05}, L3: {"ratio": 0.1},
            "model.layers.2.self_attn.attn": {"ratio": 0.1}}
    b = parse(blend(chunk_end_token_id=2, compute_meta=meta)).blend
    assert [c.layer_index for c in b.check_layers] == [2, 3, 10]  # numeric, not lexicographic
    assert b.first_check_layer == 2
    with pytest.raises(UcmConfigError, match="gradual filtering"):
        BlendConfig(chunk_end_token_id=2,
                    check_layers=(CheckLayer(3, L3, 0.2), CheckLayer(10, "model.layers.10.self_attn.attn", 0.3)))


@pytest.mark.parametrize("extra", [
    {}, EXAMPLE, store("UcmNfsStore", storage_backends="/kv", capacity_bytes=1 << 30, io_threads=2),
    {**blend(separator_token_ids=[1, 2], deviation_target="kv", deviation_norm="l1", save_chunks=False,
             min_chunk_tokens=16, compute_meta={L1: {"ratio": 0.3}, L3: {"ratio": 0}}), "log_stats": False},
    {**blend(blend_special_str="# # #"), "use_layerwise": True},
], ids=["defaults", "example", "nfs", "separator-ids", "special-str"])
def test_round_trip(extra) -> None:
    cfg = parse(copy.deepcopy(extra))
    as_dict = cfg.to_dict()
    assert parse(as_dict) == cfg
    assert parse(json.loads(json.dumps(as_dict))) == cfg  # `vllm serve --kv-transfer-config` JSON
    assert parse(yaml.safe_load(yaml.safe_dump(as_dict))) == cfg


def test_yaml_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ucm.yaml"
    path.write_text(yaml.safe_dump(EXAMPLE))
    assert parse(None, {"UCM_CONFIG_FILE": str(path)}) == parse(EXAMPLE)
    assert parse({}, {"UCM_CONFIG_FILE": str(path)}) == parse(EXAMPLE)  # vLLM's default {} is "not given"
    monkeypatch.setenv("UCM_CONFIG_FILE", str(path))
    monkeypatch.delenv("ENABLE_SPARSE", raising=False)
    assert UcmConfig.from_extra_config(None) == parse(EXAMPLE)  # default env is os.environ


def test_yaml_file_and_dict_conflict(tmp_path) -> None:
    path = tmp_path / "ucm.yaml"
    path.write_text(yaml.safe_dump(EXAMPLE))
    with pytest.raises(UcmConfigError, match=r"^UCM_CONFIG_FILE: set the config in one place"):
        parse({"use_layerwise": True}, {"UCM_CONFIG_FILE": str(path)})


@pytest.mark.parametrize("content,words", [
    (None, ["cannot read"]),
    ("- a\n- b\n", ["must hold a mapping", "list"]),
    ("", ["must hold a mapping", "None"]),
    ("a: [1\n", ["not valid YAML"]),
], ids=["missing", "list", "empty", "invalid"])
def test_yaml_file_errors_name_env_and_path(tmp_path, content, words) -> None:
    path = tmp_path / "ucm.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UcmConfigError) as info:
        parse(None, {"UCM_CONFIG_FILE": str(path)})
    message = str(info.value)
    assert message.startswith("UCM_CONFIG_FILE: ") and str(path) in message
    assert all(w in message for w in words), message


def test_yaml_file_bad_key_names_key_and_file(tmp_path) -> None:
    path = tmp_path / "ucm.yaml"
    path.write_text("ucm_sparse_config:\n  Blend:\n    chunk_end_tokn_id: 2\n")
    with pytest.raises(UcmConfigError) as info:
        parse(None, {"UCM_CONFIG_FILE": str(path)})
    message = str(info.value)
    assert message.startswith("ucm_sparse_config.Blend.chunk_end_tokn_id: ")
    assert "did you mean 'chunk_end_token_id'" in message and str(path) in message


@pytest.mark.parametrize("value,expected", [
    (None, False), ("", False), ("0", False), ("false", False), ("No", False), ("OFF", False),
    ("1", True), ("true", True), ("YES", True), ("On", True), (" 1 ", True),
])
def test_enable_sparse(value, expected) -> None:
    env = {} if value is None else {"ENABLE_SPARSE": value}
    assert sparse_enabled(env) is expected


@pytest.mark.parametrize("value", ["2", "enable", "tru"])
def test_enable_sparse_bad_value(value) -> None:
    with pytest.raises(UcmConfigError) as info:
        sparse_enabled({"ENABLE_SPARSE": value})
    message = str(info.value)
    assert message.startswith("ENABLE_SPARSE: ") and "'true'" in message and "'off'" in message
    with pytest.raises(UcmConfigError, match="^ENABLE_SPARSE: "):
        parse(EXAMPLE, {"ENABLE_SPARSE": value})  # checked at start-up, with the rest


def test_sparse_switch_mismatch_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ucm.config"):
        parse(EXAMPLE, {"ENABLE_SPARSE": "0"})
    assert "Blend will not run" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ucm.config"):
        parse(EXAMPLE, {"ENABLE_SPARSE": "1"})
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="ucm.config"):
        parse({}, {"ENABLE_SPARSE": "yes"})
    assert "names no method" in caplog.text


def test_did_you_mean_picks_closest() -> None:
    with pytest.raises(UcmConfigError) as info:
        parse(blend(chunk_end_token_id=2, deviaton_norm="l1"))
    assert "did you mean 'deviation_norm'?" in str(info.value)
    with pytest.raises(UcmConfigError) as info:
        parse({"zzz": 1})
    assert "did you mean" not in str(info.value)  # no far-fetched guesses


def test_direct_construction_is_validated() -> None:
    with pytest.raises(UcmConfigError, match="exactly one chunk delimiter"):
        BlendConfig()
    with pytest.raises(UcmConfigError, match="^capacity_bytes: "):
        DramStoreConfig(capacity_bytes=0)
    with pytest.raises(UcmConfigError, match="^ucm_connector_config: expected NfsStoreConfig"):
        StoreSpec("UcmNfsStore", DramStoreConfig())
    with pytest.raises(UcmConfigError, match="^layer_index: "):
        CheckLayer(2, L1, 0.1)
    with pytest.raises(UcmConfigError, match="^ucm_connectors: "):
        UcmConfig(stores=())


def test_frozen_hashable_and_picklable() -> None:
    cfg = parse(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.use_layerwise = False  # type: ignore[misc]
    assert hash(cfg) == hash(parse(EXAMPLE))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    err = pickle.loads(pickle.dumps(UcmConfigError("a.b", "bad")))
    assert (err.key, err.reason, str(err)) == ("a.b", "bad", "a.b: bad")
    assert isinstance(err, ValueError)


def test_store_registry_is_extensible(monkeypatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class FakeStoreConfig(DramStoreConfig):
        pass

    monkeypatch.setitem(STORE_CONFIGS, "UcmFakeStore", FakeStoreConfig)
    cfg = parse(store("UcmFakeStore", capacity_bytes=3))
    assert cfg.stores[0].config == FakeStoreConfig(3) and parse(cfg.to_dict()) == cfg
