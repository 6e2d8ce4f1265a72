"""A chunk load with a Blend agent is deferred to its first reader (EngineOptions.defer_chunk_loads):
start_load writes prefix blocks at once and leaves chunk layers untouched; the first read
of a chunk layer (or wait_loads) writes every chunk layer, exactly as an immediate load
would; a step whose chunk load nobody issued is refused, never silently lost."""

from __future__ import annotations

import pytest
import torch

from ucm.config import EngineOptions
from ucm.engine import worker_side as ws
from ucm.engine.kv_layout import PendingLoad
from ucm.engine.kv_saver import BLOCK_LAYOUT
from ucm.engine.step_meta import BlockLoad, RequestStep, StepPlan
from ucm.engine.worker_side import LayerInfo, WorkerSide
from ucm.hashing import rank_key
from ucm.store.dram_store import UcmDramStore

HEADS, DIM, LAYERS, VBS, BT, NUM_BLOCKS = 2, 8, 3, 8, 4, 6
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _worker(defer: bool, options: EngineOptions = EngineOptions()) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    store = UcmDramStore(capacity_bytes=1 << 20)
    worker = WorkerSide(store, block_tokens=BT, tp_rank=0, rope=None, first_check_layer=1, max_step_tokens=64,
                        options=options)
    caches = {name: torch.zeros(2, NUM_BLOCKS, VBS, HEADS, DIM) for name in NAMES}  # FLASH_ATTN planes
    worker.register(caches, [LayerInfo(name, i, "FLASH_ATTN", HEADS, DIM) for i, name in enumerate(NAMES)])
    worker.defer_chunk_loads = defer
    g = torch.Generator().manual_seed(3)
    blocks = {key: torch.randn(LAYERS, 2, BT, HEADS, DIM, generator=g) for key in (b"p0", b"c0", b"c1")}
    store.wait(store.dump([rank_key(k, 0) for k in blocks], list(blocks.values()), BLOCK_LAYOUT))
    return worker, caches


def _meta() -> StepPlan:
    """One request of 16 tokens: a prefix block (rows 0-3), chunk blocks for rows 4-7 and
    8-10 (the last one partial), rows 11-15 computed."""
    meta = StepPlan()
    meta.blend_active = True
    req = RequestStep("r", block_ids=[4, 1], num_computed=0, num_scheduled=16, prompt_len=16, blend=True)
    req.loads = [BlockLoad(b"p0", 0, 0, 4, 0, chunk=False), BlockLoad(b"c0", 4, 4, 8, 0, chunk=True),
                 BlockLoad(b"c1", 8, 8, 11, 0, chunk=True)]
    meta.requests["r"] = req
    return meta


def _snapshot(caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [caches[name].clone() for name in NAMES]


def test_chunk_layers_are_written_by_their_first_reader_only():
    worker, caches = _worker(defer=True)
    worker.start_load(_meta())
    assert worker.reusable["r"].tolist() == [False] * 4 + [True] * 7 + [False] * 5
    k0 = caches[NAMES[0]][0]  # layer 0: the prefix block only (chunks are recomputed there)
    assert k0[4, :4].abs().sum() > 0 and k0[4, 4:].abs().sum() == 0
    for name in NAMES[1:]:
        assert caches[name][:, 4, 4:].abs().sum() == 0 and caches[name][:, 1].abs().sum() == 0
        assert isinstance(worker.views[name].ready, PendingLoad)
    worker.views[NAMES[2]].wait_ready()  # any chunk layer's first read issues the whole load
    for name in NAMES[1:]:
        assert worker.views[name].ready is None
        assert caches[name][:, 4, 4:].abs().sum() > 0 and caches[name][:, 1, :3].abs().sum() > 0
        assert caches[name][:, 1, 3:].abs().sum() == 0  # row 11 on: not loaded


def test_deferred_load_writes_what_an_immediate_load_writes():
    deferred, caches_d = _worker(defer=True)
    deferred.start_load(_meta())
    deferred.wait_loads()  # no reader (e.g. a step vLLM's backend computes): issued here
    assert deferred._deferred is None
    immediate, caches_i = _worker(defer=True, options=EngineOptions(defer_chunk_loads=False))
    immediate.start_load(_meta())
    assert all(view.ready is None for view in immediate.views.values())
    for got, want in zip(_snapshot(caches_d), _snapshot(caches_i)):
        assert torch.equal(got, want)
    assert any(t.abs().sum() > 0 for t in _snapshot(caches_i)[1:])


def test_a_chunk_load_never_issued_is_refused_at_the_next_step():
    worker, _ = _worker(defer=True)
    worker.start_load(_meta())
    with pytest.raises(RuntimeError, match="never issued"):
        worker.start_load(_meta())


def test_without_an_agent_chunk_loads_are_not_deferred():
    worker, caches = _worker(defer=False)
    worker.start_load(_meta())
    assert caches[NAMES[1]][:, 4, 4:].abs().sum() > 0
    assert worker._deferred is None


def test_a_forward_without_a_blend_step_issues_the_load_before_the_backend_runs():
    """The agent runs no Blend step (here: the metadata is not Blend-active), so vLLM's
    backend computes every row and writes every layer: the load must land first."""
    from ucm.config import BlendConfig, CheckLayer
    from ucm.integration.vllm.blend_agent import BatchInfo, VllmBlendAgent
    from ucm.sparse.base import UcmSparseRole
    from ucm.sparse.blend.blend import Blend

    worker, caches = _worker(defer=False)
    meta = _meta()
    config = BlendConfig(chunk_end_token_id=2, check_layers=(CheckLayer(1, NAMES[1], 0.15),))
    agent = VllmBlendAgent(Blend(config, UcmSparseRole.WORKER), worker, lambda: meta)
    assert worker.defer_chunk_loads  # the agent turns deferral on
    worker.start_load(meta)
    assert isinstance(worker.views[NAMES[1]].ready, PendingLoad)
    meta.blend_active = False
    agent.execute_begin(BatchInfo(["r"], torch.arange(16)))
    assert agent.step is None and worker._deferred is None
    assert caches[NAMES[1]][:, 4, 4:].abs().sum() > 0


def test_a_failed_issue_stays_owed(monkeypatch):
    """A write that fails while issued (e.g. out of memory staging it) is not forgotten:
    the reader sees the error, and the load is still pending for the next reader."""
    worker, caches = _worker(defer=True)
    worker.start_load(_meta())

    def fail(*args, **kwargs):
        raise MemoryError("staging")

    monkeypatch.setattr(ws, "stage_runs", fail)
    with pytest.raises(MemoryError):
        worker.views[NAMES[1]].wait_ready()
    assert worker._deferred is not None
    monkeypatch.undo()
    worker.views[NAMES[2]].wait_ready()
    assert worker._deferred is None and caches[NAMES[1]][:, 4, 4:].abs().sum() > 0
