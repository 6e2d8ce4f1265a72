"""The sparse-method registry, the process agent helpers and Blend's per-forward step."""

from __future__ import annotations

import pytest
import torch

from ucm.config import BlendConfig, CheckLayer
from ucm.sparse import factory, state
from ucm.sparse.base import UcmSparseBase, UcmSparseRole
from ucm.sparse.blend.blend import Blend, BlendStep, RequestRows


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="Blend"):
        factory.get_sparse_method_class("Blned")


def test_duplicate_registration_fails():
    with pytest.raises(ValueError, match="already registered"):
        factory.register_sparse_method("Blend", "x", "Y")


def test_lazy_import_and_registration_of_another_method():
    factory.register_sparse_method("NoOpForTest", "ucm.sparse.base", "UcmSparseBase")
    try:
        method = factory.create_sparse_method("NoOpForTest", None, UcmSparseRole.WORKER)
        assert type(method) is UcmSparseBase
    finally:
        factory._REGISTRY.pop("NoOpForTest")
    blend = factory.create_sparse_method("Blend", BlendConfig(chunk_end_token_id=2), UcmSparseRole.WORKER)
    assert isinstance(blend, Blend) and blend.check_ratios == {1: 0.15}


def test_helpers_are_identity_without_agent():
    state.set_sparse_agent(None)
    x = torch.randn(3, 4)
    pos = torch.arange(3)
    assert state.maybe_execute_layer_begin(0, pos, x, None) == (pos, x, None)
    assert state.maybe_execute_attention_forward(object(), x, x, x) is None
    idx = torch.tensor([2])
    assert state.maybe_execute_finished(idx) is idx


def test_helpers_call_the_agent():
    class Shrink(UcmSparseBase):
        def layer_begin(self, layer_index, positions, hidden_states, residual):
            return positions[:1], hidden_states[:1], residual

    agent = Shrink(None, UcmSparseRole.WORKER)
    state.set_sparse_agent(agent)
    try:
        with pytest.raises(RuntimeError):
            state.set_sparse_agent(Shrink(None, UcmSparseRole.WORKER))
        pos, h, _ = state.maybe_execute_layer_begin(0, torch.arange(3), torch.randn(3, 4), None)
        assert h.shape[0] == 1 and pos.tolist() == [0]
    finally:
        state.set_sparse_agent(None)


def _step(ratios: dict[int, float]) -> BlendStep:
    cfg = BlendConfig(chunk_end_token_id=2, check_layers=tuple(
        CheckLayer(i, f"model.layers.{i}.self_attn.attn", r) for i, r in ratios.items()))
    blend = Blend(cfg, UcmSparseRole.WORKER)
    reusable_a = torch.tensor([False, True, True, True, True, False])  # 4 reusable
    reusable_b = torch.zeros(3, dtype=torch.bool)  # a plain request in the same batch
    return blend.begin_step([RequestRows("a", 0, 6, reusable_a), RequestRows("b", 6, 3, reusable_b)], 9)


def test_step_keeps_top_ratio_and_every_non_reusable_row():
    step = _step({1: 0.5})
    assert step.active and step.computes_all_rows(0) and not step.computes_all_rows(1)
    fresh = torch.zeros(9, 2, 4)
    cached = torch.zeros(9, 2, 4)
    cached[2] = 5.0  # row 2 deviates most, then row 4
    cached[4] = 1.0
    keep = step.select(1, fresh, cached)
    assert keep.nonzero().flatten().tolist() == [0, 2, 4, 5, 6, 7, 8]
    local = step.take_shrink()
    assert local.tolist() == [0, 2, 4, 5, 6, 7, 8]
    assert step.rows.tolist() == [0, 2, 4, 5, 6, 7, 8]
    assert step.take_shrink() is None
    assert step.outcomes["a"].num_recomputed_reusable == 2


def test_gradual_filtering_narrows_rows():
    step = _step({1: 0.5, 2: 0.25})
    fresh = torch.zeros(9, 2, 4)
    cached = torch.zeros(9, 2, 4)
    cached[1], cached[2], cached[3], cached[4] = 1.0, 4.0, 2.0, 3.0
    step.select(1, fresh, cached)
    step.take_shrink()
    assert step.rows.tolist() == [0, 2, 4, 5, 6, 7, 8]
    keep = step.select(2, fresh[step.rows], cached[step.rows])
    step.take_shrink()
    assert step.rows.tolist() == [0, 2, 5, 6, 7, 8]  # row 2 kept; 4 dropped at the second check
    assert keep.sum() == 6


def test_selection_never_reads_the_device():
    """Selection on a GPU must not stall the host: run it on the meta device, where any
    read of a value (nonzero, item, cpu, bool) raises, and check the counts and shapes
    the host keeps. Two check layers, two requests."""
    step = _step({1: 0.5, 2: 0.25})
    fresh = torch.zeros(9, 2, 4, device="meta")
    keep = step.select(1, fresh, torch.zeros(9, 2, 4, device="meta"))
    assert keep.device.type == "meta" and keep.shape == (9,)
    assert step.row_counts == {"a": 4, "b": 3}  # a: 2 non-reusable + 2 of 4 reusable
    assert step.kept_local.shape == (7,) and step.take_shrink().shape == (7,)
    assert step.rows.shape == (7,) and step.rows.device.type == "meta"
    step.select(2, fresh[:7], torch.zeros(7, 2, 4, device="meta"))
    step.take_shrink()
    assert step.row_counts == {"a": 3, "b": 3} and step.rows.shape == (6,)
    assert step.outcomes["a"].num_recomputed_reusable == 1


def test_last_row_of_each_request_is_always_kept():
    cfg = BlendConfig(chunk_end_token_id=2, check_layers=(CheckLayer(0, "model.layers.0.self_attn.attn", 0.0),))
    blend = Blend(cfg, UcmSparseRole.WORKER)
    step = blend.begin_step([RequestRows("a", 0, 4, torch.ones(4, dtype=torch.bool))], 4)
    keep = step.select(0, torch.zeros(4, 1, 2), torch.ones(4, 1, 2))
    assert keep.tolist() == [False, False, False, True]


def test_per_request_ratio_overrides_config():
    cfg = BlendConfig(chunk_end_token_id=2)
    blend = Blend(cfg, UcmSparseRole.WORKER)
    step = blend.begin_step([RequestRows("a", 0, 5, torch.ones(5, dtype=torch.bool), ratio=1.0)], 5)
    assert step.select(1, torch.zeros(5, 1, 2), torch.ones(5, 1, 2)).all()


def test_step_without_reuse_is_inactive():
    blend = Blend(BlendConfig(chunk_end_token_id=2), UcmSparseRole.WORKER)
    step = blend.begin_step([RequestRows("a", 0, 3, torch.zeros(3, dtype=torch.bool))], 3)
    assert not step.active and step.computes_all_rows(5)
