"""What the scheduler-side connector tells the worker side for one step.

The scheduler already knows each request's block ids, positions and reuse plan,
so it ships them here instead of the worker reverse-engineering them from a
backend's attention metadata (which differs per backend and version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from ucm.sparse.blend.pay_policy import StepSample


@dataclass(frozen=True)
class BlockLoad:
    """Load one stored block into this request's paged slots.

    Tokens ``[lo, hi)`` of the prompt (a subrange of the block's
    ``[token_start, token_start + block_tokens)``) are written; K is rotated by
    ``rope_delta`` positions. ``chunk`` loads only fill layers from the first check
    layer on (earlier layers are recomputed anyway).
    """

    key: bytes
    token_start: int
    lo: int
    hi: int
    rope_delta: int
    chunk: bool


@dataclass(frozen=True)
class BlockSave:
    """Save prompt tokens ``[token_start, token_start + block_tokens)`` under ``key``,
    K rotated back by ``-rope_delta`` (to the positions the key stands for)."""

    key: bytes
    token_start: int
    rope_delta: int


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


@dataclass
class UcmConnectorMetadata(KVConnectorMetadata):
    """All scheduled requests of a step that ucm has to do anything about.

    When ``blend_active`` is set every scheduled request is listed (Blend computes
    attention itself for the rows after the check layer and needs every request's
    block ids); otherwise only requests with loads or saves.
    """

    requests: dict[str, RequestStep] = field(default_factory=dict)
    blend_active: bool = False


@dataclass
class UcmWorkerReport(KVConnectorWorkerMetadata):
    """What the workers' private (host-memory) tiers gained and lost in one step, and the
    forwards they timed, for a scheduler that may live in another process. Keys are rank keys, so the reports of
    several TP ranks simply add up."""

    added: list[bytes] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    samples: list[StepSample] = field(default_factory=list)  # forward times, for the pay policy

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "UcmWorkerReport":
        if not isinstance(other, UcmWorkerReport):
            return self
        return UcmWorkerReport(self.added + other.added, self.dropped + other.dropped, self.samples + other.samples)
