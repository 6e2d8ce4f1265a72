"""The guard that keeps Blend's approximate KV out of vLLM's prefix cache (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

from ucm.integration.vllm.prefix_cache_guard import request_private_hash, withhold_from_prefix_cache


def _request(req_id: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(request_id=req_id, block_hashes=[bytes([i]) * 32 for i in range(n)])


def test_blocks_from_the_first_approximate_one_get_private_hashes():
    req = _request("r1", 6)
    original = list(req.block_hashes)
    assert withhold_from_prefix_cache(req, first_token=70, hash_block_size=32) == 4  # blocks 2..5
    assert req.block_hashes[:2] == original[:2]  # exact blocks stay shareable
    assert all(h != o and len(h) == 32 for h, o in zip(req.block_hashes[2:], original[2:]))
    assert len(set(req.block_hashes)) == 6


def test_private_hashes_differ_between_requests_and_repeat_for_one():
    a, b = _request("a", 4), _request("b", 4)
    withhold_from_prefix_cache(a, 0, 16)
    withhold_from_prefix_cache(b, 0, 16)
    assert not set(a.block_hashes) & set(b.block_hashes)
    again = list(a.block_hashes)
    assert withhold_from_prefix_cache(a, 0, 16) == 0  # idempotent: a resumed request keeps its hashes
    assert a.block_hashes == again
    assert request_private_hash("a", 3, b"x" * 32) == a.block_hashes[3]


def test_no_hashes_no_change():
    req = SimpleNamespace(request_id="r", block_hashes=[])
    assert withhold_from_prefix_cache(req, 0, 16) == 0
