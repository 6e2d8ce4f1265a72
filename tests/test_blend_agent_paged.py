"""The Blend agent's attention for a batch of requests: the paged kernel in one launch
(run by Triton's interpreter) against each request over its gathered context (sdpa).

Drives :class:`VllmBlendAgent` through a check layer and the layer after it the way the
patched model does (attention, shrink before the MLP, next layer), with a stand-in
worker holding strided paged caches; three requests share the step, one with no
reused rows and one whose context starts before the step (tokens computed earlier).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ucm.config import BlendConfig, CheckLayer
from ucm.integration.vllm.blend_agent import BatchInfo, VllmBlendAgent
from ucm.engine.kv_layout import flash_attn_view
from ucm.engine.step_meta import RequestStep, StepPlan
from ucm.sparse.base import UcmSparseRole
from ucm.sparse.blend import attention, paged_attention
from ucm.sparse.blend.blend import Blend

HEADS, KV_HEADS, DIM, BS, NUM_BLOCKS = 4, 2, 16, 8, 40
LAYERS = (1, 2)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention, "_BROKEN", {})
    monkeypatch.setattr(attention.KERNEL, "_broken", None)
    monkeypatch.setattr(attention, "_VERIFIED", set())
    monkeypatch.setattr(attention, "_WARNED", set())  # warnings are once per process


def _requests():
    """(req_id, block ids, tokens computed before the step, tokens scheduled, reused rows)."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    return [
        ("a", blocks[0:6], 0, 45, torch.rand(45, generator=g) < 0.8),
        ("b", blocks[6:9], 0, 20, torch.zeros(20, dtype=torch.bool)),  # nothing reused
        ("c", blocks[9:17], 24, 37, torch.rand(37, generator=g) < 0.8),  # 24 tokens cached already
    ]


def _run(backend: str, monkeypatch) -> tuple[list[torch.Tensor], dict[str, int]]:
    monkeypatch.setenv(attention.ENV_VAR, backend)
    g = torch.Generator().manual_seed(7)
    caches = {i: torch.randn(2, NUM_BLOCKS, BS, KV_HEADS, DIM, generator=g) for i in LAYERS}
    names = {i: f"model.layers.{i}.self_attn.attn" for i in LAYERS}
    views = {names[i]: flash_attn_view(caches[i], KV_HEADS, DIM) for i in LAYERS}
    reqs = _requests()
    worker = SimpleNamespace(views=views, vllm_block_size=BS, wait_loads=lambda: None,
                             reusable={r[0]: r[4] for r in reqs})
    meta = StepPlan()
    meta.blend_active = True
    for req_id, block_ids, computed, scheduled, _ in reqs:
        meta.requests[req_id] = RequestStep(req_id, block_ids, computed, scheduled, computed + scheduled, blend=True)
    config = BlendConfig(chunk_end_token_id=2, check_layers=(CheckLayer(1, names[1], 0.3),))
    agent = VllmBlendAgent(Blend(config, UcmSparseRole.WORKER), worker, lambda: meta)
    positions = torch.cat([torch.arange(c, c + s) for _, _, c, s, _ in reqs])
    agent.execute_begin(BatchInfo([r[0] for r in reqs], positions))
    assert agent.step is not None
    outs = []
    rows = positions.shape[0]
    for i in LAYERS:
        layer = SimpleNamespace(layer_name=names[i], num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=DIM,
                                impl=SimpleNamespace(scale=0.3))
        q = torch.randn(rows, HEADS * DIM, generator=g)
        k = torch.randn(rows, KV_HEADS * DIM, generator=g)
        v = torch.randn(rows, KV_HEADS * DIM, generator=g)
        outs.append(agent.attention_forward(layer, q, k, v))
        hidden, residual = agent.before_mlp(torch.zeros(rows, 1), torch.zeros(rows, 1))
        rows = hidden.shape[0]
    counts = dict(agent.step.row_counts)
    agent.execute_finished(torch.arange(1))
    return outs, counts


def _count_launches(monkeypatch) -> list[int]:
    """Record the number of requests of every paged-kernel launch."""
    launches: list[int] = []
    real = paged_attention.paged_attention_batch

    def counted(q, positions, k_cache, v_cache, batch, *args, **kwargs):
        launches.append(batch.seq_lens.shape[0])
        return real(q, positions, k_cache, v_cache, batch, *args, **kwargs)

    monkeypatch.setattr(paged_attention, "paged_attention_batch", counted)
    return launches


def test_one_launch_for_the_batch_equals_each_request_gathered(monkeypatch):
    gathered, counts = _run("sdpa", monkeypatch)
    launches = _count_launches(monkeypatch)
    paged, paged_counts = _run("triton", monkeypatch)
    assert launches == [3, 3]  # one launch per layer, for all three requests
    assert f"{attention.PAGED}:batch" in attention._VERIFIED and not attention._BROKEN and not attention.KERNEL.broken
    assert paged_counts == counts
    assert counts["b"] == 20 and 0 < counts["a"] < 45 and 0 < counts["c"] < 37  # b has nothing to reuse
    assert gathered[0].shape == (102, HEADS * DIM) and gathered[1].shape[0] == sum(counts.values())
    for got, want in zip(paged, gathered):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_kernel_failing_its_check_mid_step_falls_back_to_the_gathered_path(monkeypatch):
    gathered, _ = _run("sdpa", monkeypatch)
    real = paged_attention.paged_attention_batch
    monkeypatch.setattr(paged_attention, "paged_attention_batch", lambda *a, **kw: real(*a, **kw) * 1.5)
    paged, _ = _run("triton", monkeypatch)
    assert "differs from the reference" in attention.KERNEL.broken
    for got, want in zip(paged, gathered):  # both layers: the wrong output was never used
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
