"""Attention for an arbitrary subset of query rows with an exact causal mask by position.

After Blend's check layer only the selected rows are computed, but they attend over the
whole context (selected rows' fresh KV, everyone else's cached KV). Which keys a query
may see must follow *true positions*: key j is visible to query i iff
``k_pos[j] <= q_pos[i]``. The usual bottom-right-aligned causal mask of a paged
backend (treating the nq queries as the last nq tokens) would let a selected token in
the middle of the prompt see keys after it, which changes its output.

Layout-free on purpose: callers gather a request's K/V (from a paged cache or
wherever) into ``[tokens, kv_heads, head_dim]`` tensors first.

Two entry points:

* :class:`ExactMaskAttention` -- ``plan = ExactMaskAttention.prepare(q_pos, k_pos, Hq,
  Hkv, device)`` once per selection, then ``plan(q, k, v, scale)`` for every layer. The
  mask work (FlexAttention block mask, dense masks) is done once and reused, since the
  selection stays the same for all layers after the check layer.
* :func:`causal_attention_by_position` -- the one-shot functional form.

Backends (``UCM_BLEND_ATTENTION`` = ``auto`` | ``triton`` | ``flex`` | ``cudnn`` | ``sdpa``,
or the ``backend`` argument):

* ``triton`` (:func:`ucm.sparse.blend.paged_backend.run_paged_batch`): :mod:`paged_attention`,
  reading the paged cache through the block tables (no gathered context), every request
  of a step in one launch; ``auto`` takes it on CUDA where it applies, and the plans
  below serve as its fallback.

* ``flex``: ``torch.nn.attention.flex_attention``, compiled, with a block-sparse mask
  built from per-block position ranges (blocks entirely before the query block skip
  the mask, blocks entirely after it are skipped).
* ``cudnn``: SDPA restricted to cuDNN attention with a dense additive mask and GQA.
* ``sdpa``: the reference: SDPA with a boolean mask and repeated KV heads. It defines
  what is correct; the others are checked against it on their first use in a process.

``auto`` on CUDA is flex, then cudnn, then sdpa -- cudnn first for small problems (below
:data:`FLEX_MIN_PAIRS` query-key pairs), where flex's launch overhead dominates -- and
sdpa elsewhere. A backend that raises or disagrees with the reference is logged once,
given up for the process, and the next one is used: never silently wrong.

Pure torch; never imports vLLM.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from ucm.kernel_choice import KernelChoice
from ucm.sparse.blend.flex_mask import _POS_SENTINEL, _flex_fn, build_block_mask
from ucm.sparse.blend.transfer import to_device

logger = logging.getLogger(__name__)

ENV_VAR = "UCM_BLEND_ATTENTION"
BACKENDS = ("flex", "cudnn", "sdpa")
"""Fallback order: each backend falls back to the ones after it."""

FLEX_MIN_PAIRS = 1 << 22
"""``auto`` prefers flex from this many query-key pairs (nq * nk) up, cuDNN below.

H100, torch 2.11, Llama-3-8B layer (benchmarks/attention_gpu.py, GPU time): flex was the
fastest exact backend from 4K context x 30% rows up (0.61-0.89x of the approximate
bottom-right FlashAttention call, cuDNN 0.98-1.15x), but costs ~0.2-0.3 ms of host
time per call (dynamo guards) against ~0.1 ms for cuDNN; below ~4M pairs the two are
within a few percent on the GPU (4K x 5%: cuDNN 0.106 ms, flex 0.128 ms), so the
cheaper launch wins there.
"""

PAGED = "triton"
"""``UCM_BLEND_ATTENTION=triton``: the paged kernel (:mod:`paged_backend`), which reads the
paged cache through the block table; ``auto`` uses it on CUDA for caches it supports."""

KERNEL = KernelChoice(ENV_VAR, ("auto", PAGED) + BACKENDS, kernel=PAGED,
                      module_name="ucm.sparse.blend.paged_attention",
                      label="paged Triton attention kernel", fallback="the gathered context")
"""``UCM_BLEND_ATTENTION``, and the paged kernel's import and give-up (:mod:`paged_backend`)."""

_BROKEN: dict[str, str] = {}
"""Gathered-context backend -> why it was given up in this process (so later plans skip it)."""
_VERIFIED: set[str] = set()
"""Backends whose first output in this process matched the reference."""


class BackendMismatch(RuntimeError):
    """A fast backend's output disagreed with the reference on its first use."""


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool ``[nq, nk]``: True where query i may attend to key j (``k_pos[j] <= q_pos[i]``)."""
    return k_pos[None, :] <= q_pos[:, None]


# ------------------------------------------------------------------------------ checks
def _check_heads(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads {num_q_heads} must be a multiple of kv heads {num_kv_heads}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nq: int, nk: int,
                  num_q_heads: int, num_kv_heads: int) -> None:
    """Shape checks shared by the plan and the functional form (errors name the culprit)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [nq, Hq, D], k and v [nk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]} "
                         "with equal head_dim")
    if q.shape[:2] != (nq, num_q_heads) or k.shape[:2] != (nk, num_kv_heads):
        raise ValueError(f"plan is for q_pos [{nq}] x {num_q_heads} heads and k_pos [{nk}] x "
                         f"{num_kv_heads} heads; got q {tuple(q.shape)}, k {tuple(k.shape)}")


# ---------------------------------------------------------------------- backend choice
def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: the argument, else ``$UCM_BLEND_ATTENTION``, else auto;
    a value that is none of them is refused (checked at engine start too)."""
    return KERNEL.parse(backend) if backend else KERNEL.mode()


def backend_chain(backend: Optional[str], device: torch.device, pairs: int = 0) -> list[str]:
    """Backends to try in order, for a problem of ``pairs = nq * nk``.

    ``auto`` on CUDA: flex, cudnn, sdpa from :data:`FLEX_MIN_PAIRS` pairs up, and cudnn,
    flex, sdpa below (where cuDNN measured faster); sdpa elsewhere. An explicit choice is
    honoured on any device where it can run (flex runs eagerly on CPU, which is how the
    tests compare it with the reference), then falls back down :data:`BACKENDS`.
    """
    name = requested_backend(backend)
    if name == PAGED:  # the paged kernel's fallback over a gathered context
        name = "auto"
    cuda = device.type == "cuda"
    if name == "auto" and cuda and pairs < FLEX_MIN_PAIRS:
        chain = ["cudnn", "flex", "sdpa"]
    else:
        if name == "auto":
            name = "flex" if cuda else "sdpa"
        chain = list(BACKENDS[BACKENDS.index(name):])
    if not cuda and "cudnn" in chain:
        if name == "cudnn":
            _warn_once("cudnn-cpu", "cuDNN attention needs CUDA (device %s); using sdpa", device)
        chain.remove("cudnn")
    usable = [b for b in chain if b not in _BROKEN or b == "sdpa"]
    return usable


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


_WARNED: set[str] = set()


# ------------------------------------------------------------------------------- plan
class ExactMaskAttention:
    """Exact-by-position attention for one selection, reusable across layers.

    Prepare once per (q_pos, k_pos) with :meth:`prepare`, then call it per layer with
    that layer's ``q [nq, Hq, D]``, ``k, v [nk, Hkv, D]`` and softmax scale; returns
    ``[nq, Hq, D]`` in q's dtype. GQA: query head h reads KV head ``h // (Hq // Hkv)``.
    Rows and keys may come in any order; only the positions decide visibility. Every
    query must see at least one key (normally its own), else its row is NaN.
    """

    def __init__(self, q_pos: torch.Tensor, k_pos: torch.Tensor, num_q_heads: int,
                 num_kv_heads: int, device: torch.device, chain: list[str],
                 compile_flex: Optional[bool], max_position: Optional[int] = None) -> None:
        self.q_pos = q_pos
        self.k_pos = k_pos
        self.max_position = max_position
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.compile_flex = (device.type == "cuda") if compile_flex is None else compile_flex
        self._chain = chain
        self._state: Any = None
        self._masks: dict[torch.dtype, torch.Tensor] = {}
        self._setup()

    @classmethod
    def prepare(cls, q_pos: torch.Tensor, k_pos: torch.Tensor, num_q_heads: int,
                num_kv_heads: int, device: Union[torch.device, str, None] = None,
                backend: Optional[str] = None, compile_flex: Optional[bool] = None,
                max_position: Optional[int] = None) -> "ExactMaskAttention":
        """Plan for queries at ``q_pos [nq]`` over keys at ``k_pos [nk]`` (int positions).

        ``device``: where q/k/v will live (default: q_pos's device). ``backend``: auto |
        flex | cudnn | sdpa, default ``$UCM_BLEND_ATTENTION`` or auto. ``compile_flex``: compile
        flex_attention (default: on CUDA only; eager flex on CPU is for tests).
        ``max_position``: an upper bound of every position, if the caller knows one; the
        flex plan then need not read the largest position back from the device.
        """
        _check_heads(num_q_heads, num_kv_heads)
        if q_pos.dim() != 1 or k_pos.dim() != 1:
            raise ValueError(f"q_pos and k_pos must be 1-D; got {tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
        dev = torch.device(device) if device is not None else q_pos.device
        q_pos = to_device(q_pos, dev).long()
        k_pos = to_device(k_pos, dev).long()
        chain = backend_chain(backend, dev, q_pos.numel() * k_pos.numel())
        return cls(q_pos, k_pos, num_q_heads, num_kv_heads, dev, chain, compile_flex, max_position)

    @property
    def backend(self) -> str:
        """The backend this plan uses now (it may move down the chain on failure)."""
        return self._chain[0]

    # -- setup per backend (once per selection) -----------------------------------
    def _setup(self) -> None:
        while True:
            try:
                self._state = getattr(self, f"_setup_{self.backend}")()
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "use the next one"
                self._give_up(exc)

    def _setup_flex(self) -> Any:
        top = self.max_position
        if top is None:
            top = max(int(self.q_pos.max()) if self.q_pos.numel() else 0,
                      int(self.k_pos.max()) if self.k_pos.numel() else 0)
        if top >= _POS_SENTINEL:
            raise ValueError(f"positions must be below {_POS_SENTINEL} for flex")
        return build_block_mask(self.q_pos, self.k_pos)

    def _setup_sdpa(self) -> Any:
        return position_mask(self.q_pos, self.k_pos)

    _setup_cudnn = _setup_sdpa  # the same boolean mask; _additive_mask derives cuDNN's from it

    def _give_up(self, exc: BaseException) -> None:
        """Log once, remember the backend as broken, move to the next one."""
        name = self.backend
        if name == "sdpa":
            raise exc
        _BROKEN[name] = f"{type(exc).__name__}: {exc}"
        fallback = self._chain[1]
        _warn_once(f"broken:{name}", "ucm Blend attention: backend %r failed (%s); falling back to %r",
                   name, _BROKEN[name][:500], fallback)
        self._chain = self._chain[1:]
        self._masks.clear()

    # -- per layer ---------------------------------------------------------------
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        _check_inputs(q, k, v, self.q_pos.numel(), self.k_pos.numel(), self.num_q_heads,
                      self.num_kv_heads)
        if q.shape[0] == 0:
            return q.new_empty(q.shape)
        while True:
            name = self.backend
            try:
                out = getattr(self, f"_run_{name}")(q, k, v, scale)
                if name != "sdpa" and name not in _VERIFIED:
                    self._verify(out, q, k, v, scale)
                    _VERIFIED.add(name)
                return out
            except Exception as exc:  # noqa: BLE001
                if name == "sdpa":
                    raise
                self._give_up(exc)
                self._setup()

    def _run_flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        block_mask = self._state
        nq, nq_pad = q.shape[0], block_mask.seq_lengths[0]
        if nq_pad != nq:
            padded = q.new_zeros((nq_pad,) + tuple(q.shape[1:]))
            padded[:nq] = q
            q = padded
        fn = _flex_fn(self.compile_flex)
        args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask, scale,
                self.num_q_heads != self.num_kv_heads)
        if self.compile_flex:
            out = fn(*args)  # once per layer on the request path: no warnings context here
        else:
            with warnings.catch_warnings():
                # eager flex (CPU tests) warns that it is unfused; that is the point there
                warnings.simplefilter("ignore", UserWarning)
                out = fn(*args)
        return out[0, :, :nq].transpose(0, 1)

    def _additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """0 / -inf mask in the compute dtype, made once per dtype: SDPA would otherwise
        convert the boolean mask on every call."""
        mask = self._masks.get(dtype)
        if mask is None:
            allowed = self._state
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            mask.masked_fill_(~allowed, float("-inf"))
            mask = self._masks[dtype] = mask[None, None]
        return mask

    def _run_cudnn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=self._additive_mask(q.dtype), scale=scale,
                enable_gqa=self.num_q_heads != self.num_kv_heads)
        return out[0].transpose(0, 1)

    def _run_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return _sdpa_reference(q, k, v, self._state, scale)

    def _verify(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> None:
        """First use of a fast backend in this process: compare up to 64 rows with the
        reference, so a broken kernel or mask shows up as a fallback, not as bad text."""
        _check_against_reference(self.backend, out, q, self.q_pos, k, v, self.k_pos, scale)


def _check_against_reference(name: str, out: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor,
                             k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, scale: float) -> None:
    """Raise :class:`BackendMismatch` unless up to 64 rows of ``out`` match the reference."""
    nq = q.shape[0]
    rows = torch.linspace(0, nq - 1, min(nq, 64), device=q.device).round().long().unique()
    mask = position_mask(q_pos[rows], k_pos)
    ref = _sdpa_reference(q[rows].float(), k.float(), v.float(), mask, scale)
    got = out[rows].float()
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if q.dtype == torch.float32:
        tol = 5e-3 if q.is_cuda else 1e-4  # TF32 matmuls on GPU
    else:
        tol = 2e-2
    if not err <= tol:  # also catches NaN
        raise BackendMismatch(f"{name} differs from the reference: relative error "
                              f"{err:.3g} > {tol:g} on {rows.numel()} rows")
    logger.info("ucm Blend attention: backend %s verified against the reference "
                "(relative error %.2g)", name, err)


def _sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """The definition of correct: SDPA with the boolean mask, KV heads repeated.

    Expands the KV heads instead of enable_gqa: with a boolean mask, torch's GQA path
    falls back to the "math" kernel on CUDA, which materializes fp32 scores (8 GiB for
    1.3K x 8K x 32 heads) and ran out of memory at 8K tokens.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, nq, D]
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
    )
    return out[0].transpose(0, 1)


def causal_attention_by_position(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Softmax attention of ``q [nq, Hq, D]`` over ``k, v [nk, Hkv, D]``; returns ``[nq, Hq, D]``.

    GQA: ``Hq`` must be a multiple of ``Hkv``; query head h reads KV head
    ``h // (Hq // Hkv)`` (the grouping of HF ``repeat_kv`` and vLLM). Rows and keys
    may come in any order; only the positions decide visibility.

    Every query must see at least one key (normally its own, so ``k_pos`` should
    contain each ``q_pos``); a query with no visible key would produce NaN.

    The computation stays in the input dtype; the kernels accumulate the softmax in
    float32 for bf16/fp16, which is what the serving backends do too.

    One-shot form of :class:`ExactMaskAttention` (``backend`` as there): a caller with
    many layers over one selection should prepare the plan once instead.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [nq, Hq, D], k and v [nk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    if hq % hkv or k.shape[-1] != d:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv} with equal head_dim")
    if q_pos.shape != (nq,) or k_pos.shape != (nk,):
        raise ValueError(f"q_pos must be [{nq}] and k_pos [{nk}]; got {tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
    plan = ExactMaskAttention.prepare(q_pos, k_pos, hq, hkv, q.device, backend=backend)
    return plan(q, k, v, scale)
