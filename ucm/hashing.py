"""Block-wise chained hashes for KV blocks.

Why a chain: the KV of a block depends on every token before it, so a block's key
is the hash of its own tokens *and* the key of the block before it. Prefix blocks
and chunk blocks share one key space: a chunk's blocks are hashed as the same
chain restarted from the request seed, i.e. exactly the keys the chunk would have
if it were the start of a prompt. A chunk precomputed alone (or cached as any
earlier prompt's prefix) is therefore found wherever it later appears.

The seed mixes the key format, model id, the model's identity (config, dtypes,
quantization and a fingerprint of the weight files: ``ucm.model_identity``), KV
dtype, tensor-parallel size and the request's ``cache_salt``, so tenants, models
and the same path's old and new weights never share blocks. Each TP rank stores its
own shard of the heads under :func:`rank_key` of the logical key (rank 0's is the
logical key itself). Hashes use BLAKE2b over explicit little-endian bytes: stable
across processes, machines and Python versions (the builtin ``hash`` is salted per
process).

Why a block key is one BLAKE2b call over ``parent || tokens``: planning a cold 8K-token
prompt hashes ~2,000 blocks on the request's path (prefix chain, chunk chains, TP rank
keys). With a length-prefixed multi-part digest and a second hash per block for the
rank key that was 10 ms of host time per request on an H100 host (cProfile, 0.5B model:
a third of its plain prefill). Within a chain both parts have fixed lengths (a 32-byte
key, ``block_size`` int64 tokens), so plain concatenation is unambiguous.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

KEY_BYTES = 32
# The version of how keys are derived. Bump it whenever the same tokens of the same
# model must stop finding blocks written by older code (v3: a block key is one BLAKE2b
# of parent and tokens, and rank 0 stores under the logical key; v2: the model identity
# joined the seed; v1 keys named the model by its path only).
KEY_FORMAT = 3
_FORMAT_TAG = b"ucm-kv-hash-v%d" % KEY_FORMAT


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        # Length-prefix every part so that ("ab", "c") and ("a", "bc") differ.
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class HashContext:
    """What makes KV of the same tokens incompatible: model, KV dtype, TP layout.

    ``model_identity`` is the digest of ``ucm.model_identity.ModelIdentity``: without it
    ``model_id`` (a path) is all that tells models apart, and new weights written at the
    same path would be served the old weights' KV.
    """

    model_id: str
    kv_dtype: str
    tp_size: int = 1
    model_identity: str = ""

    def seed(self, cache_salt: Optional[str] = None) -> bytes:
        """The chain's starting key for one request (salted per tenant if given)."""
        salt = b"" if cache_salt is None else b"salt:" + cache_salt.encode("utf-8")
        return _digest(
            _FORMAT_TAG,
            self.model_id.encode("utf-8"),
            self.model_identity.encode("utf-8"),
            self.kv_dtype.encode("utf-8"),
            struct.pack("<I", self.tp_size),
            salt,
        )


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    """All of ``tokens`` as little-endian int64, in one conversion (blocks slice it)."""
    return np.asarray(tokens, dtype="<i8").tobytes()


def _chain(parent: bytes, data: bytes, block_bytes: int, first: int, end: int) -> list[bytes]:
    """Keys of blocks ``[first, end)`` of ``data`` (tokens as bytes), chained from ``parent``
    (the key of block ``first - 1``, or the seed)."""
    keys: list[bytes] = []
    blake2b = hashlib.blake2b
    for offset in range(first * block_bytes, end * block_bytes, block_bytes):
        parent = blake2b(parent + data[offset:offset + block_bytes], digest_size=KEY_BYTES).digest()
        keys.append(parent)
    return keys


def block_keys(seed: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of the *full* blocks of ``token_ids`` as a chain from ``seed``.

    A trailing partial block has no key: its KV is recomputed (or kept only in the
    engine's own cache).
    """
    chain = BlockChain(seed, token_ids, block_size)
    return chain.keys(chain.num_blocks)


class BlockChain:
    """The block keys of one prompt, hashed only as far as someone asks.

    Why lazy: a RAG prompt of 8K tokens has 512 blocks, but when its chunks are reused
    only the blocks before the first reused chunk ever need a prefix key (the prefix-hit
    lookup stops at the first miss, and only exact KV is saved under prefix keys).
    Hashing all of them cost more host time per request than the lookup itself.
    """

    def __init__(self, seed: bytes, token_ids: Sequence[int], block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.token_ids = token_ids
        self.block_size = block_size
        self.num_blocks = len(token_ids) // block_size
        self._keys: list[bytes] = []
        self._seed = seed

    def keys(self, end: int) -> list[bytes]:
        """Keys of blocks ``[0, end)`` (``end`` clipped to the full blocks)."""
        end = min(end, self.num_blocks)
        have = len(self._keys)
        if have < end:
            b = self.block_size
            data = _tokens_bytes(self.token_ids[have * b:end * b])  # only the blocks asked
            parent = self._keys[-1] if self._keys else self._seed
            self._keys.extend(_chain(parent, data, b * 8, 0, end - have))
        return self._keys[:end]


@functools.lru_cache(maxsize=1024)
def _chunk_keys_cached(seed: bytes, chunk_token_ids: tuple[int, ...], block_size: int) -> tuple[bytes, ...]:
    return tuple(block_keys(seed, chunk_token_ids, block_size))


def chunk_block_keys(seed: bytes, chunk_token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of a chunk's full blocks: the chain restarted from the request seed.

    Identical to :func:`block_keys` of a prompt that *is* the chunk. Memoised (the
    1,024 most recent chunks): chunks recur across requests -- that is what Blend is
    for -- and rehashing a 512-token chunk costs ~70 us of host time per request.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return list(_chunk_keys_cached(seed, tuple(chunk_token_ids), block_size))


@functools.lru_cache(maxsize=1 << 16)
def rank_key(key: bytes, tp_rank: int) -> bytes:
    """The store key of one TP rank's shard of a logical block key (memoised: the
    scheduler's lookup and the worker's load ask for the same keys in one step).

    Rank 0's shard is the logical key itself: no second hash per block on one GPU. The
    seed mixes the TP size, so it never equals a key of another TP layout."""
    if tp_rank == 0:
        return key
    return _digest(b"rank", key, struct.pack("<I", tp_rank))
