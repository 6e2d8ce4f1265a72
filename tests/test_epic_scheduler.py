"""The planner under EPIC and Blend's per-request options: what a step tells the worker."""

from __future__ import annotations

from ucm.config import UcmConfig
from ucm.engine.scheduler_side import SchedulerSide, request_epic_tokens, request_selection
from ucm.sparse.blend.chunking import Delimiter
from tests.test_scheduler_side import B, C1, C2, CTX, END, Q, SYS, _new, _store


def _side(store, method: str, num_layers: int = 4, **section) -> SchedulerSide:
    config = UcmConfig.from_dict({"block_tokens": B, "ucm_sparse_config": {method: {
        "chunk_end_token_id": END, **section}}})
    return SchedulerSide(config, store, CTX, B, 1, Delimiter(chunk_end_token_id=END), num_layers=num_layers)


def test_an_epic_step_ships_where_reused_chunks_begin_and_the_question():
    side = _side(_store(chunks=(C1, C2)), "EPIC", pay_policy="always")
    prompt = SYS + C1 + C2 + Q  # chunks at 8 and 16, the question at 24
    side.num_new_matched_tokens("r", prompt, None, 0, epic_tokens=3)
    step = side.build_meta(_new("r", [0, 1, 2, 3, 4, 5, 6], 0, len(prompt))).requests["r"]
    assert step.blend and [load.token_start for load in step.loads] == [8, 12, 16, 20]
    assert step.chunk_starts == (8, 16) and step.suffix_start == 24 and step.recompute_tokens == 3


def test_epic_pay_policy_counts_no_layer_in_full_and_its_k_as_the_share():
    side = _side(_store(chunks=(C1, C2)), "EPIC", num_layers=4, recompute_tokens=2)
    assert side.pay_policy.pre == 0.0 and side.pay_policy.enabled
    tracked = side.plan_request("r", SYS + C1 + C2 + Q, None)
    assert side._recompute_share(tracked, 16) == 2 * 2 / 16
    blend = _side(_store(), "Blend", num_layers=4)
    assert blend.pay_policy.pre == 0.5  # layers 0 and 1 (the check layer) compute every row


def test_blend_ships_the_per_request_selection():
    side = _side(_store(chunks=(C1,)), "Blend", pay_policy="always")
    prompt = SYS + C1 + Q
    side.num_new_matched_tokens("r", prompt, None, 0, selection="query")
    step = side.build_meta(_new("r", [0, 1, 2, 3, 4], 0, len(prompt))).requests["r"]
    assert step.selection == "query" and step.suffix_start == 16 and step.chunk_starts == (8,)


def test_per_request_arguments_are_checked_and_bad_ones_ignored():
    assert request_epic_tokens({"ucm_epic_tokens": 0}) == 0
    assert request_epic_tokens({"ucm_epic_tokens": -1}) is None
    assert request_epic_tokens({"ucm_epic_tokens": True}) is None
    assert request_epic_tokens(None) is None
    assert request_selection({"ucm_blend_selection": "mixed"}) == "mixed"
    assert request_selection({"ucm_blend_selection": "attention"}) is None
