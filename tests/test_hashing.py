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


def test_rank_keys_differ_per_rank():
    key = block_keys(CTX.seed(), list(range(16)), 16)[0]
    assert rank_key(key, 0) != rank_key(key, 1)
    assert rank_key(key, 0) == rank_key(key, 0)


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
