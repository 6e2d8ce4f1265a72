"""Attention by true position: equals causal attention, and ignores keys after the query."""

import pytest
import torch
import torch.nn.functional as F

from ucm.sparse.blend.attention import causal_attention_by_position

N, HQ, HKV, D = 24, 4, 2, 16
SCALE = D ** -0.5


def _qkv(seed=0, n=N, hq=HQ, hkv=HKV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hq, D, generator=g), torch.randn(n, hkv, D, generator=g),
            torch.randn(n, hkv, D, generator=g))


def _reference(q, k, v):
    """Plain causal attention over all rows, GQA by explicit head repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=SCALE)
    return out.transpose(0, 1)


@pytest.mark.parametrize("hkv", [HQ, HKV, 1])
def test_all_rows_equal_causal_sdpa(hkv):
    q, k, v = _qkv(hkv=hkv)
    pos = torch.arange(N)
    out = causal_attention_by_position(q, pos, k, v, pos, SCALE)
    torch.testing.assert_close(out, _reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_selected_rows_equal_rows_of_full_attention():
    q, k, v = _qkv(1)
    pos = torch.arange(N)
    rows = torch.tensor([0, 3, 7, 8, 15, 23])
    out = causal_attention_by_position(q[rows], rows, k, v, pos, SCALE)
    torch.testing.assert_close(out, _reference(q, k, v)[rows], atol=1e-5, rtol=1e-5)


def test_output_ignores_keys_after_the_query():
    q, k, v = _qkv(2)
    pos = torch.arange(N)
    rows = torch.tensor([2, 10, 11])
    before = causal_attention_by_position(q[rows], rows, k, v, pos, SCALE)
    k2, v2 = k.clone(), v.clone()
    k2[12:] = torch.randn_like(k2[12:]) * 10
    v2[12:] = torch.randn_like(v2[12:]) * 10
    after = causal_attention_by_position(q[rows], rows, k2, v2, pos, SCALE)
    assert torch.equal(before, after)
    k2[11] += 1.0  # ...but a key at the query's own position matters for row 11 only
    changed = causal_attention_by_position(q[rows], rows, k2, v2, pos, SCALE)
    assert torch.equal(changed[:2], before[:2]) and not torch.allclose(changed[2], before[2])


def test_positions_out_of_order():
    q, k, v = _qkv(3)
    pos = torch.arange(N)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([20, 4, 13, 1])  # queries in arbitrary order, too
    out = causal_attention_by_position(q[rows], rows, k[perm], v[perm], pos[perm], SCALE)
    torch.testing.assert_close(out, _reference(q, k, v)[rows], atol=1e-5, rtol=1e-5)


def test_positions_with_offset_and_bf16():
    q, k, v = _qkv(4)
    pos = torch.arange(N) + 1000
    ref = _reference(q, k, v)
    out = causal_attention_by_position(q, pos, k, v, pos, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out16 = causal_attention_by_position(q.bfloat16(), pos, k.bfloat16(), v.bfloat16(), pos, SCALE)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, atol=5e-2, rtol=5e-2)


def test_shape_errors():
    q, k, v = _qkv()
    pos = torch.arange(N)
    with pytest.raises(ValueError, match="multiple"):
        causal_attention_by_position(torch.randn(N, 3, D), pos, k, v, pos, SCALE)
    with pytest.raises(ValueError, match="q_pos"):
        causal_attention_by_position(q, pos[:-1], k, v, pos, SCALE)
