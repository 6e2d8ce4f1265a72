"""A tiny pure-torch decoder that runs Blend end to end: the executable spec of the algorithm.

``TinyDecoder`` is a Llama-style model (RMSNorm, GQA attention with RoPE, SwiGLU MLP),
with the Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm before RoPE) variants.
``prefill`` is a plain causal forward; ``blend_prefill`` is CacheBlend:

1. reusable segments bring per-layer KV computed when the segment was prefilled alone
   at positions ``0..L-1``; their K is delta-rotated by ``+start`` (V untouched);
2. layers before the first check layer run fully on every row (fresh KV);
3. at a check layer the fresh K/V of the rows still computed are compared with the
   cached ones and the top-``ratio`` reusable rows (plus every non-reusable row and
   the last row) stay selected; several check layers filter gradually;
4. from the check layer on only selected rows are computed; they attend over the full
   context, where selected rows carry fresh KV and all others cached KV, with the exact
   causal mask by true position.

The vLLM integration must reproduce this on paged caches; tests pin it down here in
float32 where the expected results are exact. Pure torch; never imports vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import causal_attention_by_position
from .rope import RopeSpec, delta_rotate, rotate
from .blend import BlendStep, RequestRows

logger = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k post-RoPE, v), each [n, Hkv, D]


@dataclass(frozen=True)
class TinyDecoderConfig:
    vocab_size: int = 96
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope: RopeSpec = field(default_factory=lambda: RopeSpec(head_dim=16, rotary_dim=16, base=10000.0))
    rms_eps: float = 1e-6
    qk_norm: bool = False  # Qwen3
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim {self.rope.head_dim} != head_dim {self.head_dim}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm layer, split at the attention so Blend can swap KV in between."""

    def __init__(self, cfg: TinyDecoderConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(h, cfg.rms_eps)
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_eps) if cfg.qk_norm else None
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream ``[m, hidden]`` -> q ``[m, Hq, D]``, k, v ``[m, Hkv, D]`` (q, k rotated)."""
        m, d = x.shape[0], self.cfg.head_dim
        hs = self.input_layernorm(x)
        q = self.q_proj(hs).view(m, -1, d)
        k = self.k_proj(hs).view(m, -1, d)
        v = self.v_proj(hs).view(m, -1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, positions, self.cfg.rope), rotate(k, positions, self.cfg.rope), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention output ``[m, Hq, D]`` -> o_proj + residual, then the MLP block."""
        x = x + self.o_proj(attn.reshape(x.shape[0], -1))
        hs = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(hs)) * self.up_proj(hs))


# Our flat layer leaves -> the HF sub-module that holds them.
_HF_GROUP = {leaf: "self_attn" for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
_HF_GROUP.update({leaf: "mlp" for leaf in ("gate_proj", "up_proj", "down_proj")})


def _hf_name(name: str, theirs: dict) -> str:
    """``layers.3.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` etc."""
    if name == "lm_head.weight":
        return name if name in theirs else "model.embed_tokens.weight"  # tied embeddings
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] in _HF_GROUP:
        parts.insert(2, _HF_GROUP[parts[2]])
    return "model." + ".".join(parts)


@dataclass
class BlendResult:
    """What ``blend_prefill`` produced.

    ``logits`` are ``[len(logit_rows), vocab]`` for the rows computed through the last
    layer (the last row always among them). ``kv`` is the per-layer KV a paged cache
    would hold afterwards. ``recomputed_fraction`` is the share of reusable tokens still
    recomputed after the last check layer.
    """

    logits: torch.Tensor
    logit_rows: torch.Tensor
    kv: KV
    recompute_mask_per_check_layer: dict[int, torch.Tensor]
    recomputed_fraction: float

    @property
    def last_logits(self) -> torch.Tensor:
        return self.logits[-1]


class TinyDecoder(nn.Module):
    """Llama/Qwen2/Qwen3-style decoder, float32, random (``seed``) or copied weights (``from_hf``)."""

    def __init__(self, cfg: TinyDecoderConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._random_init(seed)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.scale = cfg.head_dim ** -0.5

    @torch.no_grad()
    def _random_init(self, seed: int) -> None:
        """Deterministic float32 init at unit scale (HF's std=0.02 would make attention
        nearly uniform, so every token would look alike and selection would mean little)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g))

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: Any) -> "TinyDecoder":
        """Copy weights from a transformers Llama/Mistral/Qwen2/Qwen3 ``*ForCausalLM``."""
        hf = model.config
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"only SwiGLU (silu) MLPs are supported, got {hf.hidden_act!r}")
        attn0 = model.model.layers[0].self_attn
        if attn0.o_proj.bias is not None or getattr(hf, "mlp_bias", False):
            raise ValueError("o_proj / MLP biases are not supported by TinyDecoder")
        cfg = TinyDecoderConfig(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size, rope=RopeSpec.from_hf_config(hf),
            rms_eps=hf.rms_norm_eps, qk_norm=hasattr(attn0, "q_norm"),
            qkv_bias=attn0.q_proj.bias is not None, tie_embeddings=bool(hf.tie_word_embeddings),
        )
        out = cls(cfg)
        theirs = model.state_dict()
        for name, p in out.named_parameters():
            p.copy_(theirs[_hf_name(name, theirs)].to(torch.float32))
        return out

    # ---- plain forward ------------------------------------------------------------------------

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def prefill(self, token_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KV]:
        """Causal forward over all tokens: logits ``[n, vocab]`` and per-layer (k, v)."""
        positions = torch.arange(len(token_ids)) if positions is None else positions
        h = self.embed_tokens(token_ids)
        kv: KV = []
        for layer in self.layers:
            q, k, v = layer.qkv(h, positions)
            h = layer.finish(h, causal_attention_by_position(q, positions, k, v, positions, self.scale))
            kv.append((k, v))
        return self.logits(h), kv

    # ---- Blend --------------------------------------------------------------------------------

    def _cached_kv(self, n: int, segments: Sequence[tuple[int, int, bool]],
                   cached: Sequence[Optional[KV]]) -> tuple[torch.Tensor, KV]:
        """Place each reusable segment's cached KV at its new rows, K re-rotated by +start."""
        if len(cached) != len(segments):
            raise ValueError(f"cached must align with segments ({len(segments)}), got {len(cached)}")
        cfg = self.cfg
        reusable = torch.zeros(n, dtype=torch.bool)
        out = [(torch.zeros(n, cfg.num_kv_heads, cfg.head_dim), torch.zeros(n, cfg.num_kv_heads, cfg.head_dim))
               for _ in range(cfg.num_layers)]
        covered = 0
        for (start, end, reuse), seg_kv in zip(segments, cached):
            if start != covered or end <= start:
                raise ValueError(f"segments must tile 0..{n} in order; got {segments}")
            covered = end
            if not reuse:
                continue
            if seg_kv is None or len(seg_kv) != cfg.num_layers or seg_kv[0][0].shape[0] != end - start:
                raise ValueError(f"segment ({start}, {end}) is reusable but its cached KV is missing or mis-sized")
            reusable[start:end] = True
            local = torch.arange(end - start)
            for (k_all, v_all), (k, v) in zip(out, seg_kv):
                k_all[start:end] = delta_rotate(k, start, cfg.rope, from_positions=local)
                v_all[start:end] = v
        if covered != n:
            raise ValueError(f"segments cover 0..{covered}, prompt has {n} tokens")
        return reusable, out

    @torch.no_grad()
    def blend_prefill(
        self,
        token_ids: torch.Tensor,
        segments: Sequence[tuple[int, int, bool]],
        cached: Sequence[Optional[KV]],
        check_layers: dict[int, float],
        target: str = "k",
        norm: str = "l2",
        always: Optional[torch.Tensor] = None,
    ) -> BlendResult:
        """Prefill ``token_ids`` reusing cached segment KV, recomputing only HKVD rows.

        ``segments``: ``(start, end, reusable)`` tiling the prompt in order. ``cached[i]``
        is, for a reusable segment, ``prefill(token_ids[start:end])[1]`` (KV at local
        positions 0..L-1), else None. ``check_layers`` maps layer index -> ratio of the
        request's reusable tokens to keep recomputing from that layer on. ``always``
        (bool ``[n]``) marks rows recomputed whatever their deviation.
        """
        if not check_layers:
            raise ValueError("blend_prefill needs at least one check layer")
        if min(check_layers) < 0 or max(check_layers) >= self.cfg.num_layers:
            raise ValueError(f"check layers {sorted(check_layers)} out of range 0..{self.cfg.num_layers - 1}")
        n = len(token_ids)
        positions = torch.arange(n)
        reusable, cached_kv = self._cached_kv(n, segments, cached)
        # The same per-forward state machine the vLLM integration drives.
        step = BlendStep([RequestRows("reference", 0, n, reusable, always)], n, dict(check_layers), target, norm)
        h = self.embed_tokens(token_ids)
        masks: dict[int, torch.Tensor] = {}
        kv: KV = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h, positions[step.rows])
            if step.computes_all_rows(i):
                k_all, v_all = k, v  # every row is computed here
            else:
                ck, cv = cached_kv[i]
                if step.is_check_layer(i):
                    keep = step.select(i, k, ck[step.rows], v, cv[step.rows])
                    step.take_shrink()
                    h, q, k, v = h[keep], q[keep], k[keep], v[keep]
                    masks[i] = torch.zeros(n, dtype=torch.bool)
                    masks[i][step.rows] = True
                    logger.debug("layer %d: recompute %d of %d rows", i, len(step.rows), n)
                k_all, v_all = ck.clone(), cv.clone()
                k_all[step.rows], v_all[step.rows] = k, v
            attn = causal_attention_by_position(q, positions[step.rows], k_all, v_all, positions, self.scale)
            h = layer.finish(h, attn)
            kv.append((k_all, v_all))
        rows = step.rows
        num_reusable = int(reusable.sum())
        recomputed = step.outcomes["reference"].num_recomputed_reusable if step.active else num_reusable
        fraction = recomputed / num_reusable if num_reusable else 0.0
        return BlendResult(self.logits(h), rows, kv, masks, fraction)
