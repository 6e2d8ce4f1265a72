"""The Blend plugin spec's flags / keywords -> kv_transfer_config (ucm.integration.vllm.cli_flags)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ucm.config import UcmConfig, UcmConfigError
from ucm.integration.vllm.cli_flags import FlagError, blend_kv_transfer_config, translate_argv

ROOT = Path(__file__).resolve().parents[1]
SPEC = ["serve", "M", "--enable-blend", "--blend-check-layers", "1", "--blend-recompute-ratios", "0.15"]


def _config(argv):
    out, blend = translate_argv(argv)
    assert blend and out[:2] == ["serve", "M"] and out[-2] == "--kv-transfer-config"
    return out[:-2], json.loads(out[-1])


def test_spec_flags_become_the_blend_connector_config():
    rest, config = _config(SPEC + ["--port", "8001", "--blend-cache-provider", "cpu"])
    assert rest == ["serve", "M", "--port", "8001"]  # vLLM's own flags pass through
    assert config["kv_connector"] == "UCMBlendConnector"
    assert config["kv_connector_module_path"] == "ucm.integration.vllm.blend_connector"
    extra = config["kv_connector_extra_config"]
    assert extra["ucm_sparse_config"]["Blend"]["compute_meta"] == {"model.layers.1.self_attn.attn": {"ratio": 0.15}}
    assert extra["ucm_connectors"] == [{"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {}}]
    parsed = UcmConfig.from_dict(extra)
    assert parsed.blend.blend_special_str == " # # "


def test_several_layers_one_ratio_each_or_one_for_all():
    _, config = _config(["serve", "M", "--enable-blend", "--blend-check-layers", "1,3", "--blend-recompute-ratios",
                         "0.2", "0.1"])
    meta = config["kv_connector_extra_config"]["ucm_sparse_config"]["Blend"]["compute_meta"]
    assert meta == {"model.layers.1.self_attn.attn": {"ratio": 0.2}, "model.layers.3.self_attn.attn": {"ratio": 0.1}}
    meta = blend_kv_transfer_config([1, 2], [0.3])["kv_connector_extra_config"]["ucm_sparse_config"]["Blend"]
    assert [m["ratio"] for m in meta["compute_meta"].values()] == [0.3, 0.3]


@pytest.mark.parametrize("provider, stores", [
    ("cpu", [("UcmDramStore", None)]),
    ("file:/data/kv", [("UcmNfsStore", "/data/kv")]),
    ("cpu+file:/data/kv", [("UcmDramStore", None), ("UcmNfsStore", "/data/kv")]),
])
def test_cache_providers(provider, stores):
    extra = blend_kv_transfer_config(cache_provider=provider)["kv_connector_extra_config"]
    got = [(s["ucm_connector_name"], s["ucm_connector_config"].get("storage_backends")) for s in extra["ucm_connectors"]]
    assert got == stores


@pytest.mark.parametrize("provider", ["gpu", "file:", "cpu+", "cpu+cpu", "", 3])
def test_bad_provider_is_refused_naming_the_forms(provider):
    with pytest.raises(UcmConfigError, match=r"blend_cache_provider.*cpu, file:PATH or cpu\+file:PATH"):
        blend_kv_transfer_config(cache_provider=provider)


def test_errors_are_the_dict_configs_own():
    """A bad ratio or layer fails with exactly the message of the equivalent dict config."""
    for layers, ratios in (([1], [1.5]), (["x"], [0.1]), ([-1], [0.1])):
        meta = {f"model.layers.{layers[0]}.self_attn.attn": {"ratio": ratios[0]}}
        with pytest.raises(UcmConfigError) as from_dict:
            UcmConfig.from_dict({"ucm_sparse_config": {"Blend": {"blend_special_str": " # # ", "compute_meta": meta}}})
        with pytest.raises(UcmConfigError) as from_kwargs:
            blend_kv_transfer_config(layers, ratios)
        assert str(from_kwargs.value) == str(from_dict.value)
    with pytest.raises(UcmConfigError, match="blend_recompute_ratios: 2 ratios for 3 check layers"):
        blend_kv_transfer_config([1, 2, 3], [0.1, 0.2])
    with pytest.raises(UcmConfigError, match="exactly one|one of"):
        blend_kv_transfer_config(special_str=" # ", chunk_end_token_id=5)


@pytest.mark.parametrize("argv, message", [
    (["serve", "M", "--blend-check-layers", "1"], "need --enable-blend"),
    (SPEC + ["--kv-transfer-config", "{}"], "give one or the other"),
    (SPEC + ["--blend-recompute-ratio", "0.1"], "unknown Blend flag --blend-recompute-ratio"),
    (SPEC + ["--blend-cache-provider", "gpu"], "blend_cache_provider"),
])
def test_flag_errors(argv, message):
    with pytest.raises(FlagError, match=message):
        translate_argv(argv)


def test_other_commands_pass_through():
    assert translate_argv(["serve", "M", "--port", "1"]) == (["serve", "M", "--port", "1"], False)
    assert translate_argv(["bench", "--enable-blend"]) == (["bench", "--enable-blend"], False)


def test_launcher_refuses_a_bad_flag_before_starting_vllm():
    env = {k: v for k, v in os.environ.items() if k != "ENABLE_SPARSE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "ucm.integration.vllm.serve_cli", *SPEC[:-1], "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ucm-serve: error: --enable-blend: ucm_sparse_config.Blend.compute_meta.model.layers.1.self_attn.attn" \
           ".ratio: must be between 0.0 and 1.0, got 2.0" in proc.stderr
