"""Offline precompute: put each RAG chunk's KV into the ucm store once.

Blend reuses a chunk only if its KV is already stored under its chunk keys. A chunk
gets there the first time vLLM computes it, either inside a RAG prompt (``save_chunks``)
or, the way this module does it, as a prompt of its own. A precompute request sends
exactly the chunk's tokens (``BlendPromptBuilder.chunk_token_ids``): the tokens sit
at positions 0..L-1, so their prefix keys *are* the chunk keys a later RAG prompt
looks up, wherever the chunk lands in it. Or it sends prompt prefix + chunk
(``BlendPromptBuilder.precompute_prompt``): the connector then finds the chunk with
the same splitter as in a RAG prompt and stores it under its chunk keys only (the
requests carry ``ucm_chunk_precompute``). ``max_tokens=1`` because vLLM must sample
one token to finish a request; that one decode step is the whole overhead.

Why a function of its own rather than "just generate": identical chunks are sent
once (a corpus or a batch of RAG samples repeats passages), requests go in batches
so the CPU/GPU stays busy, and the caller gets counts and time to report. The same
``cache_salt`` that later RAG requests use must be passed here: the salt is mixed
into the hash seed, so a chunk cached under another salt (or none) is invisible.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ucm.engine.scheduler_side import PRECOMPUTE_ARG

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class PrecomputeReport:
    """What :func:`precompute_chunks` did.

    ``num_chunks`` were passed in; ``num_duplicates`` of them repeated an earlier one
    and ``num_empty`` had no tokens, so ``num_submitted`` requests ran, covering
    ``num_tokens`` prompt tokens in ``seconds`` of wall time over ``num_batches``
    ``generate`` calls.
    """

    num_chunks: int
    num_submitted: int
    num_duplicates: int
    num_empty: int
    num_tokens: int
    num_batches: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Prefill throughput of the precompute, for logs and reports."""
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


def unique_chunks(chunk_token_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], int, int]:
    """Distinct non-empty chunks in first-seen order, plus duplicate and empty counts.

    Duplicates are found by the exact token sequence, the same identity the chunk
    hash uses: two texts that tokenize alike are one chunk.
    """
    seen: set[tuple[int, ...]] = set()
    distinct: list[list[int]] = []
    duplicates = empty = 0
    for ids in chunk_token_ids:
        key = tuple(int(t) for t in ids)
        if not key:
            empty += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            distinct.append(list(key))
    return distinct, duplicates, empty


def _has_ucm_connector(llm: Any) -> Optional[bool]:
    """Whether ``llm`` runs a ucm KV connector (None when this cannot be told).

    Precompute without a connector wastes a prefill per chunk and caches nothing for
    Blend; that is worth a warning, not an error (the caller may be measuring it).
    """
    try:
        ktc = llm.llm_engine.vllm_config.kv_transfer_config
    except AttributeError:
        return None
    if ktc is None:
        return False
    return str(getattr(ktc, "kv_connector", "")).startswith("UCM")


def precompute_chunks(
    llm: Any,
    chunk_token_ids: Sequence[Sequence[int]],
    cache_salt: Optional[str] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PrecomputeReport:
    """Compute and store the KV of every distinct chunk, one ``max_tokens=1`` request each.

    ``llm`` is a ``vllm.LLM`` started with ``UCMBlendConnector``. ``chunk_token_ids``
    are the precompute prompts: each chunk alone (``BlendPromptBuilder.chunk_token_ids``:
    in END mode they end with the END token) or behind the prompt prefix
    (``BlendPromptBuilder.precompute_prompt(text).token_ids``). ``cache_salt`` must equal the salt of the
    RAG requests that should reuse them (None for none). ``batch_size`` requests go
    into one ``generate`` call; ucm saves a chunk's blocks once its prompt is done,
    so every chunk is in the store for the requests that follow: a store may still be
    writing when this returns (the file store's I/O threads, the CUDA save thread), but
    the engine's lookup waits for keys its own process is still saving
    (``inflight.INFLIGHT``). With TP > 1 the workers save in other processes, and a
    request sent at once may miss blocks still being written (it recomputes them).

    Chunks shorter than one ucm block are submitted too but cannot be reused (Blend
    recomputes them): keep chunks longer than ``block_tokens`` (16 by default).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from vllm import SamplingParams

    if _has_ucm_connector(llm) is False:
        logger.warning("precompute_chunks: this LLM has no ucm KV connector; chunks are computed but not stored")
    distinct, duplicates, empty = unique_chunks(chunk_token_ids)
    # Greedy, one token, no text: the output is thrown away, only the saved KV matters.
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={PRECOMPUTE_ARG: True})
    start = time.perf_counter()
    batches = 0
    for lo in range(0, len(distinct), batch_size):
        prompts: list[dict[str, Any]] = []
        for ids in distinct[lo:lo + batch_size]:
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if cache_salt is not None:
                prompt["cache_salt"] = cache_salt
            prompts.append(prompt)
        llm.generate(prompts, params, use_tqdm=False)
        batches += 1
    seconds = time.perf_counter() - start
    report = PrecomputeReport(
        num_chunks=len(chunk_token_ids), num_submitted=len(distinct), num_duplicates=duplicates,
        num_empty=empty, num_tokens=sum(len(ids) for ids in distinct), num_batches=batches, seconds=seconds)
    logger.info("precompute: %d chunks (%d duplicates, %d empty skipped), %d tokens in %.2f s",
                report.num_submitted, duplicates, empty, report.num_tokens, seconds)
    return report


__all__ = ["DEFAULT_BATCH_SIZE", "PrecomputeReport", "precompute_chunks", "unique_chunks"]
