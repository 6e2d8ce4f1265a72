"""What ucm cannot run is refused while the engine starts (``LLM(...)`` raises), never at
the first request: unsupported architectures, bad ucm environment switches.

All refusals run in one engine process, one ``LLM(...)`` after another (a refused
start leaves nothing behind), to pay vLLM's import once.
"""

from __future__ import annotations

import pytest

from tests.tiny_models import build_tiny_model
from tests.vllm.conftest import blend_config, run_engine

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
BAD_ENV = [
    ("UCM_LOAD_KERNEL", "banana", ("auto", "torch", "triton")),
    ("UCM_ROPE_KERNEL", "banana", ("auto", "torch", "triton")),
    ("UCM_BLEND_ATTENTION", "banana", ("auto", "triton", "flex", "cudnn", "sdpa")),
    # CPU without TRITON_INTERPRET (run_engine clears it): Triton cannot run here.
    ("UCM_LOAD_KERNEL", "triton", ("TRITON_INTERPRET",)),
    ("UCM_ROPE_KERNEL", "triton", ("TRITON_INTERPRET",)),
    ("UCM_BLEND_ATTENTION", "triton", ("TRITON_INTERPRET",)),
]


@pytest.fixture(scope="module")
def refusals(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("unsupported_models")
    llama = str(tiny_models["llama"])
    attempts = [{"model": str(build_tiny_model(arch, root)), "ucm": blend_config()} for arch in ("phi", "gpt2")]
    attempts += [{"model": llama, "ucm": blend_config(), "env": {name: value}} for name, value, _ in BAD_ENV]
    out = run_engine({"start_errors": attempts}, tmp_path_factory.mktemp("refusals"))["start_errors"]
    return {"phi": out[0], "gpt2": out[1], "env": out[2:]}


def test_unsupported_architectures_are_refused_at_start(refusals):
    for arch, hf_name in (("phi", "PhiForCausalLM"), ("gpt2", "GPT2LMHeadModel")):
        error = refusals[arch].get("error", "")
        assert "unsupported model" in error and hf_name in error, (arch, refusals[arch])
        assert all(name in error for name in SUPPORTED), error


def test_bad_env_switches_are_refused_at_start(refusals):
    for (name, value, allowed), result in zip(BAD_ENV, refusals["env"]):
        error = result.get("error", "")
        assert name in error and repr(value) in error, (name, value, result)
        assert all(word in error for word in allowed), (name, value, error)
