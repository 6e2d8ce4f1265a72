"""vLLM's custom ops on their platform kernels for the length of a Blend step.

In vLLM's default mode the model is compiled by Inductor, so vLLM turns its custom ops
off (``custom_ops: none``: each op's ``_forward_method`` is its PyTorch-native code) and
lets IR ops such as ``rms_norm`` prefer ``native``: Inductor fuses that code into a few
kernels. A Blend step cannot run the compiled graph (its rows shrink after the check
layer) and runs the model's plain ``forward`` eagerly instead (patch 4). Eagerly, the
native code is a dozen small launches per norm or rotary embedding, where
``enforce_eager=True`` would have picked one kernel each: on an H100 host that is tens
of microseconds of host time per op, every layer, on the request's critical path.

:class:`EagerKernels` holds, per model, the ops whose platform has a kernel of its own
and switches them to it while a Blend step runs (:meth:`EagerKernels.active`), restoring
vLLM's choice after it, failed step included. Every other step keeps the compiled path
untouched. The kernels are the ones an eager engine runs, so a Blend step computes what
it computes under ``enforce_eager``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

_ATTRIBUTE = "_ucm_eager_kernels"
_INSTANCES: "weakref.WeakSet[EagerKernels]" = weakref.WeakSet()
#: The IR-op provider of vLLM's C kernels, which an uncompiled engine puts before ``native``.
C_KERNELS = "vllm_c"


def _platform_method_name() -> Optional[str]:
    """The ``forward_*`` method vLLM dispatches an enabled custom op to on this platform
    (``CustomOp.dispatch_forward``), or None on a platform ucm does not run on."""
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        return "forward_hip"
    if current_platform.is_cpu():
        return "forward_cpu"
    if current_platform.is_cuda():
        return "forward_cuda"
    return None


def runs_native(op: Any) -> bool:
    """Whether a custom op dispatches to its PyTorch-native code (vLLM's choice when the
    op is disabled for Inductor)."""
    method = getattr(op, "_forward_method", None)
    native = getattr(type(op), "forward_native", None)
    return method is not None and native is not None and getattr(method, "__func__", method) is native


def _kernel_method(op: Any, name: str) -> Optional[Callable[..., Any]]:
    """``op``'s platform method where its class defines one of its own (CustomOp's
    defaults just call the native code), else None."""
    from vllm.model_executor.custom_op import CustomOp

    own = getattr(type(op), name, None)
    if own is None or own is getattr(CustomOp, name, None):
        return None
    return getattr(op, name)


class EagerKernels:
    """The custom ops of one model that a Blend step switches to their kernels, and the IR
    ops whose priority it puts the C kernels first in."""

    def __init__(self, ops: list[tuple[Any, Callable[..., Any]]], ir_ops: Optional[Mapping[str, Any]] = None) -> None:
        self._switches = ops
        self.ops = [op for op, _ in ops]
        self._ir_ops = dict(ir_ops) if ir_ops is not None else _registered_ir_ops()
        self.steps = 0  # Blend steps run with the switch on
        _INSTANCES.add(self)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "EagerKernels":
        """The switches of ``model``'s modules, collected once per model."""
        found = getattr(model, _ATTRIBUTE, None)
        if found is None:
            found = cls(_switchable_ops(model))
            setattr(model, _ATTRIBUTE, found)
            logger.info("ucm Blend: steps run %d custom ops on their kernels (%s) and IR ops %s with %s first",
                        len(found.ops), ", ".join(sorted({type(op).__name__ for op in found.ops})) or "none",
                        ", ".join(sorted(found._ir_ops)) or "none", C_KERNELS)
        return found

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """For one Blend step: every collected op on its kernel, IR ops with C kernels first."""
        with contextlib.ExitStack() as stack:
            for ir_op in self._ir_ops.values():
                priority = _c_kernels_first(ir_op)
                if priority is not None:
                    stack.enter_context(ir_op.set_priority(priority))
            before = [op._forward_method for op in self.ops]
            stack.callback(self._restore, before)
            for op, kernel in self._switches:
                op._forward_method = kernel
            self.steps += 1
            yield

    def _restore(self, before: list[Callable[..., Any]]) -> None:
        for op, method in zip(self.ops, before):
            op._forward_method = method


def _switchable_ops(model: torch.nn.Module) -> list[tuple[Any, Callable[..., Any]]]:
    name = _platform_method_name()
    if name is None:
        return []
    from vllm.model_executor.custom_op import CustomOp

    out = []
    for module in model.modules():
        if isinstance(module, CustomOp) and runs_native(module):
            kernel = _kernel_method(module, name)
            if kernel is not None:
                out.append((module, kernel))
    return out


def _registered_ir_ops() -> dict[str, Any]:
    """vLLM's IR ops (``vllm.ir``: rms_norm, fused_add_rms_norm, ...); none in a vLLM without them."""
    try:
        from vllm.ir.op import IrOp
    except ImportError:
        return {}
    return dict(IrOp.registry)


def _c_kernels_first(ir_op: Any) -> Optional[list[str]]:
    """The op's priority with the C kernels first, where this platform has them and they
    are not first already; else None (left as it is)."""
    impl = ir_op.impls.get(C_KERNELS)
    if impl is None or not impl.supported:
        return None
    current = ir_op.get_priority()
    if current[:1] == [C_KERNELS]:
        return None
    return [C_KERNELS] + [p for p in current if p != C_KERNELS] + ([] if "native" in current else ["native"])


def summary() -> dict[str, Any]:
    """What this process switched: Blend steps run on kernels and the op classes switched
    (for tests and diagnostics)."""
    found = list(_INSTANCES)
    return {"steps": sum(k.steps for k in found),
            "ops": sorted({type(op).__name__ for k in found for op in k.ops})}
