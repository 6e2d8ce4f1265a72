"""RAG-shaped token prompts for the tiny models: ``sys END c_i END ... question``.

Shared by the CPU tests (tests/vllm/) and the GPU checks (benchmarks/gpu_check.py), so
both ask the same prompts. No pytest, no vLLM: importable on the GPU host as is.
"""

from __future__ import annotations

import random

END = 2  # chunk_end_token_id of the tiny-model prompts (token ids 0-2 are reserved)


class Rag:
    """Deterministic prompts from a seed: a system prompt, five chunks, four questions."""

    def __init__(self, seed: int = 0, vocab: int = 512) -> None:
        rng = random.Random(seed)
        pick = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
        self.system = pick(37) + [END]
        self.chunks = [pick(n) + [END] for n in (70, 45, 93, 61, 52)]
        self.questions = [pick(n) for n in (19, 23, 11, 30)]

    def prompt(self, order: list[int], question: int = 0) -> list[int]:
        ids = list(self.system)
        for i in order:
            ids += self.chunks[i]
        return ids + self.questions[question]

    def chunk_prompts(self, which: list[int]) -> list[dict]:
        return [{"ids": self.chunks[i]} for i in which]
