"""Start-time refusals without an engine: architectures by name, decoder layers by class,
and the patch that checks the loaded model once the KV caches are registered."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ucm.config_checks import UcmConfigError
from ucm.integration.vllm import startup_checks


def _model_config(*archs: str, impl: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(model="m", hf_config=SimpleNamespace(architectures=list(archs)), model_impl=impl)


def test_architectures_by_name():
    for arch in startup_checks.SUPPORTED_ARCHITECTURES:
        startup_checks.check_architecture(_model_config(arch))
    with pytest.raises(UcmConfigError, match="unsupported model 'm' .*PhiForCausalLM.*Qwen3ForCausalLM"):
        startup_checks.check_architecture(_model_config("PhiForCausalLM"))
    with pytest.raises(UcmConfigError, match="model_impl"):
        startup_checks.check_architecture(_model_config("LlamaForCausalLM", impl="transformers"))


def _model(layer_cls: type, module: str = "vllm.model_executor.models.fake") -> torch.nn.Module:
    cls = type(layer_cls.__name__, (layer_cls,), {"__module__": module})
    layer = cls()
    layer.post_attention_layernorm = torch.nn.Identity()
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([layer])
    return model


class LlamaDecoderLayer(torch.nn.Module):
    pass


class PhiDecoderLayer(torch.nn.Module):
    pass


def test_decoder_layers_by_class_and_origin():
    startup_checks.check_decoder_layers(_model(LlamaDecoderLayer))
    with pytest.raises(UcmConfigError, match="unsupported model.*PhiDecoderLayer is not supported.*LlamaForCausalLM"):
        startup_checks.check_decoder_layers(_model(PhiDecoderLayer))
    with pytest.raises(UcmConfigError, match="transformers.models.llama.LlamaDecoderLayer is not supported"):
        startup_checks.check_decoder_layers(_model(LlamaDecoderLayer, "transformers.models.llama"))
    with pytest.raises(UcmConfigError, match="unsupported model Module: it has no model.layers"):
        startup_checks.check_decoder_layers(torch.nn.Module())


def test_kv_cache_init_refuses_the_loaded_model_and_leaves_no_agent(monkeypatch):
    from ucm.integration.vllm import patches
    from ucm.sparse import state

    agent = SimpleNamespace(last_layer=-1)
    runner = SimpleNamespace(model=_model(PhiDecoderLayer))
    init = patches._wrap_initialize_kv_cache(lambda self: state.set_sparse_agent(agent))
    monkeypatch.setattr(state, "_AGENT", None)
    with pytest.raises(UcmConfigError, match="PhiDecoderLayer"):
        init(runner)
    assert state.get_sparse_agent() is None
    runner.model = _model(LlamaDecoderLayer)
    init(runner)  # a supported model: hooks installed at start, before any forward
    assert runner.model._ucm_layer_hooks and agent.last_layer == 0
