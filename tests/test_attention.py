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


# ---------------------------------------------------------------------------------
# ExactMaskAttention: the flex backend (eager FlexAttention on CPU) against the reference.
import logging  # noqa: E402

from ucm.sparse.blend import attention as attn_mod  # noqa: E402
from ucm.sparse.blend import flex_mask  # noqa: E402
from ucm.sparse.blend.attention import ExactMaskAttention, position_mask  # noqa: E402
from ucm.sparse.blend.flex_mask import block_classes, build_block_mask  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Each test sees no broken/verified backends left over by another one."""
    saved = (dict(attn_mod._BROKEN), set(attn_mod._VERIFIED), set(attn_mod._WARNED))
    for s in (attn_mod._BROKEN, attn_mod._VERIFIED, attn_mod._WARNED):
        s.clear()
    yield
    for s, old in zip((attn_mod._BROKEN, attn_mod._VERIFIED, attn_mod._WARNED), saved):
        s.clear()
        s.update(old)


def _case(nk, nq, hq, hkv, d=32, seed=0, sorted_q=True, perm_k=False):
    """Random q/k/v and positions: q_pos a random subset of the context, k_pos arange
    (or a permutation of it, with k/v rows permuted to match)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(nk, generator=g)[:nq]
    if sorted_q:
        rows = rows.sort().values
    k_pos = torch.randperm(nk, generator=g) if perm_k else torch.arange(nk)
    q = torch.randn(nq, hq, d, generator=g)
    k = torch.randn(nk, hkv, d, generator=g)
    v = torch.randn(nk, hkv, d, generator=g)
    return q, rows, k, v, k_pos, d ** -0.5


def _ref(q, q_pos, k, v, k_pos, scale):
    return causal_attention_by_position(q, q_pos, k, v, k_pos, scale, backend="sdpa")


def _flex_plan(q_pos, k_pos, hq, hkv):
    plan = ExactMaskAttention.prepare(q_pos, k_pos, hq, hkv, "cpu", backend="flex", compile_flex=False)
    assert plan.backend == "flex"
    return plan


@pytest.mark.parametrize("nk,nq,hq,hkv,sorted_q,perm_k", [
    (300, 45, 8, 2, True, False),     # GQA 4:1, one padded query block
    (300, 45, 4, 4, True, False),     # 1:1
    (1000, 150, 8, 2, True, False),   # two query blocks, the second mostly padding
    (1000, 256, 4, 1, True, False),   # nq a multiple of the block: no padding
    (513, 200, 8, 2, False, False),   # unsorted queries, nk not a multiple of 128
    (400, 130, 4, 2, True, True),     # keys in permuted order
    (129, 129, 4, 1, False, True),    # every row selected, both shuffled
    (700, 1, 4, 2, True, False),      # a single row
])
def test_flex_matches_reference(nk, nq, hq, hkv, sorted_q, perm_k):
    q, q_pos, k, v, k_pos, scale = _case(nk, nq, hq, hkv, sorted_q=sorted_q, perm_k=perm_k, seed=nk + nq)
    out = _flex_plan(q_pos, k_pos, hq, hkv)(q, k, v, scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _ref(q, q_pos, k, v, k_pos, scale), atol=1e-5, rtol=1e-5)
    assert not attn_mod._BROKEN and "flex" in attn_mod._VERIFIED


def test_flex_selected_rows_equal_full_causal_rows():
    q, k, v = _qkv(5, n=260)
    pos = torch.arange(260)
    rows = torch.tensor([0, 1, 127, 128, 129, 200, 259])
    out = _flex_plan(rows, pos, HQ, HKV)(q[rows], k, v, SCALE)
    torch.testing.assert_close(out, _reference(q, k, v)[rows], atol=1e-5, rtol=1e-5)


def test_plan_reused_across_layers():
    """One plan, several layers' q/k/v: each equals the reference; no re-preparation."""
    q, q_pos, k, v, k_pos, scale = _case(600, 90, 8, 2, seed=7)
    plan = _flex_plan(q_pos, k_pos, 8, 2)
    mask_before = plan._state
    for layer in range(3):
        g = torch.Generator().manual_seed(100 + layer)
        ql, kl, vl = (torch.randn(t.shape, generator=g) for t in (q, k, v))
        torch.testing.assert_close(plan(ql, kl, vl, scale), _ref(ql, q_pos, kl, vl, k_pos, scale),
                                   atol=1e-5, rtol=1e-5)
    assert plan._state is mask_before and plan.backend == "flex"


def test_flex_bf16_close_to_reference():
    q, q_pos, k, v, k_pos, scale = _case(400, 70, 8, 2, seed=3)
    out = _flex_plan(q_pos, k_pos, 8, 2)(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _ref(q, q_pos, k, v, k_pos, scale), atol=3e-2, rtol=3e-2)


def test_flex_ignores_keys_after_the_query():
    q, q_pos, k, v, k_pos, scale = _case(300, 40, 4, 2, seed=11)
    plan = _flex_plan(q_pos, k_pos, 4, 2)
    before = plan(q, k, v, scale)
    cut = int(q_pos[19])  # queries 0..19 must not see keys after position q_pos[19]
    k2, v2 = k.clone(), v.clone()
    k2[cut + 1:] *= 7
    v2[cut + 1:] += 3
    after = plan(q, k2, v2, scale)
    torch.testing.assert_close(after[:20], before[:20], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(after[20:], before[20:])


@pytest.mark.parametrize("sorted_pos", [True, False])
def test_block_classes_are_sound(sorted_pos):
    """Full blocks are entirely visible, unlisted ones entirely hidden; with sorted
    positions every partial block really mixes visible and hidden pairs."""
    g = torch.Generator().manual_seed(int(sorted_pos))
    nk, nq, blk = 1000, 300, 128
    q_pos = torch.randperm(nk, generator=g)[:nq]
    k_pos = torch.arange(nk) if sorted_pos else torch.randperm(nk, generator=g)
    if sorted_pos:
        q_pos = q_pos.sort().values
    q_pad, k_pad = flex_mask._pad_positions(q_pos, k_pos, blk)
    assert q_pad.numel() == 384 and k_pad.numel() == 1024
    assert torch.equal(q_pad[:nq], q_pos.int()) and torch.equal(k_pad[:nk], k_pos.int())
    full, partial = block_classes(q_pad, k_pad, blk)
    assert not (full & partial).any()
    dense = position_mask(q_pad.long(), k_pad.long()).view(3, blk, 8, blk).transpose(1, 2)
    all_vis, any_vis = dense.all(-1).all(-1), dense.any(-1).any(-1)
    assert torch.equal(full & ~all_vis, torch.zeros_like(full))
    assert torch.equal(any_vis & ~(full | partial), torch.zeros_like(full))
    if sorted_pos:  # tight: no block computed that need not be, no mask evaluated needlessly
        assert torch.equal(full, all_vis) and torch.equal(partial, any_vis & ~all_vis)


def test_block_mask_layout_matches_create_block_mask():
    """Our O(blocks) BlockMask has the block structure torch derives from the mask itself."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_pos = torch.tensor(sorted(torch.randperm(900, generator=torch.Generator().manual_seed(2))[:200].tolist()))
    k_pos = torch.arange(900)
    ours = build_block_mask(q_pos, k_pos)
    q_pad, k_pad = flex_mask._pad_positions(q_pos, k_pos, 128)
    theirs = create_block_mask(flex_mask._make_mask_mod(q_pad, k_pad), 1, 1, q_pad.numel(), 900, device="cpu")
    assert ours.seq_lengths == (256, 900)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    full = lambda bm: flex_mask._flex_module().BlockMask.from_kv_blocks(  # noqa: E731
        bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=128).to_dense()
    assert torch.equal(full(ours), full(theirs))


def test_failing_backend_falls_back_and_logs(monkeypatch, caplog):
    q, q_pos, k, v, k_pos, scale = _case(300, 50, 4, 2, seed=4)
    monkeypatch.setattr(ExactMaskAttention, "_run_flex", lambda self, *a: 1 / 0)
    plan = _flex_plan(q_pos, k_pos, 4, 2)
    with caplog.at_level(logging.WARNING, logger=attn_mod.__name__):
        out = plan(q, k, v, scale)
        out2 = plan(q, k, v, scale)
    assert plan.backend == "sdpa" and "flex" in attn_mod._BROKEN
    assert torch.equal(out, _ref(q, q_pos, k, v, k_pos, scale)) and torch.equal(out, out2)
    assert sum("falling back" in r.message for r in caplog.records) == 1
    # a later plan skips the broken backend at once
    assert ExactMaskAttention.prepare(q_pos, k_pos, 4, 2, backend="flex").backend == "sdpa"


def test_wrong_backend_output_is_caught(monkeypatch):
    """A fast backend that returns wrong numbers is caught on first use, not trusted."""
    q, q_pos, k, v, k_pos, scale = _case(300, 50, 4, 2, seed=5)
    good = ExactMaskAttention._run_flex
    monkeypatch.setattr(ExactMaskAttention, "_run_flex", lambda self, *a: good(self, *a) * 1.01)
    plan = _flex_plan(q_pos, k_pos, 4, 2)
    out = plan(q, k, v, scale)
    assert plan.backend == "sdpa" and "BackendMismatch" in attn_mod._BROKEN["flex"]
    assert torch.equal(out, _ref(q, q_pos, k, v, k_pos, scale))


def test_backend_selection_from_env(monkeypatch, caplog):
    pos = torch.arange(10)
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    assert ExactMaskAttention.prepare(pos, pos, 4, 2).backend == "sdpa"  # auto on CPU
    monkeypatch.setenv(attn_mod.ENV_VAR, "flex")
    assert ExactMaskAttention.prepare(pos, pos, 4, 2).backend == "flex"
    assert ExactMaskAttention.prepare(pos, pos, 4, 2, backend="sdpa").backend == "sdpa"
    with caplog.at_level(logging.WARNING, logger=attn_mod.__name__):
        monkeypatch.setenv(attn_mod.ENV_VAR, "cudnn")  # needs CUDA
        assert ExactMaskAttention.prepare(pos, pos, 4, 2).backend == "sdpa"
    assert len(caplog.records) == 1
    monkeypatch.setenv(attn_mod.ENV_VAR, "nonsense")  # refused, naming the variable and the choices
    with pytest.raises(ValueError, match="UCM_BLEND_ATTENTION: must be one of auto, triton, flex, cudnn, sdpa"):
        ExactMaskAttention.prepare(pos, pos, 4, 2)
    with pytest.raises(ValueError, match="'nonsense'"):
        ExactMaskAttention.prepare(pos, pos, 4, 2, backend="nonsense")
    cuda = torch.device("cuda")
    big, small = attn_mod.FLEX_MIN_PAIRS, attn_mod.FLEX_MIN_PAIRS - 1
    assert attn_mod.backend_chain("auto", cuda, big) == ["flex", "cudnn", "sdpa"]
    assert attn_mod.backend_chain("auto", cuda, small) == ["cudnn", "flex", "sdpa"]
    assert attn_mod.backend_chain("flex", cuda, small) == ["flex", "cudnn", "sdpa"]
    attn_mod._BROKEN["flex"] = "test"
    assert attn_mod.backend_chain("auto", cuda, big) == ["cudnn", "sdpa"]


def test_plan_shape_errors():
    pos = torch.arange(N)
    q, k, v = _qkv()
    plan = ExactMaskAttention.prepare(pos, pos, HQ, HKV, backend="flex", compile_flex=False)
    with pytest.raises(ValueError, match="plan is for"):
        plan(q[:-1], k, v, SCALE)
    with pytest.raises(ValueError, match="plan is for"):
        plan(q, k[:, :1], v[:, :1], SCALE)
    with pytest.raises(ValueError, match="multiple"):
        ExactMaskAttention.prepare(pos, pos, 6, 4)
    empty = ExactMaskAttention.prepare(pos[:0], pos, HQ, HKV, backend="flex", compile_flex=False)
    assert empty(q[:0], k, v, SCALE).shape == (0, HQ, D)
