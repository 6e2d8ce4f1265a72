"""Settings that only make sense against the model are refused at start, naming the key.

A check layer past the model's depth, a delimiter token outside its vocabulary or a
separator string without a tokenizer would otherwise run and silently do nothing.
The pure checks (``BlendConfig.check_model``) run on plain numbers; the vLLM entry
(``config_checks_vllm.check_config_for_vllm``) on fake vLLM config objects.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest

from ucm.config import BlendConfig, UcmConfig, UcmConfigError
from ucm.integration.vllm.config_checks_vllm import check_config_for_vllm

BLEND = "ucm_sparse_config.Blend"


def layer(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def blend_section(**section) -> BlendConfig:
    """A Blend section; ``chunk_end_token_id=2`` unless another delimiter is given."""
    if not {"blend_special_str", "separator_token_ids"} & set(section):
        section.setdefault("chunk_end_token_id", 2)
    return BlendConfig.from_dict(section)


def refusal(blend: BlendConfig, layers: int = 4, vocab: Optional[int] = 512, tokenizer: bool = True) -> UcmConfigError:
    with pytest.raises(UcmConfigError) as info:
        blend.check_model(num_layers=layers, vocab_size=vocab, has_tokenizer=tokenizer)
    return info.value


def test_check_layer_past_the_model_is_refused() -> None:
    err = refusal(blend_section(compute_meta={layer(99): {"ratio": 0.15}}))
    assert err.key == f"compute_meta.{layer(99)}"
    for word in ("not an attention layer of this model", "4 layers", "[0, 4)", layer(0), layer(3)):
        assert word in str(err), (word, str(err))


def test_one_bad_layer_among_good_ones_is_refused() -> None:
    """``{1: 0.3, 99: 0.15}`` used to run at 0.3 alone: layer 99 never came."""
    err = refusal(blend_section(compute_meta={layer(1): {"ratio": 0.3}, layer(99): {"ratio": 0.15}}))
    assert err.key == f"compute_meta.{layer(99)}"


def test_layer_equal_to_depth_is_refused_last_layer_is_fine() -> None:
    assert refusal(blend_section(compute_meta={layer(4): {"ratio": 0.1}})).key == f"compute_meta.{layer(4)}"
    blend_section(compute_meta={layer(3): {"ratio": 0.1}}).check_model(4, 512, True)
    blend_section(compute_meta={layer(0): {"ratio": 0.1}}).check_model(4, 512, True)


def test_chunk_end_token_outside_vocabulary_is_refused() -> None:
    err = refusal(blend_section(chunk_end_token_id=512))
    assert err.key == "chunk_end_token_id"
    for word in ("512", "vocabulary", "0..511", "never"):
        assert word in str(err), (word, str(err))
    blend_section(chunk_end_token_id=511).check_model(4, 512, True)


def test_separator_token_outside_vocabulary_is_refused() -> None:
    err = refusal(blend_section(separator_token_ids=[5, 70000]))
    assert err.key == "separator_token_ids[1]"
    assert "70000" in str(err) and "0..511" in str(err)
    blend_section(separator_token_ids=[5, 511]).check_model(4, 512, True)


def test_unknown_vocabulary_skips_the_token_check() -> None:
    blend_section(chunk_end_token_id=10**6).check_model(4, None, True)


def test_separator_string_without_tokenizer_is_refused() -> None:
    err = refusal(blend_section(blend_special_str="##"), tokenizer=False)
    assert err.key == "blend_special_str"
    for word in ("skip_tokenizer_init", "separator_token_ids", "tokenizer"):
        assert word in str(err), (word, str(err))
    blend_section(blend_special_str="##").check_model(4, 512, True)


# ---- the vLLM entry: facts read from vllm_config, full key paths --------------------------------------------


def fake_vllm_config(layers: int = 4, vocab: int = 512, skip_tokenizer_init: bool = False,
                     methods: bool = True) -> SimpleNamespace:
    """What the checks read of vLLM's config: with ModelConfig's methods, or only the HF text config."""
    hf = SimpleNamespace(num_hidden_layers=layers, vocab_size=vocab)
    model = SimpleNamespace(hf_text_config=hf, skip_tokenizer_init=skip_tokenizer_init)
    if methods:
        model.get_total_num_hidden_layers = lambda: layers
        model.get_vocab_size = lambda: vocab
    return SimpleNamespace(model_config=model)


def ucm(**section) -> UcmConfig:
    return UcmConfig.from_dict({"ucm_sparse_config": {"Blend": section}})


@pytest.mark.parametrize("methods", [True, False], ids=["model-config-methods", "hf-text-config"])
@pytest.mark.parametrize("section,skip,key", [
    ({"chunk_end_token_id": 2, "compute_meta": {layer(99): {"ratio": 0.15}}}, False,
     f"{BLEND}.compute_meta.{layer(99)}"),
    ({"chunk_end_token_id": 600}, False, f"{BLEND}.chunk_end_token_id"),
    ({"separator_token_ids": [600]}, False, f"{BLEND}.separator_token_ids[0]"),
    ({"blend_special_str": "##"}, True, f"{BLEND}.blend_special_str"),
], ids=["layer", "chunk-end", "separator", "special-str"])
def test_vllm_entry_refuses_with_full_key_path(section, skip, key, methods) -> None:
    with pytest.raises(UcmConfigError) as info:
        check_config_for_vllm(ucm(**section), fake_vllm_config(skip_tokenizer_init=skip, methods=methods))
    assert info.value.key == key
    assert str(info.value).startswith(key + ": ")


def test_vllm_entry_accepts_a_config_that_fits_the_model() -> None:
    check_config_for_vllm(ucm(chunk_end_token_id=2, compute_meta={layer(1): {"ratio": 0.3}, layer(3): {"ratio": 0.1}}),
                          fake_vllm_config())
    check_config_for_vllm(UcmConfig(), fake_vllm_config())  # no Blend section: nothing to check
