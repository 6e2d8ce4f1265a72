"""What the scheduler half of the engine tells the worker half for one step.

The scheduler already knows each request's block ids, positions and reuse plan, so it
ships them here instead of the worker reverse-engineering them from an attention
backend's metadata (which differs per backend and version). Plain dataclasses: the
vLLM adapter wraps a :class:`StepPlan` into vLLM's connector metadata
(``ucm.integration.vllm.metadata``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional


class BlockLoad(NamedTuple):
    """Load one stored block into this request's paged slots.

    Tokens ``[lo, hi)`` of the prompt (a subrange of the block's
    ``[token_start, token_start + block_tokens)``) are written; K is rotated by
    ``rope_delta`` positions. ``chunk`` loads only fill layers from the sparse method's
    first reused layer on (Blend: its first check layer, earlier layers are recomputed
    anyway; EPIC: every layer).

    Named tuples, this and :class:`BlockSave`: the scheduler makes one per block (512
    loads or ~1,030 saves for an 8K-token prompt) before the step runs, and a tuple is
    built in C (:data:`new_load`, :data:`new_save`).
    """

    key: bytes
    token_start: int
    lo: int
    hi: int
    rope_delta: int
    chunk: bool


class BlockSave(NamedTuple):
    """Save prompt tokens ``[token_start, token_start + block_tokens)`` under ``key``,
    K rotated back by ``-rope_delta`` (to the positions the key stands for)."""

    key: bytes
    token_start: int
    rope_delta: int


new_load = functools.partial(tuple.__new__, BlockLoad)
"""``BlockLoad`` from a ``(key, token_start, lo, hi, rope_delta, chunk)`` tuple, without the
Python frame of the named tuple's ``__new__``."""
new_save = functools.partial(tuple.__new__, BlockSave)
"""``BlockSave`` from a ``(key, token_start, rope_delta)`` tuple, likewise."""


@dataclass
class RequestStep:
    """One scheduled request in one step."""

    req_id: str
    block_ids: list[int]
    num_computed: int  # tokens already in the paged cache before this step
    num_scheduled: int  # rows of this request in the step's batch
    prompt_len: int
    loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)
    blend: bool = False  # this step loads reused chunk KV for the request
    ratio: Optional[float] = None  # per-request recompute ratio (SamplingParams.extra_args)
    precompute: bool = False  # a chunk precompute: its saves land before the step ends
    selection: Optional[str] = None  # per-request Blend ranking ("deviation", "query", "mixed")
    recompute_tokens: Optional[int] = None  # per-request EPIC k (first tokens of each reused chunk)
    chunk_starts: tuple[int, ...] = ()  # prompt positions where the request's reused chunks begin
    suffix_start: Optional[int] = None  # prompt position where the question after the last chunk begins


@dataclass
class StepPlan:
    """All scheduled requests of a step that ucm has to do anything about.

    When ``blend_active`` is set every scheduled request is listed (Blend computes
    attention itself for the rows after the check layer and needs every request's
    block ids); otherwise only requests with loads or saves.
    """

    requests: dict[str, RequestStep] = field(default_factory=dict)
    blend_active: bool = False

    @property
    def has_loads(self) -> bool:
        return any(step.loads for step in self.requests.values())

    @property
    def is_empty(self) -> bool:
        """Nothing to load, save or blend in this step (a decode step)."""
        return not self.requests and not self.blend_active


@dataclass(frozen=True)
class ScheduledRequest:
    """One request the engine's scheduler put in a step, as the planner needs it.

    ``block_ids``: a new request's blocks, or those a running request gained this step
    (None: none); a ``resumed`` request (preempted before) lists all its blocks anew.
    """

    req_id: str
    num_computed: int
    num_scheduled: int
    block_ids: Optional[list[int]] = None
    new: bool = False
    resumed: bool = False
