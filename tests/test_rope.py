"""RoPE: delta rotation composes exactly, and rotate() matches transformers' rotary."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm.sparse.blend.rope import RopeSpec, delta_rotate, delta_rotate_, inv_freq_and_scale, rotate

HEAD_DIM = 32
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
}


def _spec(scaling: str, neox: bool = True, rotary_dim: int = HEAD_DIM) -> RopeSpec:
    return RopeSpec(head_dim=HEAD_DIM, rotary_dim=rotary_dim, base=10000.0, is_neox_style=neox,
                    scaling=SCALINGS[scaling], max_position_embeddings=1024)


def _keys(n: int, heads: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, heads, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, HEAD_DIM // 2])
def test_delta_composes(scaling, neox, rotary_dim):
    spec = _spec(scaling, neox, rotary_dim)
    k = _keys(20)
    p = torch.arange(20)
    q = torch.randint(-5, 400, (20,), generator=torch.Generator().manual_seed(1)).clamp(min=0)
    direct = rotate(k, q, spec)
    moved = delta_rotate(rotate(k, p, spec), q - p, spec, from_positions=p)
    torch.testing.assert_close(moved, direct, atol=1e-5, rtol=1e-5)
    # Without from_positions the only gap is float32 rounding of the model's angles (~ulp(400)).
    loose = delta_rotate(rotate(k, p, spec), q - p, spec)
    torch.testing.assert_close(loose, direct, atol=1e-4, rtol=1e-4)
    if rotary_dim < HEAD_DIM:  # pass-through dims untouched
        assert torch.equal(moved[..., rotary_dim:], k[..., rotary_dim:])


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_negative_delta_and_int_delta(scaling):
    spec = _spec(scaling)
    k = _keys(8)
    p = torch.arange(100, 108)
    back = delta_rotate(rotate(k, p, spec), -100, spec)
    torch.testing.assert_close(back, rotate(k, torch.arange(8), spec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", ["default", "llama3", "yarn"])
def test_large_positions(scaling):
    """At ~30000 float32 angles carry ~1e-3 rad of rounding; from_positions reproduces it."""
    spec = _spec(scaling)
    k = _keys(16)
    p = torch.arange(16)
    q = p + 30000
    direct = rotate(k, q, spec)
    exact = delta_rotate(rotate(k, p, spec), q - p, spec, from_positions=p)
    torch.testing.assert_close(exact, direct, atol=1e-5, rtol=1e-5)
    approx = delta_rotate(rotate(k, p, spec), q - p, spec)
    assert (approx - direct).abs().max() < 2e-2  # float32 angle rounding only


def test_in_place_on_a_view():
    spec = _spec("yarn", rotary_dim=HEAD_DIM // 2)
    k = _keys(10)
    p = torch.arange(10)
    cache = torch.zeros(2, 10, 3, HEAD_DIM)  # e.g. [k/v, tokens, heads, dim]
    cache[0] = rotate(k, p, spec)
    out = delta_rotate_(cache[0], torch.full((10,), 7), spec)
    assert out.data_ptr() == cache[0].data_ptr()
    torch.testing.assert_close(cache[0], rotate(k, p + 7, spec), atol=1e-5, rtol=1e-5)
    assert torch.equal(cache[1], torch.zeros(10, 3, HEAD_DIM))


def test_leading_dims_and_dtype():
    spec = _spec("default")
    k = torch.randn(2, 5, 4, HEAD_DIM).to(torch.bfloat16)
    out = rotate(k, torch.arange(5), spec)
    assert out.dtype == torch.bfloat16 and out.shape == k.shape
    torch.testing.assert_close(out[1], rotate(k[1], torch.arange(5), spec))


def test_yarn_mscale_applied_once():
    spec = _spec("yarn_mscale")
    _, scale = inv_freq_and_scale(spec)
    assert scale != 1.0
    k = _keys(4)
    zero = rotate(k, torch.zeros(4, dtype=torch.long), spec)
    torch.testing.assert_close(zero, k * scale)  # position 0: pure scaling
    torch.testing.assert_close(delta_rotate(k, 0, spec), k)  # delta never rescales


@pytest.mark.parametrize("bad", ["dynamic", "longrope"])
def test_unsupported_scaling_raises(bad):
    with pytest.raises(ValueError, match=bad) as err:
        RopeSpec(head_dim=16, rotary_dim=16, scaling={"rope_type": bad, "factor": 2.0})
    assert "llama3" in str(err.value) and "yarn" in str(err.value)


def test_bad_rotary_dim_and_missing_key():
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeSpec(head_dim=16, rotary_dim=17)
    with pytest.raises(ValueError, match="low_freq_factor"):
        RopeSpec(head_dim=16, rotary_dim=16, scaling={"rope_type": "llama3", "factor": 8.0})


@settings(max_examples=60, deadline=None)
@given(
    p=st.lists(st.integers(0, 5000), min_size=1, max_size=12),
    shift=st.integers(-5000, 5000),
    scaling=st.sampled_from(sorted(SCALINGS)),
    neox=st.booleans(),
    half=st.booleans(),
)
def test_delta_property(p, shift, scaling, neox, half):
    spec = _spec(scaling, neox, HEAD_DIM // 2 if half else HEAD_DIM)
    old = torch.tensor(p)
    new = (old + shift).clamp(min=0)
    k = _keys(len(p), heads=2, seed=len(p))
    moved = delta_rotate(rotate(k, old, spec), new - old, spec, from_positions=old)
    torch.testing.assert_close(moved, rotate(k, new, spec), atol=1e-5, rtol=1e-5)


# ---- agreement with transformers -------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _hf_rotate(cfg, rotary_cls, apply_fn, x):
    """x: [tokens, heads, head_dim] -> transformers' rotation at positions 0..n-1."""
    n = x.shape[0]
    emb = rotary_cls(config=cfg)
    pos = torch.arange(n)[None]
    cos, sin = emb(x, pos)
    xt = x.transpose(0, 1)[None]  # [1, heads, tokens, dim]
    q, _ = apply_fn(xt, xt, cos, sin)
    return q[0].transpose(0, 1)


def _tiny(cfg_cls, **kw):
    return cfg_cls(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)


HF_CASES = [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32}),
]


@pytest.mark.parametrize("arch,kw", HF_CASES)
def test_matches_transformers(arch, kw):
    if arch == "llama":
        from transformers.models.llama import modeling_llama as m
        cfg = _tiny(transformers.LlamaConfig, **kw)
        rotary_cls = m.LlamaRotaryEmbedding
    elif arch == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m
        cfg = _tiny(transformers.Qwen2Config, **kw)
        rotary_cls = m.Qwen2RotaryEmbedding
    else:
        from transformers.models.qwen3 import modeling_qwen3 as m
        cfg = _tiny(transformers.Qwen3Config, **kw)
        rotary_cls = m.Qwen3RotaryEmbedding
    spec = RopeSpec.from_hf_config(cfg)
    x = torch.randn(300, 4, spec.head_dim, generator=torch.Generator().manual_seed(3))
    expected = _hf_rotate(cfg, rotary_cls, m.apply_rotary_pos_emb, x)
    got = rotate(x, torch.arange(300), spec)
    assert (got - expected).abs().max() < 1e-5


def test_from_hf_config_layouts():
    cfg = _tiny(transformers.Qwen3Config, head_dim=32, rope_theta=5e5)
    spec = RopeSpec.from_hf_config(cfg)
    assert (spec.head_dim, spec.rotary_dim, spec.base, spec.scaling) == (32, 32, 5e5, None)
    cfg = _tiny(transformers.LlamaConfig, partial_rotary_factor=0.5)
    assert RopeSpec.from_hf_config(cfg).rotary_dim == 8

    class OldStyle:  # transformers < 4.5x: rope_theta attribute + rope_scaling with "type"
        hidden_size, num_attention_heads, max_position_embeddings = 64, 4, 512
        rope_theta = 1e6
        rope_scaling = {"type": "linear", "factor": 2.0}

    spec = RopeSpec.from_hf_config(OldStyle())
    assert (spec.head_dim, spec.base, spec.rope_type) == (16, 1e6, "linear")
    with pytest.raises(ValueError, match="dynamic"):
        RopeSpec.from_hf_config(_tiny(transformers.LlamaConfig,
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
