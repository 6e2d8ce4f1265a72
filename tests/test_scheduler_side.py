"""The scheduler-side planner without an engine, in the style of vLLM's connector unit
tests: a store, prompts, and the scheduler's outputs as plain objects, step by step."""

from __future__ import annotations

import pytest
import torch

from ucm.config import UcmConfig
from ucm.engine.scheduler_side import SchedulerSide
from ucm.engine.step_meta import ScheduledRequest
from ucm.hashing import HashContext, block_keys, chunk_block_keys, rank_key
from ucm.sparse.blend.chunking import Delimiter
from ucm.store.dram_store import UcmDramStore

B = 4  # ucm block tokens
END = 2
CTX = HashContext(model_id="m", kv_dtype="f32", tp_size=1)
SYS, C1, C2, C3 = [9] * 7 + [END], [3] * 7 + [END], [4] * 7 + [END], [5] * 7 + [END]
Q = [6, 6, 6]


def _side(store: UcmDramStore) -> SchedulerSide:
    config = UcmConfig.from_dict({"block_tokens": B, "ucm_sparse_config": {"Blend": {
        "chunk_end_token_id": END, "pay_policy": "always"}}})
    return SchedulerSide(config, store, CTX, B, 1, Delimiter(chunk_end_token_id=END), num_layers=4)


def _store(*prefixes: list[int], chunks: tuple[list[int], ...] = ()) -> UcmDramStore:
    store = UcmDramStore(capacity_bytes=1 << 20)
    seed = CTX.seed(None)
    keys = [k for p in prefixes for k in block_keys(seed, p, B)] + \
           [k for c in chunks for k in chunk_block_keys(seed, c, B)]
    store.dump([rank_key(k, 0) for k in keys], [torch.zeros(2)] * len(keys), "x").result()
    return store


def _new(req_id: str, blocks: list[int], computed: int, scheduled: int) -> list[ScheduledRequest]:
    return [ScheduledRequest(req_id, computed, scheduled, blocks, new=True)]


def _cached(req_id: str, new_blocks: list[int] | None, computed: int, scheduled: int,
            resumed: bool = False) -> list[ScheduledRequest]:
    return [ScheduledRequest(req_id, computed, scheduled, new_blocks, resumed=resumed)]


def test_prefix_hits_are_reported_and_chunk_hits_are_loaded_not_reported():
    prompt = SYS + C2 + C1 + Q
    side = _side(_store(SYS, chunks=(C1, C2)))
    assert side.num_new_matched_tokens("r", prompt, None, 0) == 8  # SYS's two blocks: exact prefix
    side.after_alloc("r", 8)
    meta = side.build_meta(_new("r", [0, 1, 2], 8, len(prompt) - 8))
    step = meta.requests["r"]
    prefix = [l for l in step.loads if not l.chunk]
    chunk = [l for l in step.loads if l.chunk]
    assert [(l.lo, l.hi) for l in prefix] == [(0, 4), (4, 8)]
    assert sorted((l.lo, l.rope_delta) for l in chunk) == [(8, 8), (12, 8), (16, 16), (20, 16)]
    assert meta.blend_active and step.blend
    # Nothing new to save: SYS and both chunks are stored, and the blocks after the first
    # reused chunk token hold approximate KV, never saved under prefix keys.
    assert step.saves == []


def test_a_missing_middle_chunk_does_not_stop_later_chunks():
    prompt = SYS + C1 + C3 + C2 + Q
    side = _side(_store(chunks=(C1, C2)))
    assert side.num_new_matched_tokens("r", prompt, None, 0) == 0
    side.after_alloc("r", 0)
    step = side.build_meta(_new("r", [0, 1], 0, len(prompt))).requests["r"]
    starts = sorted(l.token_start for l in step.loads if l.chunk)
    assert starts == [8, 12, 24, 28]  # C1 and C2, not C3 (never stored)
    saved = {s.token_start for s in step.saves}
    assert {16, 20} <= saved  # C3's blocks are saved for later requests


def test_chunked_prefill_loads_each_block_in_the_step_that_computes_it():
    prompt = SYS + C1 + C2 + Q
    side = _side(_store(chunks=(C1, C2)))
    side.num_new_matched_tokens("r", prompt, None, 0)
    side.after_alloc("r", 0)
    first = side.build_meta(_new("r", [0], 0, 14)).requests["r"]
    assert [(l.lo, l.hi) for l in first.loads] == [(8, 12), (12, 14)]  # C1's second block split at the edge
    assert first.saves == []  # the prompt is not complete yet
    second = side.build_meta(_cached("r", [1], 14, len(prompt) - 14)).requests["r"]
    assert [(l.lo, l.hi) for l in second.loads] == [(14, 16), (16, 20), (20, 24)]
    assert second.block_ids == [0, 1] and second.saves


def test_a_preempted_request_reloads_and_saves_again_when_resumed():
    prompt = SYS + C1 + C3 + Q
    side = _side(_store(SYS, chunks=(C1,)))  # C3 is new: saved as a chunk
    side.num_new_matched_tokens("r", prompt, None, 0)
    side.after_alloc("r", 8)
    first = side.build_meta(_new("r", [0, 1], 8, len(prompt) - 8)).requests["r"]
    assert any(not l.chunk for l in first.loads) and first.saves
    # Preempted: vLLM freed its blocks and schedules it again from 0 with new blocks.
    side.num_new_matched_tokens("r", prompt, None, 0)
    side.after_alloc("r", 8)
    again = side.build_meta(_cached("r", [5, 6], 8, len(prompt) - 8, resumed=True)).requests["r"]
    assert again.block_ids == [5, 6]
    assert [(l.lo, l.hi) for l in again.loads if not l.chunk] == [(0, 4), (4, 8)]
    assert again.saves


def test_a_request_without_chunks_or_hits_ships_nothing():
    side = _side(_store())
    prompt = Q * 5
    assert side.num_new_matched_tokens("r", prompt, None, 0) == 0
    side.after_alloc("r", 0)
    meta = side.build_meta(_new("r", [0], 0, len(prompt)))
    assert not meta.blend_active
    assert [s.token_start for s in meta.requests["r"].saves] == [0, 4, 8]  # its full blocks, saved
    assert side.finished("r").plan.chunk_hit_tokens == 0 and side.finished("r") is None


def test_a_decoding_request_is_not_planned_again_unless_a_blend_step_needs_its_rows(monkeypatch):
    """Once a request's prompt is loaded, computed and saved, its decode steps cost the planner
    nothing (no RequestStep, no copy of its block ids): that host time is paid by every decode
    step of every request. A step where another request blends still lists it, with every block
    it gained meanwhile."""
    prompt = SYS + C1 + Q
    side = _side(_store(chunks=(C1,)))
    side.num_new_matched_tokens("r", prompt, None, 0)
    side.after_alloc("r", 0)
    side.build_meta(_new("r", [0, 1, 2], 0, len(prompt)))  # the whole prompt: loads, blend, saves
    planned = []
    real_step = side._step
    monkeypatch.setattr(side, "_step", lambda req_id, *a: planned.append(req_id) or real_step(req_id, *a))
    for i in range(5):  # decode steps; the fifth adds block 3
        meta = side.build_meta(_cached("r", [3] if i == 4 else None, len(prompt) + i, 1))
        assert meta.requests == {} and not meta.blend_active
    assert planned == []
    # A second request blends: the decoding one is listed too, with all its blocks.
    side.num_new_matched_tokens("s", SYS + C1 + Q, None, 0)
    side.after_alloc("s", 0)
    meta = side.build_meta(_cached("r", None, len(prompt) + 5, 1) + _new("s", [7, 8, 9], 0, len(prompt)))
    assert meta.blend_active and list(meta.requests) == ["r", "s"]
    assert meta.requests["r"].block_ids == [0, 1, 2, 3] and meta.requests["r"].num_scheduled == 1
    assert not meta.requests["r"].loads and not meta.requests["r"].saves


def test_where_reuse_cannot_pay_no_chunk_is_looked_up_or_saved():
    """Where the pay policy measured that reusing a prompt's chunks could not pay even if every
    chunk hit (a 0.5B model on an H100: Blend estimated at 88 ms against 20-25 ms plain), the
    request runs as vLLM's own prefill and ucm does no chunk work for it: no chunk key is
    looked up, no chunk block is saved, and the prompt is saved under prefix keys only up to
    its first chunk (the shared system prompt; later blocks would only be hit by the same
    passages in the same order). On the 0.5B shape a cold 8K prompt spent 5.3 ms planning and
    5.1 ms saving through ucm against a 24.5 ms plain prefill. Its stats say why."""
    from ucm.sparse.blend.pay_policy import StepSample

    prompt = SYS + C1 + C2 + Q
    seed = CTX.seed(None)
    chunk_keys = set(chunk_block_keys(seed, C1, B)) | set(chunk_block_keys(seed, C2, B))
    store = _store(chunks=(C1,))  # one chunk stored: a lookup would find it
    asked: list[bytes] = []
    lookup = store.lookup
    store.lookup = lambda keys: (asked.extend(keys), lookup(keys))[1]  # type: ignore[method-assign]
    side = _side(store)
    side.pay_policy.enabled = True
    for rows in (256, 512, 1024):  # a plain prefill costs ~1 ms; a Blend step 50 ms more
        side.pay_policy.observe(StepSample(rows=rows, seconds=1e-3 + rows * 1e-6))
        side.pay_policy.observe(StepSample(rows=rows, blend=True, kept=rows // 5, seconds=0.05))
    assert side.num_new_matched_tokens("r", prompt, None, 0) == 0
    assert not chunk_keys & set(asked)  # no chunk key looked up
    side.after_alloc("r", 0)
    step = side.build_meta(_new("r", [0, 1], 0, len(prompt))).requests["r"]
    assert not step.loads and not step.blend
    assert {s.key for s in step.saves} == set(block_keys(seed, SYS, B))  # the system prompt's blocks
    stats = side.finished("r").decision_stats()
    assert stats["blend_decision"] == "plain" and stats["blend_reason"] == "cannot pay"
    assert stats["chunk_saves"] == "skipped: reuse cannot pay" and stats["est_blend_ms"] > stats["est_plain_ms"]
    # Where reuse may pay (nothing measured yet), the same cold request looks its chunks up and saves them.
    fresh = _side(_store())
    fresh.pay_policy.enabled = True
    fresh.num_new_matched_tokens("r", prompt, None, 0)
    fresh.after_alloc("r", 0)
    saved = {s.key for s in fresh.build_meta(_new("r", [0, 1], 0, len(prompt))).requests["r"].saves}
    assert chunk_keys <= saved and set(block_keys(seed, prompt, B)) <= saved


def _token_loads(steps) -> set[tuple[bytes, int, int]]:
    """(key, prompt token, rope delta) of every token the steps' chunk loads write."""
    return {(l.key, t, l.rope_delta) for step in steps for l in step.loads if l.chunk for t in range(l.lo, l.hi)}


@pytest.mark.parametrize("split_at", [5, 9, 14, 17, 21, 30])
def test_one_step_loads_the_same_chunk_tokens_as_a_chunked_prefill(split_at):
    """The whole prompt in one step takes every chunk hit whole; split in two pieces at any
    token, the pieces' clipped loads write exactly the same tokens with the same shifts."""
    prompt = SYS + C2 + C3 + C1 + Q
    whole_side = _side(_store(chunks=(C1, C2)))
    whole_side.num_new_matched_tokens("w", prompt, None, 0)
    whole_side.after_alloc("w", 0)
    whole = whole_side.build_meta(_new("w", [0, 1, 2, 3, 4, 5, 6], 0, len(prompt))).requests["w"]
    assert whole.blend and whole.chunk_starts == (8, 24)
    assert all(l.hi - l.lo == B and l.lo == l.token_start for l in whole.loads if l.chunk)
    split_side = _side(_store(chunks=(C1, C2)))
    split_side.num_new_matched_tokens("s", prompt, None, 0)
    split_side.after_alloc("s", 0)
    first = split_side.build_meta(_new("s", [0, 1, 2], 0, split_at)).requests.get("s")
    second = split_side.build_meta(_cached("s", [3, 4, 5, 6], split_at, len(prompt) - split_at)).requests["s"]
    assert _token_loads([whole]) == _token_loads([s for s in (first, second) if s is not None])
    assert [tuple(s) for s in whole.saves] == [tuple(s) for s in second.saves]


def test_decode_steps_keep_block_ids_without_planning_and_a_later_blend_step_lists_them_all():
    """Once every tracked request has nothing left to do (decoding), a step is answered by
    :meth:`SchedulerSide.idle_step` alone: no per-request planning, only the new block ids
    kept. A request that arrives later and blends then lists the decode request's blocks,
    all of them, as a Blend step needs every request's blocks."""
    side = _side(_store(chunks=(C1, C2)))
    first = SYS + C3 + Q  # nothing stored to reuse: runs plain, then decodes
    side.num_new_matched_tokens("d", first, None, 0)
    side.after_alloc("d", 0)
    assert side.has_pending()
    side.build_meta(_new("d", [0, 1, 2], 0, len(first)))
    side.build_meta(_cached("d", None, len(first), 1))  # its first decode step: now idle
    assert not side.has_pending()
    side.idle_step([("d", [3]), ("d", None), ("unknown", [9])])
    side.idle_step([("d", [4])])
    second = SYS + C1 + C2 + Q
    side.num_new_matched_tokens("b", second, None, 0)
    side.after_alloc("b", 0)
    assert side.has_pending()
    meta = side.build_meta(_new("b", [10, 11, 12], 0, len(second)) + _cached("d", [5], len(first) + 3, 1))
    assert meta.blend_active
    assert meta.requests["d"].block_ids == [0, 1, 2, 3, 4, 5]
    side.finished("b")
    side.build_meta(_cached("d", None, len(first) + 4, 1))
    assert not side.has_pending()
