"""The reference Blend forward: exact at ratio 1, full reuse at ratio 0, better in between.

float32 tiny random models of the three supported layer flavours: Llama, Qwen2 (q/k/v
bias) and Qwen3 (per-head q/k norm). Logits are compared numerically (random models
have near-tied argmaxes).
"""

import math

import pytest

import ucm.sparse.blend.blend as blend_module
import torch
import torch.nn.functional as F

from ucm.sparse.blend import reference
from ucm.sparse.blend.reference import TinyDecoder, TinyDecoderConfig

FLAVOURS = {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True, "tie_embeddings": True}}
VOCAB = TinyDecoderConfig().vocab_size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core box they spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(flavour: str, seed: int = 0) -> TinyDecoder:
    return TinyDecoder(TinyDecoderConfig(**FLAVOURS[flavour]), seed=seed)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _prompt(model, parts):
    """parts: list of (tokens, reusable). Returns ids, segments, cached (KV of each reusable
    part prefilled alone at positions 0..L-1)."""
    ids, segments, cached, start = [], [], [], 0
    for toks, reuse in parts:
        segments.append((start, start + len(toks), reuse))
        cached.append(model.prefill(toks)[1] if reuse else None)
        ids.append(toks)
        start += len(toks)
    return torch.cat(ids), segments, cached


def _rag_parts(seed, missing_middle=False):
    """prefix | chunk A | chunk B | chunk C | suffix, B optionally a cache miss."""
    pre, a, b, c, suf = (_tokens(n, seed * 10 + i) for i, n in enumerate((5, 12, 10, 12, 6)))
    return [(pre, False), (a, True), (b, not missing_middle), (c, True), (suf, False)]


def _full_reuse_logits(model, ids, segments, cached, first_check):
    """Independent full-KV-reuse forward: every row computed, but from ``first_check`` on
    reusable rows' K/V are replaced by the cached ones. The cached K is re-derived by
    prefilling the segment alone *at its new positions* (not by delta rotation), and
    attention is plain causal SDPA."""
    n, cfg = len(ids), model.cfg
    pos = torch.arange(n)
    shifted = [model.prefill(ids[s:e], torch.arange(s, e))[1] if r else None for s, e, r in segments]
    h = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, pos)
        if i >= first_check:
            for (s, e, r), seg_kv in zip(segments, shifted):
                if r:
                    k[s:e], v[s:e] = seg_kv[i]
        rep = cfg.num_heads // cfg.num_kv_heads
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
            v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True, scale=model.scale)
        h = layer.finish(h, attn.transpose(0, 1))
    return model.logits(h)


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("target,norm", [("k", "l2"), ("v", "l1"), ("kv", "l2")])
def test_ratio_one_equals_full_prefill(flavour, target, norm):
    model = _model(flavour)
    ids, segments, cached = _prompt(model, _rag_parts(1))
    full_logits, full_kv = model.prefill(ids)
    res = model.blend_prefill(ids, segments, cached, {1: 1.0}, target=target, norm=norm)
    assert torch.equal(res.logit_rows, torch.arange(len(ids)))
    assert _max_diff(res.logits, full_logits) < 1e-4
    for (k, v), (fk, fv) in zip(res.kv, full_kv):
        assert _max_diff(k, fk) < 1e-5 and _max_diff(v, fv) < 1e-5
    assert res.recomputed_fraction == 1.0


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("missing_middle", [False, True])
def test_ratio_zero_equals_full_reuse(flavour, missing_middle):
    model = _model(flavour, seed=2)
    ids, segments, cached = _prompt(model, _rag_parts(2, missing_middle))
    res = model.blend_prefill(ids, segments, cached, {1: 0.0})
    reusable = torch.cat([torch.full((e - s,), r) for s, e, r in segments])
    assert torch.equal(res.logit_rows, (~reusable).nonzero().flatten())
    assert torch.equal(res.recompute_mask_per_check_layer[1], ~reusable)
    assert res.recomputed_fraction == 0.0
    expected = _full_reuse_logits(model, ids, segments, cached, first_check=1)
    assert _max_diff(res.logits, expected[res.logit_rows]) < 1e-4
    # ...and it is not simply the full prefill: reuse without recompute loses something.
    assert _max_diff(res.last_logits, model.prefill(ids)[0][-1]) > 1e-3


def _mean_last_logit_error(flavour, ratios, trials=12):
    """Mean |last-token logits - full prefill| per ratio, averaged over random models/prompts
    (single random prompts are noisy; the average is what Blend promises)."""
    errors = torch.zeros(len(ratios))
    for seed in range(trials):
        model = _model(flavour, seed=seed)
        ids, segments, cached = _prompt(model, _rag_parts(seed + 20))
        full = model.prefill(ids)[0][-1]
        for j, ratio in enumerate(ratios):
            res = model.blend_prefill(ids, segments, cached, {1: ratio})
            errors[j] += (res.last_logits - full).abs().mean() / trials
    return dict(zip(ratios, errors.tolist()))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_fidelity_grows_with_ratio(flavour):
    err = _mean_last_logit_error(flavour, (0.0, 0.15, 0.5, 1.0))
    assert err[1.0] < 1e-4
    assert err[0.5] < err[0.15] <= err[0.0], err


def test_hkvd_beats_random_selection(monkeypatch):
    """The point of HKVD: recomputing the most-deviating tokens beats recomputing random ones."""
    hkvd = _mean_last_logit_error("llama", (0.3,), trials=20)[0.3]
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(blend_module, "token_deviation",
                        lambda fresh_k, *a, **k: torch.rand(fresh_k.shape[0], generator=gen))
    random = _mean_last_logit_error("llama", (0.3,), trials=20)[0.3]
    assert hkvd < random, (hkvd, random)


def test_reordered_and_repeated_chunks():
    """Chunks cached once, prefilled alone, reused in different orders (and one twice)."""
    model = _model("llama", seed=3)
    pre, a, b, suf = _tokens(4, 30), _tokens(9, 31), _tokens(11, 32), _tokens(5, 33)
    for order in ([a, b], [b, a], [a, b, a]):
        parts = [(pre, False)] + [(c, True) for c in order] + [(suf, False)]
        ids, segments, cached = _prompt(model, parts)
        full_logits, full_kv = model.prefill(ids)
        assert _max_diff(model.blend_prefill(ids, segments, cached, {2: 1.0}).logits, full_logits) < 1e-4
        # Check at layer 0, nothing recomputed: layer-0 KV is context-free, so the delta-rotated
        # cache must equal the full prefill's layer-0 KV at the new positions.
        res = model.blend_prefill(ids, segments, cached, {0: 0.0})
        assert _max_diff(res.kv[0][0], full_kv[0][0]) < 1e-5
        assert _max_diff(res.kv[0][1], full_kv[0][1]) < 1e-5
        partial = model.blend_prefill(ids, segments, cached, {1: 0.5})
        assert torch.isfinite(partial.logits).all()


def test_gradual_filtering_two_check_layers():
    model = _model("qwen3", seed=4)
    ids, segments, cached = _prompt(model, _rag_parts(4))
    res = model.blend_prefill(ids, segments, cached, {1: 0.5, 2: 0.2})
    m1, m2 = res.recompute_mask_per_check_layer[1], res.recompute_mask_per_check_layer[2]
    reusable = torch.cat([torch.full((e - s,), r) for s, e, r in segments])
    num_reusable = int(reusable.sum())
    assert torch.equal(m2 & m1, m2)  # later ⊆ earlier
    assert int((m1 & reusable).sum()) == math.ceil(0.5 * num_reusable)
    assert int((m2 & reusable).sum()) == math.ceil(0.2 * num_reusable)
    assert m2[~reusable].all()
    assert torch.equal(res.logit_rows, m2.nonzero().flatten())
    assert res.recomputed_fraction == pytest.approx(math.ceil(0.2 * num_reusable) / num_reusable)
    # Rows dropped at layer 2 keep their fresh layer-1 KV but cached KV from layer 2 on.
    dropped = m1 & ~m2
    assert dropped.any()
    full_reuse = model.blend_prefill(ids, segments, cached, {1: 0.0})
    cached_k2 = full_reuse.kv[2][0]
    assert torch.equal(res.kv[2][0][dropped], cached_k2[dropped])
    exact = model.blend_prefill(ids, segments, cached, {1: 1.0, 3: 1.0})
    assert _max_diff(exact.last_logits, model.prefill(ids)[0][-1]) < 1e-4


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_true_prefix_reuse_is_exact(flavour):
    """A reusable segment at position 0 cached from the same tokens is a plain prefix hit."""
    model = _model(flavour, seed=5)
    ids, segments, cached = _prompt(model, [(_tokens(20, 50), True), (_tokens(7, 51), False)])
    full_logits, full_kv = model.prefill(ids)
    res = model.blend_prefill(ids, segments, cached, {1: 0.0})
    for (k, v), (fk, fv) in zip(res.kv, full_kv):
        assert _max_diff(k, fk) < 1e-5 and _max_diff(v, fv) < 1e-5
    assert _max_diff(res.logits, full_logits[20:]) < 1e-4


def test_bad_inputs():
    model = _model("llama")
    ids, segments, cached = _prompt(model, _rag_parts(6))
    with pytest.raises(ValueError, match="check layer"):
        model.blend_prefill(ids, segments, cached, {})
    with pytest.raises(ValueError, match="out of range"):
        model.blend_prefill(ids, segments, cached, {9: 0.1})
    with pytest.raises(ValueError, match="tile"):
        model.blend_prefill(ids, segments[::-1], cached[::-1], {1: 0.1})
    with pytest.raises(ValueError, match="missing"):
        model.blend_prefill(ids, segments, [None] * len(segments), {1: 0.1})
    with pytest.raises(ValueError, match="ratio"):
        model.blend_prefill(ids, segments, cached, {1: 1.5})


# ---- the reference itself agrees with transformers ------------------------------------------

transformers = pytest.importorskip("transformers")


def _hf_model(arch: str, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common, **kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF init is too small to make the comparison sensitive
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return model


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
])
def test_prefill_matches_transformers(arch, kw):
    hf = _hf_model(arch, **kw)
    ids = _tokens(40, 60)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    ours = TinyDecoder.from_hf(hf)
    assert ours.cfg.qkv_bias == (arch == "qwen2") and ours.cfg.qk_norm == (arch == "qwen3")
    assert _max_diff(ours.prefill(ids)[0], expected) < 1e-4
