"""The sparse-method hook contract.

A sparse method (Blend is one) changes *which rows* a forward pass computes. The
engine integration calls these hooks at fixed points; every hook has a no-op
default, so a method overrides only what it needs and an engine with no method
behaves exactly as without ucm. Worker-side hooks see tensors; scheduler-side
hooks see only token ids and request ids.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

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
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Called once with the engine's paged KV cache tensor per attention layer."""

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

    def attention_begin(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_name: str,
        forward_context: Any, output: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Before the attention backend of one layer."""
        return query, key, value, output

    def attention_forward(
        self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Compute a layer's attention *instead of* the engine's backend.

        Return None to let the backend run (the default). A method that computes only
        some rows returns their output itself, because the backend's metadata describes
        every scheduled row and cannot serve a subset.
        """
        return None

    def attention_finished(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_output: torch.Tensor,
        layer_name: str, forward_context: Any,
    ) -> None:
        """After the attention backend of one layer."""

    def ffn_begin(
        self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return hidden_states, residual

    def ffn_finished(
        self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return hidden_states, residual

    def request_finished_in_worker(self, request_id: str) -> None:
        """Drop any per-request worker state."""

    # ---- scheduler side ----------------------------------------------------------
    def request_begin(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        """A new request reached the scheduler."""

    def request_finished_in_scheduler(self, request_id: str) -> None:
        """A request left the scheduler (finished, aborted)."""

    def estimate_num_slots_sparsed(self, request: Any) -> int:
        """KV slots the request needs under this method (default: no saving)."""
        return 0

    def build_sparse_meta(self, scheduler_output: Any, requests: Any) -> Any:
        """Per-step metadata for the worker side (None: nothing to do)."""
        return None
