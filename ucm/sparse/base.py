"""The sparse-method hook contract.

A sparse method (Blend and EPIC are two) changes *which rows* a forward pass computes.
The vLLM patch points call these hooks at fixed places in the worker's forward: before
and after it, before and after each decoder layer, between a layer's attention and its
MLP (the FFN's rows), and instead of a layer's attention backend. Every hook has a no-op
default, so a method overrides only what it needs and an engine with no method behaves
exactly as without ucm. Only hooks that a patch point calls are part of the contract;
the scheduler side of a method is its plan (``ucm.engine.scheduler_side``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class UcmSparseRole:
    SCHEDULER = "scheduler"
    WORKER = "worker"


class UcmSparseBase:
    """Base class of all sparse methods; all hooks are no-ops by default."""

    def __init__(self, config: Any, role: str) -> None:
        self.config = config
        self.role = role

    # ---- worker side -------------------------------------------------------------
    def execute_begin(self, scheduler_output: Any) -> None:
        """Called before each model forward with what the scheduler decided."""

    def execute_finished(self, logits_indices: torch.Tensor) -> torch.Tensor:
        """Called after the forward; may remap which rows produce logits."""
        return logits_indices

    def layer_begin(
        self, layer_index: int, positions: torch.Tensor, hidden_states: torch.Tensor,
        residual: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Before a decoder layer; may shrink the rows the layer computes."""
        return positions, hidden_states, residual

    def layer_finished(
        self, layer_index: int, positions: torch.Tensor, hidden_states: torch.Tensor,
        residual: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """After a decoder layer; may shrink the rows later layers compute."""
        return positions, hidden_states, residual

    def before_mlp(
        self, hidden_states: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Between a decoder layer's attention and its MLP; may shrink the rows the MLP computes."""
        return hidden_states, residual

    def attention_forward(
        self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Compute a layer's attention *instead of* the engine's backend.

        Return None to let the backend run (the default). A method that computes only
        some rows returns their output itself, because the backend's metadata describes
        every scheduled row and cannot serve a subset.
        """
        return None
