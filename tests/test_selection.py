"""HKVD selection: deviation definitions, top-ratio picking, TP all-reduce, gradual filtering."""

import math

import pytest
import torch

from ucm.sparse.blend.selection import GradualFilter, agree_reusable, select_recompute, token_deviation


def _kv(n=10, heads=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=g) for _ in range(4)]


def test_deviation_definitions():
    fk, ck, fv, cv = _kv()
    dk, dv = fk - ck, fv - cv
    l2 = token_deviation(fk, ck, norm="l2")
    torch.testing.assert_close(l2, dk.pow(2).sum(-1).sqrt().sum(-1))
    torch.testing.assert_close(token_deviation(fk, ck, norm="l1"), dk.abs().sum((-1, -2)))
    torch.testing.assert_close(token_deviation(fk, ck, fv, cv, target="v"), dv.pow(2).sum(-1).sqrt().sum(-1))
    torch.testing.assert_close(token_deviation(fk, ck, fv, cv, target="kv", norm="l1"),
                               dk.abs().sum((-1, -2)) + dv.abs().sum((-1, -2)))
    assert l2.dtype == torch.float32 and l2.shape == (10,)
    half = token_deviation(fk.half(), ck.half())
    assert half.dtype == torch.float32


def test_deviation_bad_args():
    fk, ck, _, _ = _kv()
    with pytest.raises(ValueError, match="target"):
        token_deviation(fk, ck, target="q")
    with pytest.raises(ValueError, match="norm"):
        token_deviation(fk, ck, norm="linf")
    with pytest.raises(ValueError, match="fresh_v"):
        token_deviation(fk, ck, target="kv")
    with pytest.raises(ValueError, match="head_dim"):
        token_deviation(fk, ck[:, :2])


def test_ratio_edges_and_non_reusable():
    dev = torch.arange(8, dtype=torch.float32)
    reusable = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    assert torch.equal(select_recompute(dev, reusable, 0.0), ~reusable)
    assert select_recompute(dev, reusable, 1.0).all()


def test_top_k_and_budget():
    dev = torch.tensor([9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 0.5, 100.0])
    reusable = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # 7 reusable
    sel = select_recompute(dev, reusable, 0.3)  # ceil(2.1) = 3 reusable rows
    assert sel.nonzero().flatten().tolist() == [0, 2, 4, 7]
    dev20 = torch.rand(20)
    sel = select_recompute(dev20, torch.ones(20, dtype=torch.bool), 0.15)  # 0.15*20 = 3, not 4
    assert int(sel.sum()) == 3
    assert set(sel.nonzero().flatten().tolist()) == set(dev20.topk(3).indices.tolist())


def test_always_include_does_not_use_budget():
    dev = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    reusable = torch.ones(6, dtype=torch.bool)
    always = torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.bool)
    sel = select_recompute(dev, reusable, 2 / 6, always=always)
    assert sel.nonzero().flatten().tolist() == [0, 1, 5]


def test_ties_pick_lower_index():
    dev = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 1.0])
    sel = select_recompute(dev, torch.ones(6, dtype=torch.bool), 0.5)
    assert sel.nonzero().flatten().tolist() == [1, 2, 3]
    assert torch.equal(sel, select_recompute(dev.clone(), torch.ones(6, dtype=torch.bool), 0.5))


def test_nan_deviation_is_recomputed():
    dev = torch.tensor([1.0, float("nan"), 3.0, 0.0])
    sel = select_recompute(dev, torch.ones(4, dtype=torch.bool), 0.25)
    assert sel.nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("target", ["k", "v", "kv"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_tp_all_reduce_matches_full_heads(target, norm):
    """Two 'ranks' with two heads each, summed by the hook, pick what all four heads pick."""
    fk, ck, fv, cv = _kv(n=30, heads=4, seed=3)
    reusable = torch.ones(30, dtype=torch.bool)
    reusable[:3] = False
    full = select_recompute(token_deviation(fk, ck, fv, cv, target, norm), reusable, 0.2)
    parts = [token_deviation(fk[:, s], ck[:, s], fv[:, s], cv[:, s], target, norm)
             for s in (slice(0, 2), slice(2, 4))]
    calls = []

    def all_reduce(rank_dev):  # stand-in for dist.all_reduce(SUM) on rank 0
        calls.append(rank_dev)
        return rank_dev + parts[1]

    sel = select_recompute(parts[0], reusable, 0.2, all_reduce=all_reduce)
    assert len(calls) == 1 and torch.equal(sel, full)
    assert int(sel[reusable].sum()) == math.ceil(0.2 * 27)


def test_bad_ratio_raises():
    dev, reusable = torch.zeros(4), torch.ones(4, dtype=torch.bool)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select_recompute(dev, reusable, bad)
        with pytest.raises(ValueError, match="ratio"):
            GradualFilter(reusable).step(dev, bad)


def test_gradual_filter_nests_and_counts_against_total():
    g = torch.Generator().manual_seed(7)
    n = 40
    reusable = torch.ones(n, dtype=torch.bool)
    reusable[-5:] = False  # suffix: 35 reusable
    always = torch.zeros(n, dtype=torch.bool)
    always[0] = True
    filt = GradualFilter(reusable, always)
    first = filt.step(torch.rand(n, generator=g), 0.3)
    assert int((first & reusable & ~always).sum()) == math.ceil(0.3 * 35)
    dev2 = torch.rand(n, generator=g)
    dev2[~first] = 1e9  # rows no longer selected must be ignored
    second = filt.step(dev2, 0.15)
    assert int((second & reusable & ~always).sum()) == math.ceil(0.15 * 35)
    assert torch.equal(second & first, second)  # later set ⊆ earlier set
    assert second[~reusable].all() and second[0]
    third = filt.step(torch.rand(n, generator=g), 0.5)  # cannot grow back
    assert torch.equal(third, second)


def test_request_ratio_scales_a_gradual_schedule():
    """A per-request ratio is the final share; earlier check layers keep the proportions."""
    from ucm.sparse.blend.blend import BlendStep, RequestRows

    n = 40
    reusable = torch.ones(n, dtype=torch.bool)
    reusable[-5:] = False  # the question
    requests = [RequestRows("plain", 0, n, reusable), RequestRows("asked", n, n, reusable, ratio=0.05)]
    step = BlendStep(requests, 2 * n, {1: 0.3, 4: 0.15})
    assert step.ratio_at(1, None) == 0.3 and step.ratio_at(4, None) == 0.15
    assert step.ratio_at(1, 0.05) == pytest.approx(0.1) and step.ratio_at(4, 0.05) == 0.05
    assert step.ratio_at(1, 1.0) == 1.0 and step.ratio_at(4, 1.0) == 1.0  # capped at 1
    g = torch.Generator().manual_seed(0)
    counts = {}
    for layer in (1, 4):
        rows = len(step.rows)
        step.select(layer, torch.randn(rows, 2, 4, generator=g), torch.zeros(rows, 2, 4))
        step.take_shrink()
        counts[layer] = {r.req_id: step.outcomes[r.req_id].num_recomputed_reusable for r in requests}
    assert counts[1] == {"plain": math.ceil(0.3 * 35), "asked": math.ceil(0.1 * 35 - 1e-9)}
    assert counts[4] == {"plain": math.ceil(0.15 * 35 - 1e-9), "asked": math.ceil(0.05 * 35)}
    zero_end = BlendStep(requests, 2 * n, {1: 0.3, 4: 0.0})
    assert zero_end.ratio_at(1, 0.2) == 0.2  # a schedule ending at 0 cannot be scaled


def test_tp_ranks_agree_on_reusable_rows():
    """A row is reusable only where every rank loaded it (a block missing on one rank's
    shard makes its rows recomputed on all ranks, so their selections line up)."""
    mine = [torch.tensor([True, True, False, True]), torch.tensor([True, False])]
    other = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # the other rank: rows, then its 1
    got = agree_reusable(mine, lambda t: t + other)
    assert [g.tolist() for g in got] == [[True, False, False, True], [True, False]]
    alone = agree_reusable(mine, lambda t: t)  # one rank: unchanged
    assert [g.tolist() for g in alone] == [m.tolist() for m in mine]
    assert all(g.dtype == torch.bool for g in got)
