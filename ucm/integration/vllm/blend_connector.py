"""UCMBlendConnector: the connector a user names to get chunk reuse (Blend or EPIC).

Same stores, hashing and transfers as :class:`UCMConnector`; in addition the
scheduler splits prompts into chunks and plans chunk reuse, and the worker installs
the sparse agent of the one method ``ucm_sparse_config`` names (Blend or EPIC: both
run through the same agent, loads and exact-mask attention). Without ENABLE_SPARSE it reuses prefix blocks only. Runs in
vLLM's default mode (torch.compile, CUDA graphs) and with ``enforce_eager``: only the
steps that carry Blend work leave the compiled path (patches.py, patch point 4).
"""

from __future__ import annotations

from ucm.config import UcmConfigError
from ucm.integration.vllm.connector import UCMConnector


class UCMBlendConnector(UCMConnector):
    uses_blend = True

    def _check_config(self) -> None:
        if self.ucm_config.chunk_method is None:
            raise UcmConfigError("ucm_sparse_config", "UCMBlendConnector needs a Blend or an EPIC section "
                                 "with the chunk delimiter (chunk_end_token_id, blend_special_str or "
                                 "separator_token_ids)")


__all__ = ["UCMBlendConnector", "UCMConnector"]
