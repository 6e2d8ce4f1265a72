"""One request's rows in a forward pass, as every row-selecting method sees them.

Blend and EPIC both decide, per request, which of its scheduled rows a layer computes;
the engine integration describes the rows the same way for either (where they sit in
the batch, which hold reused KV, where the reused chunks begin, the question's rows),
so the integration builds one :class:`RequestRows` whichever method runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class RequestRows:
    """One request's rows in the flattened batch of a forward pass."""

    req_id: str
    row_start: int
    num_rows: int
    reusable: torch.Tensor  # bool [num_rows], CPU: rows whose KV was loaded from cache
    always: Optional[torch.Tensor] = None  # bool [num_rows]: rows never skipped
    ratio: Optional[float] = None  # Blend: overrides every check layer's ratio for this request
    selection: Optional[str] = None  # Blend: overrides the configured ranking ("deviation", "query", "mixed")
    first_position: int = 0  # prompt position of the request's first row in this step
    chunk_starts: tuple[int, ...] = ()  # prompt positions where its reused chunks begin
    recompute_tokens: Optional[int] = None  # EPIC: overrides the configured k for this request
    suffix_start: Optional[int] = None  # prompt position where the question (rows after the last chunk) begins

    @property
    def num_reusable(self) -> int:
        return int(self.reusable.sum())

    @property
    def suffix_rows(self) -> int:
        """How many of this step's rows are the question's: always the request's last rows."""
        if self.suffix_start is None:
            return 0
        end = self.first_position + self.num_rows
        return max(0, end - max(self.suffix_start, self.first_position))


@dataclass
class RequestOutcome:
    """What a method decided for one request in one forward (for stats).

    ``num_recomputed_reusable`` starts at every reusable row: until a selection, every row
    is computed in full, so stats must not count a row as reused before a selection kept
    its cached KV.
    """

    num_rows: int
    num_reusable: int
    num_recomputed_reusable: int

    @property
    def recompute_fraction(self) -> float:
        return self.num_recomputed_reusable / self.num_reusable if self.num_reusable else 1.0


def chunk_head_rows(num_rows: int, first_position: int, chunk_starts: Sequence[int], k: int) -> torch.Tensor:
    """Bool mask ``[num_rows]`` of the first ``k`` tokens of each chunk beginning at a prompt
    position in ``chunk_starts``, clipped to this step's rows (row 0 is prompt position
    ``first_position``).

    Why shared: a chunk's first tokens were a sequence start when it was computed alone, so
    they carry attention-sink mass they should not have mid-prompt; EPIC recomputes exactly
    them, and Blend's "boundary" selection recomputes them before ranking the rest.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    mask = torch.zeros(num_rows, dtype=torch.bool)
    if k > 0:
        for start in chunk_starts:
            lo, hi = max(start - first_position, 0), min(start + k - first_position, num_rows)
            if lo < hi:
                mask[lo:hi] = True
    return mask
