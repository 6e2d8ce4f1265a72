"""The EPIC section of the config (``ucm_sparse_config: {"EPIC": {...}}``).

EPIC (arXiv 2410.15332, "LegoLink") reuses chunk KV like Blend but chooses the rows it
recomputes before the forward, by position: the first ``recompute_tokens`` tokens of
every reused chunk (plus cache misses and the suffix), in every layer from layer 0. It
has no check layer and no deviation pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ucm.config_checks import as_int, check_keys, expect, set_field
from ucm.config_chunks import SHARED_KEYS, check_chunk_settings, check_chunk_tokens, shared_to_dict

#: Default k. The effect EPIC repairs (each chunk was computed alone, so its first tokens
#: became attention sinks) sits in a chunk's first few tokens; 16 is one store block,
#: and for RAG passages of 100-500 tokens it recomputes 3-16% of the reused tokens,
#: inside the issue's 5-15% budget. Not yet tuned on data (the GPU benchmark has not run).
DEFAULT_RECOMPUTE_TOKENS = 16
MAX_RECOMPUTE_TOKENS = 1 << 20


@dataclass(frozen=True)
class EpicConfig:
    """Settings of the EPIC sparse method. Delimiter, chunk and pay-policy keys mean what
    they mean for Blend (:mod:`ucm.config_chunks`)."""
    chunk_end_token_id: Optional[int] = None
    blend_special_str: Optional[str] = None
    separator_token_ids: Optional[tuple[int, ...]] = None
    recompute_tokens: int = DEFAULT_RECOMPUTE_TOKENS  # k: first tokens of each reused chunk recomputed
    save_chunks: bool = True
    min_chunk_tokens: int = 1
    pay_policy: str = "auto"

    def __post_init__(self) -> None:
        check_chunk_settings(self)
        set_field(self, "recompute_tokens", as_int("recompute_tokens", self.recompute_tokens, 0,
                                                   MAX_RECOMPUTE_TOKENS))

    @property
    def first_reused_layer(self) -> int:
        """EPIC reuses loaded KV in every layer: chunk loads fill all of them."""
        return 0

    def check_model(self, num_layers: int, vocab_size: Optional[int], has_tokenizer: bool) -> None:
        """Refuse settings this model cannot honour (keys relative to the EPIC section)."""
        check_chunk_tokens(self, vocab_size, has_tokenizer)

    @classmethod
    def from_dict(cls, data: Any) -> EpicConfig:
        data = expect("", data, Mapping, "a mapping")
        check_keys(data, (*SHARED_KEYS, "recompute_tokens"))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {**shared_to_dict(self), "recompute_tokens": self.recompute_tokens}
