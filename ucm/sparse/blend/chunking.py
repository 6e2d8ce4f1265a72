"""Split a RAG prompt into ``prefix | chunk_1 ... chunk_n | suffix``.

Two delimiter modes, matching the config:

* ``chunk_end_token_id``: every segment but the last *ends* with that token, so the
  prompt reads ``sys END c1 END ... cN END question``. The first segment is the
  prefix, the last the suffix, the ones between are chunks. A chunk includes its
  END token, so a chunk precomputed alone (``c END``) has exactly the chunk's
  tokens and keys.
* separator sequence (``separator_token_ids`` or ``blend_special_str`` tokenized
  once): segments are joined by the separator, ``sys SEP c1 SEP ... SEP question``.
  Separator tokens belong to no segment; Blend always recomputes them.

Chunks need not be padded to the block size. Pure Python: runs in the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass(frozen=True)
class Span:
    """A half-open token range ``[start, end)`` of the prompt."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PromptSplit:
    """Where the prefix, chunks, separators and suffix lie in a prompt."""

    prefix: Span
    chunks: tuple[Span, ...]
    suffix: Span
    separators: tuple[Span, ...] = field(default=())

    @property
    def has_chunks(self) -> bool:
        return bool(self.chunks)

    @property
    def num_chunk_tokens(self) -> int:
        """Tokens in all chunks (the most a request could reuse)."""
        return sum(len(chunk) for chunk in self.chunks)


@dataclass(frozen=True)
class Delimiter:
    """How chunks are delimited: exactly one of the two modes is set."""

    chunk_end_token_id: Optional[int] = None
    separator_token_ids: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if (self.chunk_end_token_id is None) == (self.separator_token_ids is None):
            raise ValueError("Delimiter needs exactly one of chunk_end_token_id and separator_token_ids")
        if self.separator_token_ids is not None and len(self.separator_token_ids) == 0:
            raise ValueError("separator_token_ids must not be empty")


def _positions(token_ids: Sequence[int], value: int) -> list[int]:
    """Every index of ``value``, found by the sequence's own (C) ``index``: the scheduler
    splits every prompt it plans, and a Python loop over an 8K-token prompt was a third
    of a request's planning time."""
    tokens = token_ids if isinstance(token_ids, (list, tuple)) else list(token_ids)
    out: list[int] = []
    i = -1
    while True:
        try:
            i = tokens.index(value, i + 1)
        except ValueError:
            return out
        out.append(i)


def split_by_end_token(token_ids: Sequence[int], end_token_id: int) -> PromptSplit:
    """Split where each non-final segment ends with ``end_token_id``."""
    n = len(token_ids)
    ends = _positions(token_ids, end_token_id)
    if not ends:
        return PromptSplit(prefix=Span(0, n), chunks=(), suffix=Span(n, n))
    bounds = [0] + [e + 1 for e in ends]
    segments = [Span(a, b) for a, b in zip(bounds, bounds[1:])]
    return PromptSplit(prefix=segments[0], chunks=tuple(segments[1:]), suffix=Span(bounds[-1], n))


def _find_separators(token_ids: Sequence[int], sep: Sequence[int]) -> list[int]:
    """Start offsets of non-overlapping occurrences of ``sep`` (left to right)."""
    starts: list[int] = []
    width = len(sep)
    want = list(sep)
    n = len(token_ids)
    after = 0  # occurrences do not overlap: the next may start here at the earliest
    for i in _positions(token_ids, sep[0]):
        if i >= after and i <= n - width and list(token_ids[i:i + width]) == want:
            starts.append(i)
            after = i + width
    return starts


def split_by_separator(token_ids: Sequence[int], separator: Sequence[int]) -> PromptSplit:
    """Split on a separator token sequence; separators belong to no segment."""
    n = len(token_ids)
    starts = _find_separators(token_ids, separator)
    if not starts:
        return PromptSplit(prefix=Span(0, n), chunks=(), suffix=Span(n, n))
    width = len(separator)
    separators = tuple(Span(s, s + width) for s in starts)
    seg_bounds = [0] + [s + width for s in starts]
    seg_ends = starts + [n]
    segments = [Span(a, b) for a, b in zip(seg_bounds, seg_ends)]
    return PromptSplit(
        prefix=segments[0], chunks=tuple(segments[1:-1]), suffix=segments[-1], separators=separators
    )


def split_prompt(token_ids: Sequence[int], delimiter: Delimiter) -> PromptSplit:
    """Split ``token_ids`` with whichever delimiter mode is configured."""
    if delimiter.chunk_end_token_id is not None:
        return split_by_end_token(token_ids, delimiter.chunk_end_token_id)
    assert delimiter.separator_token_ids is not None
    return split_by_separator(token_ids, delimiter.separator_token_ids)
