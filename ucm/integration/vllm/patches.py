"""Every point where ucm patches vLLM, in one place.

Applied only when ENABLE_SPARSE is on (by the plugin entry point, in every engine
process), and only on a vLLM version listed in :data:`SUPPORTED_VERSIONS`; any
other version is refused with a clear error instead of being patched blindly.
Each patch calls the ``maybe_execute_*`` helpers of :mod:`ucm.sparse.state`, which
return their inputs untouched when no sparse agent is set, so a patched engine
without a Blend request runs the original code path.

Patch points:

0. ``GPUModelRunner.initialize_kv_cache`` (CPUModelRunner calls it): once the worker's
   connector has registered the KV caches and installed the agent, check the loaded
   model's decoder layers and install (2), so an unsupported model fails the engine's
   start, not its first request.
1. ``GPUModelRunner._model_forward`` (classic model runner; CPUModelRunner inherits
   it): tell the agent the batch's request order and positions before the model
   runs (and install (2) if (0) did not). A Blend step that fails is abandoned and the
   batch runs again as a plain prefill (:func:`_blend_forward`): after start, no ucm
   error takes the engine down.
2. Each decoder layer's ``forward`` (instance-level, for models whose layers live in
   ``model.layers`` with the ``(positions, hidden_states, residual)`` signature:
   Llama, Mistral, Qwen2, Qwen3): restore the full batch after the last layer; and
   its ``post_attention_layernorm.forward``: shrink to the kept rows inside a check
   layer, before its MLP (these layers all call that norm as
   ``(attention_output, residual)`` right before the MLP).
3. ``Attention.forward``: let the agent compute the attention of the kept rows
   instead of the backend.
4. ``GPUModelRunner.execute_model`` and ``_determine_batch_execution_and_padding``: a
   step whose connector metadata carries Blend work runs with ``force_eager`` (no CUDA
   graph, no padding rows), and patch 1 runs its model call with ``skip_compiled`` (the
   plain ``forward``, where patches 2 and 3 act). Every other step keeps vLLM's compiled
   and CUDA-graph path untouched; patches 2 and 3 step aside while Dynamo traces them.
   For that eager call only, the model's custom ops with a platform kernel run it, and IR
   ops put vLLM's C kernels first, as under ``enforce_eager`` (default mode leaves them
   native for Inductor to fuse; :mod:`eager_kernels`).
5. ``BaseRenderer._tokenize_prompt`` (API server): a text prompt holding
   ``blend_special_str`` is tokenized part by part (:mod:`text_prompts`), so a chunk's
   tokens do not depend on its neighbours.
6. ``InputProcessor._validate_params`` (API server): a per-request ucm argument that
   cannot be used is refused at admission, a 400 (:mod:`request_checks`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from ucm.engine.host_time import HOST_TIMES
from ucm.integration.vllm.eager_kernels import EagerKernels
from ucm.integration.vllm.startup_checks import SUPPORTED_DECODER_LAYERS, check_decoder_layers, decoder_layers
from ucm.sparse import state

logger = logging.getLogger(__name__)

# vLLM version prefix -> module of the ``Attention`` layer class.
SUPPORTED_VERSIONS = {
    "0.32.": "vllm.model_executor.layers.attention.attention",
    "0.26.": "vllm.model_executor.layers.attention.attention",
}
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_APPLIED = False
__all__ = ["SUPPORTED_DECODER_LAYERS", "apply_patches", "check_attention_layer", "install_layer_hooks"]


@dataclass(frozen=True)
class PatchPoint:
    module: str
    owner: str
    attribute: str
    make: Callable[[Callable], Callable]


def check_vllm_version(version: str) -> str:
    """The attention module for ``version``; refuses unsupported versions loudly."""
    for prefix, module in SUPPORTED_VERSIONS.items():
        if version.startswith(prefix):
            return module
    raise RuntimeError(
        f"ucm sparse patches support vLLM {', '.join(p + 'x' for p in SUPPORTED_VERSIONS)}; "
        f"found vLLM {version}. Unset ENABLE_SPARSE to run without Blend."
    )


def _wrap_initialize_kv_cache(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_kv_cache(self, *args: Any, **kwargs: Any):
        original(self, *args, **kwargs)
        agent = state.get_sparse_agent()
        if agent is not None and getattr(self, "model", None) is not None:
            try:
                install_layer_hooks(self.model, agent)
            except BaseException:
                state.set_sparse_agent(None)  # the engine does not start; leave no agent behind
                raise

    return initialize_kv_cache


def _wrap_execute_model(original: Callable) -> Callable:
    """Note, before vLLM picks the step's CUDA-graph mode and padding, whether the step
    carries Blend work (patch point 4 reads it)."""
    @functools.wraps(original)
    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        meta = getattr(scheduler_output, "kv_connector_metadata", None)
        self._ucm_blend_step = bool(getattr(meta, "blend_active", False))
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            self._ucm_blend_step = False

    return execute_model


def _wrap_batch_execution(original: Callable) -> Callable:
    """A step with Blend work runs without CUDA graphs and without padding rows: Blend
    changes how many rows each layer computes, which a captured graph cannot."""
    @functools.wraps(original)
    def determine(self, *args: Any, **kwargs: Any):
        if getattr(self, "_ucm_blend_step", False):
            kwargs["force_eager"] = True
        return original(self, *args, **kwargs)

    return determine


@contextlib.contextmanager
def _plain_model_forward() -> Iterator[None]:
    """Run the model's plain (uncompiled) ``forward`` for this call: vLLM's
    ``ForwardContext.skip_compiled``, which its compile decorator honours. The Blend
    hooks live in Python code that a compiled graph has traced past."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        yield
        return
    context = get_forward_context()
    before = context.skip_compiled
    context.skip_compiled = True
    try:
        yield
    finally:
        context.skip_compiled = before


def _wrap_model_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def _model_forward(self, *args: Any, **kwargs: Any):
        agent = state.get_sparse_agent()
        if agent is None:
            return original(self, *args, **kwargs)
        install_layer_hooks(self.model, agent)
        if agent.idle_forward(kwargs.get("positions")):
            # Nothing to load, blend, save or time (a decode step): vLLM's path, no
            # bookkeeping. Most steps are these.
            return original(self, *args, **kwargs)
        start = HOST_TIMES.start()
        try:
            return _blend_forward(agent, lambda: original(self, *args, **kwargs), self.input_batch,
                                  kwargs.get("positions"))
        finally:
            HOST_TIMES.add("forward", start)

    return _model_forward


def _blend_forward(agent: Any, forward: Callable[[], Any], input_batch: Any, positions: Any) -> Any:
    """One forward under the agent; if its Blend step fails, the same batch again as a
    plain prefill.

    Every row of the batch is a scheduled token, so the plain run rewrites whatever KV
    the failed attempt (or its chunk loads) left in those rows' cache slots; prefix
    blocks loaded before the step are not scheduled rows and stay. A failure outside a
    Blend step (the agent did nothing) is vLLM's own and is raised.
    """
    from ucm.integration.vllm.blend_agent import BatchInfo

    try:
        state.maybe_execute_begin(BatchInfo(list(input_batch.req_ids[:input_batch.num_reqs]), positions))
        if agent.step is None:
            out = forward()  # no Blend work: vLLM's compiled / CUDA-graph path, untouched
        else:
            kernels: Optional[EagerKernels] = getattr(agent, "step_kernels", None)  # set by install_layer_hooks
            with _plain_model_forward(), kernels.active() if kernels is not None else contextlib.nullcontext():
                out = forward()
    except Exception as exc:  # noqa: BLE001 - a cache must not take the engine down
        if not agent.abandon_step(exc):
            agent.execute_finished(torch.empty(0))
            raise
        try:
            return forward()
        finally:
            agent.execute_finished(torch.empty(0))
    state.maybe_execute_finished(torch.empty(0))
    return out


def _wrap_attention_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, query, key, value, *args: Any, **kwargs: Any):
        if torch.compiler.is_compiling():  # traced into a compiled graph: never a Blend step
            return original(self, query, key, value, *args, **kwargs)
        out = state.maybe_execute_attention_forward(self, query, key, value)
        if out is None:
            return original(self, query, key, value, *args, **kwargs)
        return out

    return forward


def install_layer_hooks(model: torch.nn.Module, agent: Any) -> None:
    """Wrap each decoder layer's forward once per model instance (patch point 2),
    after refusing a model whose layers the hooks do not know."""
    if getattr(model, "_ucm_layer_hooks", False):
        return
    check_decoder_layers(model)
    layers, end = decoder_layers(model)
    for index, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        layer.forward = _wrap_layer(layer.forward, index)
        norm = layer.post_attention_layernorm
        norm.forward = _wrap_post_attention_norm(norm.forward)
    agent.last_layer = end - 1
    # Collected (and logged) once, at start: a Blend step only switches them.
    agent.step_kernels = EagerKernels.of(model.model) if getattr(agent, "eager_kernels", True) else None
    model._ucm_layer_hooks = True


def check_attention_layer(name: str, layer: Any) -> None:
    """Refuse, at start, an attention layer whose features Blend's exact-mask attention lacks."""
    impl = getattr(layer, "impl", None)
    for attr in ("sliding_window", "logits_soft_cap", "alibi_slopes"):
        value = getattr(impl, attr, None)
        if value not in (None, 0, 0.0, -1, (-1, -1)):
            raise RuntimeError(f"ucm Blend: attention layer {name} uses {attr}={value!r}, which Blend's "
                               "exact-mask attention does not implement")


def _wrap_layer(original: Callable, index: int) -> Callable:
    @functools.wraps(original)
    def forward(positions, hidden_states, residual, *args: Any, **kwargs: Any):
        # Traced into a compiled graph: never a Blend step. Outside one, a step without
        # Blend work (eager decode) runs the layer as it is.
        if torch.compiler.is_compiling() or not state.step_active():
            return original(positions, hidden_states, residual, *args, **kwargs)
        positions, hidden_states, residual = state.maybe_execute_layer_begin(index, positions, hidden_states, residual)
        hidden_states, residual = original(positions, hidden_states, residual, *args, **kwargs)
        _, hidden_states, residual = state.maybe_execute_layer_finished(index, positions, hidden_states, residual)
        return hidden_states, residual

    return forward


def _wrap_post_attention_norm(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(hidden_states, residual=None, *args: Any, **kwargs: Any):
        if residual is not None and not torch.compiler.is_compiling() and state.step_active():
            hidden_states, residual = state.maybe_execute_before_mlp(hidden_states, residual)
        return original(hidden_states, residual, *args, **kwargs)

    return forward


def _wrap_tokenize_prompt(original: Callable) -> Callable:
    """Patch 5, ``BaseRenderer._tokenize_prompt`` (the API server's text -> ids step, completions
    and rendered chat alike): with ``blend_special_str`` configured, a text holding it is
    tokenized part by part, so its chunks hit (:mod:`ucm.integration.vllm.text_prompts`)."""
    @functools.wraps(original)
    def _tokenize_prompt(self, prompt: Any, params: Any):
        from ucm.integration.vllm.text_prompts import tokenize_blend_prompt

        ids = tokenize_blend_prompt(self, prompt, params)
        return original(self, prompt, params) if ids is None else self._build_tokens_prompt(ids, prompt)

    return _tokenize_prompt


def _wrap_validate_params(original: Callable) -> Callable:
    """Patch 6, ``InputProcessor._validate_params`` (the API server's request admission): a
    ``ucm_blend_ratio`` that cannot be used is refused with a 400 instead of being ignored in
    the scheduler (:mod:`ucm.integration.vllm.request_checks`)."""
    @functools.wraps(original)
    def _validate_params(self, params: Any, *args: Any, **kwargs: Any):
        from ucm.integration.vllm.request_checks import check_request_params

        result = original(self, params, *args, **kwargs)
        check_request_params(params)
        return result

    return _validate_params


def patch_points(attention_module: str) -> list[PatchPoint]:
    return [
        PatchPoint(RUNNER_MODULE, "GPUModelRunner", "initialize_kv_cache", _wrap_initialize_kv_cache),
        PatchPoint(RUNNER_MODULE, "GPUModelRunner", "_model_forward", _wrap_model_forward),
        PatchPoint(attention_module, "Attention", "forward", _wrap_attention_forward),
        PatchPoint(RUNNER_MODULE, "GPUModelRunner", "execute_model", _wrap_execute_model),
        PatchPoint(RUNNER_MODULE, "GPUModelRunner", "_determine_batch_execution_and_padding", _wrap_batch_execution),
        PatchPoint("vllm.renderers.base", "BaseRenderer", "_tokenize_prompt", _wrap_tokenize_prompt),
        PatchPoint("vllm.v1.engine.input_processor", "InputProcessor", "_validate_params", _wrap_validate_params),
    ]


def apply_patches() -> None:
    """Apply every class-level patch point once per process."""
    global _APPLIED
    if _APPLIED:
        return
    import vllm

    attention_module = check_vllm_version(vllm.__version__)
    for point in patch_points(attention_module):
        owner = getattr(importlib.import_module(point.module), point.owner)
        original = getattr(owner, point.attribute)
        if getattr(original, "_ucm_patched", False):
            continue
        patched = point.make(original)
        patched._ucm_patched = True
        setattr(owner, point.attribute, patched)
        logger.info("ucm: patched %s.%s.%s", point.module, point.owner, point.attribute)
    _APPLIED = True


def patches_applied() -> bool:
    return _APPLIED
