"""A Blend step runs vLLM's custom ops through the kernels an eager engine uses.

In vLLM's default mode custom ops are off (``custom_ops: none``) and IR ops prefer their
``native`` PyTorch code: Inductor fuses that code. A Blend step runs the model's plain
``forward`` eagerly, where the native code is a dozen small launches per norm or
rotary; :mod:`ucm.integration.vllm.eager_kernels` switches those ops to the platform's
kernels for the step and back after it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.compilation import CompilationMode  # noqa: E402

from ucm.integration.vllm import eager_kernels  # noqa: E402


def _default_mode_ops() -> torch.nn.Module:
    """A norm, an activation and a rotary embedding built as vLLM's default (compiled) mode builds them."""
    config = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE))
    assert config.compilation_config.custom_ops == ["none"]
    with set_current_vllm_config(config):
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.rotary_embedding import get_rope

        model = torch.nn.Module()
        model.norm = RMSNorm(64)
        model.act = SiluAndMul()
        model.rope = get_rope(16, max_position=128, is_neox_style=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return model


def test_rotary_runs_its_platform_kernel_during_the_step_and_native_after() -> None:
    model = _default_mode_ops()
    rope = model.rope
    assert eager_kernels.runs_native(rope)
    kernels = eager_kernels.EagerKernels.of(model)
    assert rope in kernels.ops
    with kernels.active():
        method = rope._forward_method
        assert getattr(method, "__func__", None) is type(rope).forward_cpu
    assert eager_kernels.runs_native(rope)


def test_ops_without_a_kernel_of_their_own_are_left_alone() -> None:
    model = _default_mode_ops()
    kernels = eager_kernels.EagerKernels.of(model)
    # RMSNorm has no CPU method of its own (CustomOp's default calls the native code;
    # its kernel choice is the IR op's): nothing to switch on this platform.
    assert model.norm not in kernels.ops
    with kernels.active():
        assert eager_kernels.runs_native(model.norm)


def test_the_switch_gives_the_same_rotary_output_in_float32() -> None:
    model = _default_mode_ops()
    rope = model.rope
    positions = torch.arange(7)
    q, k = torch.randn(7, 2 * 16), torch.randn(7, 16)
    want_q, want_k = rope(positions, q.clone(), k.clone())
    with eager_kernels.EagerKernels.of(model).active():
        got_q, got_k = rope(positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)


def test_restored_after_a_failing_step() -> None:
    model = _default_mode_ops()
    kernels = eager_kernels.EagerKernels.of(model)
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.active():
            raise RuntimeError("boom")
    assert eager_kernels.runs_native(model.rope)


def test_collected_once_per_model() -> None:
    model = _default_mode_ops()
    assert eager_kernels.EagerKernels.of(model) is eager_kernels.EagerKernels.of(model)


class _Impl:
    def __init__(self, supported: bool) -> None:
        self.supported = supported


class _FakeIrOp:
    """The part of vLLM's IrOp the switch uses: impls, get_priority, set_priority."""

    def __init__(self, impls: dict[str, bool], priority: list[str]) -> None:
        self.impls = {name: _Impl(ok) for name, ok in impls.items()}
        self.priority = priority
        self.seen: list[list[str]] = []

    def get_priority(self) -> list[str]:
        return list(self.priority)

    @contextlib.contextmanager
    def set_priority(self, priority: list[str]) -> Iterator[None]:
        before, self.priority = self.priority, priority
        self.seen.append(priority)
        try:
            yield
        finally:
            self.priority = before


def test_ir_ops_prefer_the_c_kernel_where_this_platform_has_it() -> None:
    on_gpu = _FakeIrOp({"native": True, "vllm_c": True, "oink": False}, ["native"])
    on_cpu = _FakeIrOp({"native": True, "vllm_c": False}, ["native"])
    chosen = _FakeIrOp({"native": True, "vllm_c": True}, ["vllm_c", "native"])
    kernels = eager_kernels.EagerKernels([], ir_ops={"a": on_gpu, "b": on_cpu, "c": chosen})
    with kernels.active():
        assert on_gpu.priority == ["vllm_c", "native"]
        assert on_cpu.priority == ["native"]
        assert chosen.priority == ["vllm_c", "native"]
    assert on_gpu.priority == ["native"]
    assert on_cpu.seen == [] and chosen.seen == []  # nothing to change: not touched
