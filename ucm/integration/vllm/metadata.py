"""The engine's step plan and worker report in the shapes vLLM's connector API carries.

Scheduler -> worker: :class:`UcmConnectorMetadata` is a :class:`ucm.engine.step_meta.StepPlan`
that vLLM can ship as ``KVConnectorMetadata``. Worker -> scheduler:
:class:`UcmWorkerReport` (vLLM's ``KVConnectorWorkerMetadata``, aggregated over TP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from ucm.engine.step_meta import StepPlan
from ucm.sparse.blend.pay_policy import StepSample


@dataclass
class UcmConnectorMetadata(StepPlan, KVConnectorMetadata):
    """A step plan, as vLLM's connector metadata."""

    @classmethod
    def wrap(cls, plan: StepPlan) -> "UcmConnectorMetadata":
        return cls(requests=plan.requests, blend_active=plan.blend_active)


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
