"""EPIC's choice of rows: fixed by position before the forward.

Each reused chunk was computed alone (or behind another prefix), so its first tokens
carry the attention-sink mass of a sequence start; placed in the middle of a new
prompt they draw attention they should not. EPIC (arXiv 2410.15332, "LegoLink")
recomputes just those first ``k`` tokens of every reused chunk, in every layer, and
keeps the loaded KV of the chunks' other tokens. The choice needs no layer's output,
so it is made once, on the host, before layer 0. Pure torch, no engine import.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ucm.sparse.rows import chunk_head_rows


def epic_rows(reusable: torch.Tensor, first_position: int, chunk_starts: Sequence[int], k: int) -> torch.Tensor:
    """Bool mask ``[rows]`` (CPU) of the rows to compute in every layer.

    ``reusable``: rows whose KV was loaded (bool ``[rows]``); ``first_position``: the prompt
    position of row 0 (tokens before it are already in the cache); ``chunk_starts``: prompt
    positions where the reused chunks begin; ``k`` tokens from each start are recomputed
    (``k = 0``: none; ``k`` at least a chunk's length: all of it). Every row that is not
    reusable (cache misses, separators, the suffix) is computed, and so is the last row
    (it produces the request's logits).
    """
    reusable = reusable.to(torch.bool).cpu()
    n = int(reusable.shape[0])
    keep = ~reusable | chunk_head_rows(n, first_position, chunk_starts, k)
    if n:
        keep[-1] = True
    return keep
