"""Block-wise chained hashes: prefix/chunk key equality, isolation, stability."""

from __future__ import annotations

import subprocess
import sys

from ucm.hashing import HashContext, block_keys, chunk_block_keys, rank_key

CTX = HashContext(model_id="tiny-llama", kv_dtype="torch.float32", tp_size=1)


def test_only_full_blocks_have_keys():
    seed = CTX.seed()
    assert len(block_keys(seed, list(range(47)), 16)) == 2
    assert len(block_keys(seed, list(range(48)), 16)) == 3
    assert block_keys(seed, list(range(15)), 16) == []


def test_chunk_keys_equal_keys_of_a_prompt_that_is_the_chunk():
    seed = CTX.seed()
    chunk = list(range(100, 164))
    prompt_starting_with_chunk = chunk + list(range(7, 30))
    assert chunk_block_keys(seed, chunk, 16) == block_keys(seed, prompt_starting_with_chunk, 16)[:4]


def test_chain_depends_on_every_earlier_token():
    seed = CTX.seed()
    a = block_keys(seed, list(range(64)), 16)
    changed = list(range(64))
    changed[3] = 999
    b = block_keys(seed, changed, 16)
    assert all(x != y for x, y in zip(a, b))  # a change in block 0 changes every later key
    changed = list(range(64))
    changed[40] = 999
    c = block_keys(seed, changed, 16)
    assert c[:2] == a[:2] and c[2:] != a[2:]


def test_salt_model_dtype_and_tp_isolate_keys():
    tokens = list(range(32))
    base = block_keys(CTX.seed(), tokens, 16)
    others = [
        CTX.seed("tenant-a"),
        HashContext("other-model", "torch.float32").seed(),
        HashContext("tiny-llama", "torch.bfloat16").seed(),
        HashContext("tiny-llama", "torch.float32", tp_size=2).seed(),
    ]
    keys = [block_keys(s, tokens, 16) for s in others]
    for k in keys:
        assert not set(k) & set(base)
    assert CTX.seed("tenant-a") != CTX.seed("tenant-b")


def test_rank_keys_differ_per_rank_and_rank_zero_is_the_logical_key():
    """Rank 0's shard is stored under the logical key itself: with one GPU (most engines)
    no second hash per block. The seed mixes the TP size, so a TP=1 key is never a TP=2
    rank-0 key."""
    key = block_keys(CTX.seed(), list(range(16)), 16)[0]
    assert rank_key(key, 0) == key
    assert len({rank_key(key, r) for r in range(4)}) == 4
    two = HashContext("tiny-llama", "torch.float32", tp_size=2)
    assert rank_key(block_keys(two.seed(), list(range(16)), 16)[0], 0) != key


def test_key_format_3_is_one_blake2b_of_parent_and_little_endian_tokens():
    """The layout other processes and stored files rely on: a block's key is BLAKE2b-256 of
    its parent key (32 bytes) followed by its tokens as little-endian int64, in one call."""
    import hashlib
    import struct

    from ucm.hashing import KEY_FORMAT

    assert KEY_FORMAT == 3
    seed = CTX.seed()
    tokens = [5, 2**40, 0, 7] * 8
    keys = block_keys(seed, tokens, 16)
    parent = seed
    for i, key in enumerate(keys):
        want = hashlib.blake2b(parent + struct.pack("<16q", *tokens[16 * i:16 * i + 16]), digest_size=32).digest()
        assert key == want
        parent = key


def test_block_size_changes_keys():
    tokens = list(range(64))
    assert set(block_keys(CTX.seed(), tokens, 16)).isdisjoint(block_keys(CTX.seed(), tokens, 32))


def test_stable_across_processes():
    code = ("from ucm.hashing import HashContext, block_keys;"
            "print(block_keys(HashContext('tiny-llama','torch.float32').seed('s'), list(range(40)), 16)[1].hex())")
    # A different PYTHONHASHSEED would change builtin hash(); ours must not care.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert out == block_keys(CTX.seed("s"), list(range(40)), 16)[1].hex()


def test_block_chain_hashes_on_demand_and_matches_block_keys():
    from ucm.hashing import BlockChain

    seed = CTX.seed()
    tokens = list(range(103))
    chain = BlockChain(seed, tokens, 8)
    full = block_keys(seed, tokens, 8)
    assert chain.num_blocks == 12
    assert chain.keys(3) == full[:3]
    assert chain.keys(100) == full  # clipped to the full blocks
    assert chain.keys(5) == full[:5]


def test_memoised_chunk_and_rank_keys_equal_fresh_hashes():
    import struct

    from ucm.hashing import _chunk_keys_cached, _digest

    chunk = [7] * 33
    first = chunk_block_keys(CTX.seed(), chunk, 4)
    assert first == block_keys(CTX.seed(), chunk, 4)
    hits = _chunk_keys_cached.cache_info().hits
    again = chunk_block_keys(CTX.seed(), chunk, 4)
    assert again == first and _chunk_keys_cached.cache_info().hits == hits + 1
    again.append(b"x")  # callers get their own list: the cache cannot be mutated
    assert chunk_block_keys(CTX.seed(), chunk, 4) == first
    key = first[0]
    assert rank_key(key, 1) == _digest(b"rank", key, struct.pack("<I", 1))
    assert rank_key(key, 0) == key
