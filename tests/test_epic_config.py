"""The EPIC config section, Blend's selection key, and one sparse method per engine."""

from __future__ import annotations

import pytest

from ucm.config import BlendConfig, UcmConfig, UcmConfigError
from ucm.config_epic import DEFAULT_RECOMPUTE_TOKENS, EpicConfig


def _sparse(**methods) -> dict:
    return {"ucm_sparse_config": methods}


def test_epic_section_parses_with_its_default_k_and_reuses_every_layer():
    config = UcmConfig.from_dict(_sparse(EPIC={"chunk_end_token_id": 2}))
    assert config.epic == EpicConfig(chunk_end_token_id=2)
    assert config.epic.recompute_tokens == DEFAULT_RECOMPUTE_TOKENS
    assert config.method_name == "EPIC" and config.chunk_method is config.epic
    assert config.epic.first_reused_layer == 0
    assert UcmConfig.from_dict(config.to_dict()) == config


def test_blend_reuses_from_its_first_check_layer():
    config = UcmConfig.from_dict(_sparse(Blend={"chunk_end_token_id": 2, "compute_meta": {
        "model.layers.3.self_attn.attn": {"ratio": 0.2}}}))
    assert config.method_name == "Blend" and config.chunk_method.first_reused_layer == 3


def test_two_methods_are_a_start_error_naming_both():
    with pytest.raises(UcmConfigError, match="ucm_sparse_config.*Blend and EPIC"):
        UcmConfig.from_dict(_sparse(Blend={"chunk_end_token_id": 2}, EPIC={"chunk_end_token_id": 2}))


@pytest.mark.parametrize("section, match", [
    ({"chunk_end_token_id": 2, "recompute_tokens": -1}, "EPIC.recompute_tokens"),
    ({"chunk_end_token_id": 2, "recompute_tokens": 1.5}, "EPIC.recompute_tokens: expected int"),
    ({"chunk_end_token_id": 2, "recompute_tokens": True}, "EPIC.recompute_tokens: expected int"),
    ({"recompute_tokens": 4}, "EPIC: set exactly one chunk delimiter"),
    ({"chunk_end_token_id": 2, "compute_meta": {}}, "EPIC.compute_meta: unknown key"),
    ({"chunk_end_token_id": 2, "pay_policy": "never"}, "EPIC.pay_policy"),
])
def test_bad_epic_settings_name_their_key(section, match):
    with pytest.raises(UcmConfigError, match=match):
        UcmConfig.from_dict(_sparse(EPIC=section))


def test_epic_token_ids_are_checked_against_the_model():
    with pytest.raises(UcmConfigError, match="chunk_end_token_id: token id 600"):
        EpicConfig(chunk_end_token_id=600).check_model(num_layers=4, vocab_size=512, has_tokenizer=True)
    EpicConfig(chunk_end_token_id=2).check_model(num_layers=4, vocab_size=512, has_tokenizer=True)


def test_blend_selection_key():
    assert BlendConfig(chunk_end_token_id=2).selection == "deviation"  # the default, from the quality benchmark
    config = UcmConfig.from_dict(_sparse(Blend={"chunk_end_token_id": 2, "selection": "mixed"}))
    assert config.blend.selection == "mixed"
    assert UcmConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UcmConfigError, match="Blend.selection"):
        UcmConfig.from_dict(_sparse(Blend={"chunk_end_token_id": 2, "selection": "attention"}))
