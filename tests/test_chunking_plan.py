"""Prompt splitting (both delimiter modes) and the scheduler-side reuse plan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm.hashing import HashContext, block_keys
from ucm.sparse.blend.chunking import Delimiter, Span, split_by_end_token, split_by_separator, split_prompt
from ucm.sparse.blend.plan import build_plan

END = 2
SEED = HashContext("m", "f32").seed()


def test_end_token_mode_spans():
    tokens = [9, 9, END, 5, 5, 5, END, 6, END, 7, 7]
    s = split_by_end_token(tokens, END)
    assert s.prefix == Span(0, 3)
    assert s.chunks == (Span(3, 7), Span(7, 9))
    assert s.suffix == Span(9, 11)


def test_no_delimiter_is_all_prefix():
    s = split_by_end_token([1, 3, 4], END)
    assert not s.has_chunks and s.prefix == Span(0, 3) and len(s.suffix) == 0


def test_separator_mode_spans():
    sep = [8, 8]
    tokens = [1, 1, 8, 8, 3, 3, 3, 8, 8, 4, 8, 8, 5, 5]
    s = split_by_separator(tokens, sep)
    assert s.prefix == Span(0, 2)
    assert s.chunks == (Span(4, 7), Span(9, 10))
    assert s.suffix == Span(12, 14)
    assert s.separators == (Span(2, 4), Span(7, 9), Span(10, 12))


def test_delimiter_needs_exactly_one_mode():
    with pytest.raises(ValueError):
        Delimiter()
    with pytest.raises(ValueError):
        Delimiter(chunk_end_token_id=2, separator_token_ids=(3,))
    with pytest.raises(ValueError):
        Delimiter(separator_token_ids=())


token_lists = st.lists(st.integers(min_value=0, max_value=6), max_size=80)


@settings(max_examples=200, deadline=None)
@given(token_lists)
def test_end_token_split_covers_prompt_in_order(tokens):
    s = split_prompt(tokens, Delimiter(chunk_end_token_id=END))
    spans = [s.prefix, *s.chunks, s.suffix]
    assert spans[0].start == 0 and spans[-1].end == len(tokens)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    if END in tokens:
        assert all(tokens[span.end - 1] == END for span in [s.prefix, *s.chunks])
    else:
        assert not s.chunks and s.prefix == Span(0, len(tokens))
    assert END not in tokens[s.suffix.start:s.suffix.end]


@settings(max_examples=200, deadline=None)
@given(token_lists, st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=3))
def test_separator_split_rebuilds_prompt(tokens, sep):
    s = split_prompt(tokens, Delimiter(separator_token_ids=tuple(sep)))
    pieces = sorted([s.prefix, *s.chunks, s.suffix, *s.separators], key=lambda x: (x.start, x.end))
    rebuilt = [t for p in pieces for t in tokens[p.start:p.end]]
    assert rebuilt == list(tokens)
    for span in s.separators:
        assert list(tokens[span.start:span.end]) == sep


def _store(*token_lists_to_cache):
    keys = set()
    for tokens in token_lists_to_cache:
        keys.update(block_keys(SEED, tokens, 4))
    return lambda ks: [k in keys for k in ks]


def test_plan_reordered_chunks_hit_with_rope_deltas():
    sys_, c1, c2 = [9] * 5 + [END], [3] * 7 + [END], [4] * 11 + [END]
    prompt = sys_ + c2 + c1 + [7, 7]
    plan = build_plan(prompt, split_by_end_token(prompt, END), SEED, 4, _store(c1, c2))
    assert plan.prefix_hit_tokens == 0
    starts = sorted((h.token_start, h.rope_delta) for h in plan.chunk_hits)
    # c2 starts at 6 (3 full blocks), c1 at 18 (2 full blocks); delta = new start - stored start
    assert starts == [(6, 6), (10, 6), (14, 6), (18, 18), (22, 18)]
    assert plan.chunk_hit_tokens == 20


def test_plan_prefix_hit_then_chunk_hits_and_missing_middle_chunk():
    sys_, c1, c2, c3 = [9] * 7 + [END], [3] * 7 + [END], [4] * 7 + [END], [5] * 7 + [END]
    prompt = sys_ + c1 + c2 + c3 + [1]
    plan = build_plan(prompt, split_by_end_token(prompt, END), SEED, 4, _store(sys_ + c1, c3))
    assert plan.prefix_hit_tokens == 16  # sys + c1 as a cached prefix
    assert {h.token_start for h in plan.chunk_hits} == {24, 28}  # c3; c2 is missing
    # Only exact blocks are saved under prefix keys: those before the first reused token.
    assert all(s.token_start + 4 <= 24 for s in plan.prefix_saves)
    assert {s.token_start for s in plan.chunk_saves} == {16, 20}  # c2's blocks, saved as a chunk
    assert all(s.stored_pos_start == s.token_start - 16 for s in plan.chunk_saves)


def test_plan_repeated_chunk_hits_twice_and_short_chunk_is_skipped():
    c1 = [3] * 7 + [END]
    short = [6, END]
    prompt = [END] + c1 + short + c1 + [1]
    plan = build_plan(prompt, split_by_end_token(prompt, END), SEED, 4, _store(c1, short))
    assert sorted(h.token_start for h in plan.chunk_hits) == [1, 5, 11, 15]
    assert plan.num_chunk_tokens == 18


def test_plan_without_split_is_prefix_caching_only():
    prompt = list(range(30))
    plan = build_plan(prompt, None, SEED, 4, _store(list(range(12))))
    assert plan.prefix_hit_tokens == 12 and not plan.chunk_hits
    assert [s.token_start for s in plan.prefix_saves] == [12, 16, 20, 24]


def test_plan_chunk_precompute_stores_the_chunk_once():
    """A precompute request (prefix + one chunk) keeps the chunk under chunk keys only."""
    sys_, c1 = [9] * 7 + [END], [3] * 11 + [END]
    prompt = sys_ + c1
    split = split_by_end_token(prompt, END)
    plain = build_plan(prompt, split, SEED, 4, _store())
    pre = build_plan(prompt, split, SEED, 4, _store(), chunk_precompute=True)
    assert [s.token_start for s in plain.prefix_saves] == [0, 4, 8, 12, 16]  # chunk stored twice
    assert [s.token_start for s in pre.prefix_saves] == [0, 4]  # the prompt prefix only
    assert pre.chunk_saves == plain.chunk_saves and [s.token_start for s in pre.chunk_saves] == [8, 12, 16]
    # The chunk saved behind the prefix is found by a prompt that puts it anywhere.
    stored = _store(sys_, c1)
    later = [END] + [5] * 3 + [END] + c1 + [1]
    hits = build_plan(later, split_by_end_token(later, END), SEED, 4, stored).chunk_hits
    assert [h.token_start for h in hits] == [5, 9, 13]
    # A chunk precomputed alone is all "prefix": the flag changes nothing there.
    alone = build_plan(c1, split_by_end_token(c1, END), SEED, 4, _store(), chunk_precompute=True)
    assert [s.token_start for s in alone.prefix_saves] == [0, 4, 8]


def _eager_prefix(prompt, stored, block):
    """The plan's prefix part computed the obvious way: hash every block, then look up."""
    keys = block_keys(SEED, prompt, block)
    hit = 0
    while hit < len(keys) and keys[hit] in stored:
        hit += 1
    return hit * block, keys


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=3, max_value=6), min_size=0, max_size=300),
       st.lists(st.booleans(), min_size=80, max_size=80))
def test_lazy_prefix_lookup_equals_hashing_everything(prompt, stored_mask):
    """Lookup in growing batches finds the same prefix hit and saves as hashing all blocks."""
    block = 2
    keys = block_keys(SEED, prompt, block)
    stored = {k for k, keep in zip(keys, stored_mask) if keep}
    plan = build_plan(prompt, None, SEED, block, lambda ks: [k in stored for k in ks])
    hit_tokens, eager_keys = _eager_prefix(prompt, stored, block)
    assert plan.prefix_hit_tokens == hit_tokens
    assert [h.key for h in plan.prefix_hits] == eager_keys[:hit_tokens // block]
    assert [s.key for s in plan.prefix_saves] == eager_keys[hit_tokens // block:]


def test_prefix_lookup_stops_hashing_at_the_first_miss():
    """A long prompt whose second block misses asks the store about one small batch only."""
    sys_, chunk = [9] * 7 + [END], [3] * 39 + [END]
    prompt = sys_ + chunk * 20 + [1]  # 201 blocks of 4
    asked: list[bytes] = []
    stored = set(block_keys(SEED, sys_, 4)[:1]) | set(block_keys(SEED, chunk, 4))

    def exists(keys):
        asked.extend(keys)
        return [k in stored for k in keys]

    plan = build_plan(prompt, split_by_end_token(prompt, END), SEED, 4, exists)
    assert plan.prefix_hit_tokens == 4
    assert len(plan.chunk_hits) == 200
    prefix_asked = [k for k in asked if k not in set(block_keys(SEED, chunk, 4))]
    assert len(prefix_asked) <= 8  # one first batch, not 201 keys
    # Prefix saves stop before the first reused chunk token (block 1 only).
    assert [s.token_start for s in plan.prefix_saves] == [4]


def test_first_reused_token_is_where_kv_turns_approximate():
    sys_, c1, c2 = [9] * 5 + [END], [3] * 7 + [END], [4] * 11 + [END]
    prompt = sys_ + c2 + c1 + [7, 7]
    plan = build_plan(prompt, split_by_end_token(prompt, END), SEED, 4, _store(c1, c2))
    assert plan.first_reused_token() == 6  # c2's first block
    assert plan.first_reused_token(computed=8) == 8  # vLLM computed part of that block itself
    assert plan.first_reused_token(computed=26) is None  # every chunk hit already computed
    no_hits = build_plan(prompt, split_by_end_token(prompt, END), SEED, 4, _store())
    assert no_hits.first_reused_token() is None


def _reference_chunk_blocks(prompt, split, stored, block, prefix_hit_tokens, min_chunk_tokens=1):
    """Every chunk block the plan may reuse, the obvious way: chunk by chunk, block by
    block, skipping blocks that start inside the prefix hit; (hits, saves) as
    (key, token_start, stored_pos_start)."""
    hits, saves = [], []
    for chunk in split.chunks:
        if len(chunk) < max(min_chunk_tokens, block):
            continue
        for i, key in enumerate(block_keys(SEED, prompt[chunk.start:chunk.end], block)):
            start = chunk.start + i * block
            if start >= prefix_hit_tokens:
                (hits if key in stored else saves).append((key, start, i * block))
    return hits, saves


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=3, max_value=5), min_size=0, max_size=14), min_size=1, max_size=6),
       st.lists(st.booleans(), min_size=40, max_size=40), st.integers(min_value=0, max_value=6),
       st.integers(min_value=1, max_value=6))
def test_chunk_lookup_in_one_batch_equals_block_by_block(chunks, stored_mask, cached_prefix_blocks, min_chunk):
    """One lookup for every chunk block at once finds the same hits and saves, with the
    same positions, as asking chunk by chunk; a prefix hit reaching into a chunk hides
    exactly its blocks that start inside the hit."""
    block = 2
    prompt = [tok for c in chunks for tok in c + [END]] + [1]
    split = split_by_end_token(prompt, END)
    chunk_keys = [k for c in split.chunks for k in block_keys(SEED, prompt[c.start:c.end], block)]
    stored = {k for k, keep in zip(chunk_keys, stored_mask) if keep}
    stored |= set(block_keys(SEED, prompt, block)[:cached_prefix_blocks])  # a cached prompt prefix
    asked = []

    def exists(keys):
        asked.append(len(keys))
        return [k in stored for k in keys]

    plan = build_plan(prompt, split, SEED, block, exists, min_chunk_tokens=min_chunk)
    hits, saves = _reference_chunk_blocks(prompt, split, stored, block, plan.prefix_hit_tokens, min_chunk)
    assert [tuple(h) for h in plan.chunk_hits] == hits
    assert [tuple(s) for s in plan.chunk_saves] == saves
    assert all(h.rope_delta == h.token_start - h.stored_pos_start for h in plan.chunk_hits)
    assert plan.first_reused_token() == (min(h[1] for h in hits) if hits else None)
    # The prefix lookup's batches, then one lookup for all chunk blocks (none if no block).
    prefix_calls = len(asked)
    build_plan(prompt, None, SEED, block, exists)
    prefix_calls = len(asked) - prefix_calls
    assert len(asked) - 2 * prefix_calls == (1 if hits or saves else 0)
