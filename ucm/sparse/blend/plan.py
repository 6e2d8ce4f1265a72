"""The scheduler-side reuse plan of one request: which blocks to load, which to save.

Built from the prompt split (:mod:`chunking`), the request's hash seed and a store
lookup. Pure Python, no tensors: the scheduler builds it once per request and
ships the parts each step needs to the worker in the connector metadata.

Order of reuse: prefix hits first (the longest run of the
prompt's own block chain from the start), then per-chunk hits for the rest. A chunk
that misses does not stop reuse of later chunks; any chunk block whose key is
found is used, wherever in the chunk it lies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, NamedTuple, Sequence

from ucm.hashing import BlockChain, chunk_block_keys
from ucm.sparse.blend.chunking import PromptSplit

ExistsFn = Callable[[Sequence[bytes]], Sequence[bool]]
_TOKEN_START = attrgetter("token_start")


class BlockRef(NamedTuple):
    """One stored block placed into the prompt.

    ``token_start`` is where the block's first token sits in this prompt;
    ``stored_pos_start`` is the position its first token had when its KV was
    computed. Loading rotates K by ``token_start - stored_pos_start``; saving by the
    negative. For prefix blocks the two are equal.

    A named tuple, not a dataclass: a plan makes one per block (~1,000 for an 8K-token
    prompt) on the scheduler's path before the request's first step, and a tuple is
    built in C.
    """

    key: bytes
    token_start: int
    stored_pos_start: int

    @property
    def rope_delta(self) -> int:
        return self.token_start - self.stored_pos_start


_new_ref = functools.partial(tuple.__new__, BlockRef)
"""``BlockRef`` from a ``(key, token_start, stored_pos_start)`` tuple, without the Python
frame of the named tuple's ``__new__`` (a plan places one per block)."""


@dataclass(frozen=True)
class ReusePlan:
    """What one request reuses from the store and what it will save."""

    num_tokens: int
    block_size: int
    prefix_hit_tokens: int
    prefix_hits: tuple[BlockRef, ...]
    chunk_hits: tuple[BlockRef, ...]
    # Saving: new prefix blocks (block-aligned) and blocks of chunks that missed.
    prefix_saves: tuple[BlockRef, ...]
    chunk_saves: tuple[BlockRef, ...] = field(default=())
    num_chunk_tokens: int = 0

    @property
    def chunk_hit_tokens(self) -> int:
        return len(self.chunk_hits) * self.block_size

    @property
    def has_chunk_hits(self) -> bool:
        return bool(self.chunk_hits)

    def summary(self) -> dict[str, int]:
        """The plan's counts as a request's statistics report them."""
        return dict(prompt_tokens=self.num_tokens, prefix_hit_tokens=self.prefix_hit_tokens,
                    chunk_hit_tokens=self.chunk_hit_tokens, chunk_tokens=self.num_chunk_tokens)

    def first_reused_token(self, computed: int = 0) -> int | None:
        """The first prompt position at or after ``computed`` whose KV Blend may take from
        a chunk block rather than compute: from there on the request's KV is approximate
        (every later row attends to it), before it the KV is exact. None: nothing reused.

        ``computed`` tokens are already in the engine's cache, computed in full, so chunk
        blocks before them are never loaded.
        """
        b = self.block_size
        if not self.chunk_hits:
            return None
        if self.chunk_hits[0].token_start >= computed:  # the usual case: hits in prompt order, all ahead
            return min(map(_TOKEN_START, self.chunk_hits))
        starts = [max(h.token_start, computed) for h in self.chunk_hits if h.token_start + b > computed]
        return min(starts) if starts else None

    def reused_chunk_starts(self) -> tuple[int, ...]:
        """Prompt positions where the chunks with a hit begin (a chunk block's keys stand
        for positions from its chunk's start, so ``token_start - stored_pos_start`` is it)."""
        return tuple(sorted({h.token_start - h.stored_pos_start for h in self.chunk_hits}))

    def chunk_hits_in(self, start: int, end: int) -> list[BlockRef]:
        """Chunk-hit blocks whose tokens lie inside the scheduled range [start, end).

        A block straddling the range edge is split by the worker token-wise; here
        any overlap counts.
        """
        b = self.block_size
        return [h for h in self.chunk_hits if h.token_start < end and h.token_start + b > start]


_FIRST_LOOKUP_BLOCKS = 8


def _prefix_hit_blocks(chain: BlockChain, exists: ExistsFn) -> int:
    """Length of the run of stored blocks from the prompt start.

    Looked up in batches that grow 4x (8, 32, 128, ... blocks), hashing only the
    batches asked: the run usually ends early (a shared system prompt, then chunks in
    a new order), and then most of the prompt is never hashed under prefix keys.
    """
    hit, batch = 0, _FIRST_LOOKUP_BLOCKS
    while hit < chain.num_blocks:
        keys = chain.keys(hit + batch)[hit:]
        for found in exists(keys):
            if not found:
                return hit
            hit += 1
        batch *= 4
    return hit


def build_plan(
    token_ids: Sequence[int],
    split: PromptSplit | None,
    seed: bytes,
    block_size: int,
    exists: ExistsFn,
    min_chunk_tokens: int = 1,
    save_chunks: bool = True,
    chunk_precompute: bool = False,
    reuse_chunks: bool = True,
) -> ReusePlan:
    """Look up prefix then chunk blocks and decide loads and saves.

    ``reuse_chunks`` False: the request will run plain whatever its chunks' lookup found
    (reusing them cannot pay here): no chunk key is hashed or looked up, and prefix keys
    cover the prompt prefix alone (later prefix blocks would only serve the same chunks
    in the same order, which vLLM's own prefix cache serves first).

    ``chunk_precompute``: the request only exists to store its chunks (prompt prefix +
    chunk, ``BlendPromptBuilder.precompute_prompt``). Prefix keys then cover the prompt
    prefix alone; the chunk goes under its chunk keys only, so it is stored once, not a
    second time under prefix keys that only a prompt with exactly this chunk first would hit.
    """
    n = len(token_ids)
    chain = BlockChain(seed, token_ids, block_size)
    hit_blocks = _prefix_hit_blocks(chain, exists)
    prefix_hits = tuple(BlockRef(k, i * block_size, i * block_size) for i, k in enumerate(chain.keys(hit_blocks)))
    prefix_hit_tokens = hit_blocks * block_size

    chunk_hits: list[BlockRef] = []
    chunk_saves: list[BlockRef] = []
    num_chunk_tokens = split.num_chunk_tokens if split is not None else 0
    if split is not None and reuse_chunks:
        # Every chunk's usable blocks in one lookup (one store call, not one per chunk).
        placed: list[BlockRef] = []
        for chunk in split.chunks:
            if len(chunk) < max(min_chunk_tokens, block_size):
                continue
            keys = chunk_block_keys(seed, token_ids[chunk.start:chunk.end], block_size)
            first = 0 if chunk.start >= prefix_hit_tokens else -(-(prefix_hit_tokens - chunk.start) // block_size)
            placed += [_new_ref((k, chunk.start + i * block_size, i * block_size))
                       for i, k in enumerate(keys[first:], first)]
        if placed:
            present = exists([ref.key for ref in placed])
            chunk_hits = [ref for ref, hit in zip(placed, present) if hit]
            chunk_saves = [ref for ref, hit in zip(placed, present) if not hit]
    # Only exact KV goes under prefix keys: blocks that end before the first reused
    # chunk token. Everything after it was computed against approximate context.
    exact_end = min(map(_TOKEN_START, chunk_hits), default=n)
    if split is not None and (chunk_precompute or (not reuse_chunks and split.has_chunks)):
        exact_end = min(exact_end, split.prefix.end)
    prefix_saves = tuple(
        _new_ref((k, i * block_size, i * block_size))
        for i, k in enumerate(chain.keys(exact_end // block_size)[hit_blocks:], hit_blocks)
    )
    return ReusePlan(
        num_tokens=n,
        block_size=block_size,
        prefix_hit_tokens=prefix_hit_tokens,
        prefix_hits=prefix_hits,
        chunk_hits=tuple(chunk_hits),
        prefix_saves=prefix_saves,
        chunk_saves=tuple(chunk_saves) if save_chunks else (),
        num_chunk_tokens=num_chunk_tokens,
    )
