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
