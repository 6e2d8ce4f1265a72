"""Keep Blend's approximate KV out of vLLM's own prefix cache.

vLLM (prefix caching on, its default) publishes every full block a request computes
under a hash chained over the block's tokens (``Request.block_hashes``), and any later
request with the same token prefix takes that block's KV as exact. A blended request
computes approximate KV from its first reused chunk token on, so those blocks must
never be found under their token hashes. Blocks before that token are exact and stay
shareable.

The guard replaces the request's hashes from the first approximate block on with
hashes no other request can produce (derived from the request id). vLLM caches blocks
only after the connector's ``get_num_new_matched_tokens`` for the request, and chains
the hashes of later blocks (decode included) from the last one, so every block from
there on is private to the request. The request itself may still find its own blocks
again after a preemption, which is what it computed.
"""

from __future__ import annotations

import hashlib
from typing import Any

_TAG = b"ucm/approximate-kv/v1"


def request_private_hash(request_id: str, index: int, like: bytes) -> bytes:
    """A block hash only this request can have: same length and type as vLLM's."""
    digest = hashlib.blake2b(_TAG + request_id.encode() + index.to_bytes(8, "little"),
                             digest_size=max(1, min(len(like), 64))).digest()
    return type(like)(digest) if isinstance(like, bytes) else digest


def withhold_from_prefix_cache(request: Any, first_token: int, hash_block_size: int) -> int:
    """Make the request's blocks from the one holding ``first_token`` on unfindable by other
    requests. Idempotent (the same request gets the same private hashes). Returns how many
    block hashes were replaced.

    ``hash_block_size`` may be the engine's block size even where vLLM hashes more finely:
    a coarser size only starts the private hashes at an earlier block (safe, never later).
    """
    hashes = getattr(request, "block_hashes", None)
    if not hashes:
        return 0
    start = first_token // hash_block_size
    replaced = 0
    for i in range(start, len(hashes)):
        private = request_private_hash(request.request_id, i, hashes[i])
        if hashes[i] != private:
            hashes[i] = private
            replaced += 1
    return replaced


def check_request_hashing() -> None:
    """Refuse at start a vLLM whose requests do not carry the block-hash list this guard
    rewrites: with its prefix cache on, Blend could then serve approximate KV as exact."""
    from vllm.v1.request import Request

    if not hasattr(Request, "update_block_hashes"):
        raise RuntimeError("ucm: this vLLM's Request has no update_block_hashes/block_hashes; Blend cannot keep "
                           "its approximate KV out of vLLM's prefix cache. Start vLLM with "
                           "enable_prefix_caching=False, or use a supported vLLM (0.26.x, 0.32.x)")
