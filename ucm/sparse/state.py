"""The process-wide sparse agent and the ``maybe_execute_*`` helpers.

Engine patch points call the helpers unconditionally; with no agent set (the
default, and always when ENABLE_SPARSE is off) every helper returns its inputs
untouched, so patched code is exactly the original code path.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ucm.config import sparse_enabled  # noqa: F401  (re-exported: one parser of ENABLE_SPARSE)
from ucm.sparse.base import UcmSparseBase

logger = logging.getLogger(__name__)

_AGENT: Optional[UcmSparseBase] = None

def set_sparse_agent(agent: Optional[UcmSparseBase]) -> None:
    """Install (or clear, with None) this process's agent."""
    global _AGENT
    if agent is not None and _AGENT is not None and _AGENT is not agent:
        raise RuntimeError("a sparse agent is already set in this process")
    _AGENT = agent


def get_sparse_agent() -> Optional[UcmSparseBase]:
    return _AGENT


def step_active() -> bool:
    """Whether the agent runs a step with sparse work now. The per-layer patch points ask
    this first: in a step without it (every decode step, every plain prefill) a layer then
    costs one call instead of three calls into the agent."""
    return _AGENT is not None and getattr(_AGENT, "step", None) is not None


def maybe_execute_layer_begin(layer_index: int, positions: torch.Tensor, hidden_states: torch.Tensor,
                              residual: Optional[torch.Tensor]):
    if _AGENT is None:
        return positions, hidden_states, residual
    return _AGENT.layer_begin(layer_index, positions, hidden_states, residual)


def maybe_execute_layer_finished(layer_index: int, positions: torch.Tensor, hidden_states: torch.Tensor,
                                 residual: Optional[torch.Tensor]):
    if _AGENT is None:
        return positions, hidden_states, residual
    return _AGENT.layer_finished(layer_index, positions, hidden_states, residual)


def maybe_execute_before_mlp(hidden_states: torch.Tensor, residual: torch.Tensor):
    """Rows entering a decoder layer's MLP (a check layer drops the rows it does not keep)."""
    if _AGENT is None:
        return hidden_states, residual
    return _AGENT.before_mlp(hidden_states, residual)


def maybe_execute_begin(scheduler_output: Any) -> None:
    if _AGENT is not None:
        _AGENT.execute_begin(scheduler_output)


def maybe_execute_finished(logits_indices: torch.Tensor) -> torch.Tensor:
    if _AGENT is None:
        return logits_indices
    return _AGENT.execute_finished(logits_indices)


def maybe_execute_attention_forward(layer: Any, query, key, value):
    """The agent's replacement attention output, or None to run the backend."""
    if _AGENT is None:
        return None
    return _AGENT.attention_forward(layer, query, key, value)
