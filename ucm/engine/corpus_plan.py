"""What a corpus precompute computes: the corpus, its shards, the chunks still missing
from the store, and the counts it reports (no vLLM, no tokenizer).

``ucm precompute`` (:mod:`ucm.integration.vllm.corpus_precompute`) is the vLLM side: it
tokenizes documents into chunks, runs the engine and handles signals. The decisions that
make it resumable and shardable live here, testable on their own:

* the corpus is parsed whole before any engine starts (a malformed line fails in
  seconds), then streamed;
* a chunk belongs to shard ``digest(tokens) mod n``, so identical chunks fall to one
  shard, with no ids and no dependence on line order;
* the store is the ground truth of what is done: a chunk is skipped when the files of all
  its block keys (every TP rank's) are present, and counts as stored only once the blocks
  it lacked are files after its batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

from ucm.hashing import block_keys, rank_key

logger = logging.getLogger(__name__)

DEFAULT_TEXT_FIELD = "text"
ID_FIELD = "id"
GB = 1e9


class Chunker(Protocol):
    """Cuts a document's text into the chunks a request holding it would carry."""

    def chunks(self, text: str) -> list[list[int]]: ...

class UsageError(ValueError):
    """A setting refused at start; the message says which and why (exit code 2)."""


class CorpusError(UsageError):
    """A malformed corpus line, named as ``path:line``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.line = line


# ---- corpus ---------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One corpus line: its 1-based line number, optional id and text."""

    line: int
    doc_id: Optional[str]
    text: str

    @property
    def empty(self) -> bool:
        """Blank text has nothing to precompute (whitespace alone is not a passage)."""
        return not self.text.strip()

    def name(self) -> str:
        return f"id {self.doc_id!r} (line {self.line})" if self.doc_id is not None else f"line {self.line}"


def _parse_line(path: str, number: int, raw: str, text_field: str) -> Document:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(path, number, f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise CorpusError(path, number, f"no {text_field!r} field (keys: {', '.join(sorted(record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise CorpusError(path, number, f"field {text_field!r} must be a string, got {type(text).__name__}")
    doc_id = record.get(ID_FIELD)
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
        raise CorpusError(path, number, f"field {ID_FIELD!r} must be a string or an integer, "
                                        f"got {type(doc_id).__name__}")
    return Document(number, None if doc_id is None else str(doc_id), text)


def read_corpus(path: str, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    """The documents of a JSON Lines file, in order, one per non-blank line.

    Raises :class:`CorpusError` at the first malformed line (not JSON, not an object,
    no text field, a text that is not a string, an id that is neither string nor int)
    or undecodable UTF-8. Blank lines are not documents (a trailing newline is common).
    """
    with open(path, "rb") as fh:
        for number, raw_bytes in enumerate(fh, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(path, number, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if raw.strip():
                yield _parse_line(path, number, raw, text_field)


def count_documents(path: str, text_field: str = DEFAULT_TEXT_FIELD) -> int:
    """Parse the whole corpus once (raising at the first bad line); the number of documents."""
    return sum(1 for _ in read_corpus(path, text_field))


# ---- shards ---------------------------------------------------------------------


def chunk_digest(token_ids: Sequence[int]) -> bytes:
    """A chunk's identity for deduplication and sharding: stable across processes and hosts."""
    return hashlib.blake2b(struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=16).digest()


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the chunks whose digest mod ``count`` is ``index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UsageError(f"--shard: the shard count must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise UsageError(f"--shard: the index must be in 0..{self.count - 1} (0-based) for {self.count} "
                             f"shards, got {self.index}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` as given on the command line."""
        parts = text.strip().split("/")
        try:
            index, count = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            index = count = None
        if index is None or count is None:
            raise UsageError(f"--shard: expected i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
        return cls(index, count)

    def owner(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") % self.count

    def owns(self, digest: bytes) -> bool:
        return self.owner(digest) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# ---- the plan: which chunks to compute -------------------------------------------


@dataclass
class PrecomputeStats:
    """What a run found and did; chunk counts are of this shard's chunks."""

    documents: int = 0  # corpus documents read (all shards read all)
    empty: int = 0  # documents with blank text, skipped
    chunks: int = 0  # chunks of this shard, duplicates included
    other_shards: int = 0  # chunks left to the other shards
    duplicates: int = 0  # repeats of an earlier chunk of this run
    too_short: int = 0  # shorter than one block: nothing a store could hold
    too_long: int = 0  # do not fit the engine's max_model_len
    already_stored: int = 0  # every block already in the store: skipped
    submitted: int = 0  # sent to the engine
    stored: int = 0  # submitted and now every block is in the store
    failed: int = 0  # submitted, but blocks are still missing at the end
    tokens: int = 0  # prompt tokens submitted
    bytes_written: int = 0  # bytes of the block files this run created
    compute_seconds: float = 0.0  # inside the engine (generate)
    seconds: float = 0.0  # the whole run, engine start included
    engine_started: bool = False
    interrupted: Optional[str] = None  # the signal's name when stopped early
    shard: Shard = field(default_factory=Shard)

    @property
    def chunks_per_second(self) -> float:
        return self.submitted / self.compute_seconds if self.compute_seconds > 0 else 0.0

    @property
    def gb_written(self) -> float:
        return self.bytes_written / GB

    def summary(self) -> str:
        """One ``key=value`` line: what the CLI prints and the log's final line."""
        fields = [("documents", self.documents), ("chunks", self.chunks), ("stored", self.stored),
                  ("skipped_stored", self.already_stored), ("duplicates", self.duplicates), ("empty", self.empty),
                  ("too_short", self.too_short), ("too_long", self.too_long), ("failed", self.failed),
                  ("other_shards", self.other_shards), ("submitted", self.submitted),
                  ("chunks_per_s", f"{self.chunks_per_second:.2f}"), ("gb_written", f"{self.gb_written:.6f}"),
                  ("seconds", f"{self.seconds:.1f}"), ("shard", str(self.shard)),
                  ("engine_started", "yes" if self.engine_started else "no"),
                  ("interrupted", self.interrupted or "no")]
        return "ucm precompute: " + " ".join(f"{k}={v}" for k, v in fields)


def parse_summary(line: str) -> dict[str, str]:
    """The fields of a :meth:`PrecomputeStats.summary` line (for scripts and tests)."""
    body = line.split(":", 1)[1] if line.startswith("ucm precompute:") else line
    return dict(item.split("=", 1) for item in body.split())


@dataclass(frozen=True)
class PendingChunk:
    """A chunk to compute: the document it came from, its tokens, the store keys it lacks."""

    doc_number: int  # 1-based position of its document in the corpus
    token_ids: list[int]
    missing: list[bytes]


KeysFn = Callable[[Sequence[int]], list[bytes]]
ExistsFn = Callable[[Sequence[bytes]], Sequence[bool]]


def store_keys_fn(seed: bytes, block_tokens: int, tp_size: int) -> KeysFn:
    """A chunk's store keys: its full blocks' chain keys from ``seed`` (exactly the keys a
    prompt holding the chunk looks up), one shard key per TP rank each."""
    def keys(token_ids: Sequence[int]) -> list[bytes]:
        return [rank_key(k, rank) for k in block_keys(seed, token_ids, block_tokens) for rank in range(tp_size)]
    return keys


class ChunkPlanner:
    """Decides per chunk: another shard's, a duplicate, too short or long, stored, or to compute.

    ``exists`` is the store's lookup (the ground truth of what is done); ``max_tokens``
    is the longest prompt the engine takes (None: no limit known).
    """

    def __init__(self, shard: Shard, block_tokens: int, keys: KeysFn, exists: ExistsFn,
                 max_tokens: Optional[int], stats: PrecomputeStats) -> None:
        self.shard = shard
        self.block_tokens = block_tokens
        self.keys = keys
        self.exists = exists
        self.max_tokens = max_tokens
        self.stats = stats
        self._seen: set[bytes] = set()
        self.too_long_examples: list[str] = []

    def missing_keys(self, token_ids: Sequence[int], where: str = "") -> Optional[list[bytes]]:
        """The store keys to write for this chunk, or None when it is not to be computed."""
        digest = chunk_digest(token_ids)
        if not self.shard.owns(digest):
            self.stats.other_shards += 1
            return None
        self.stats.chunks += 1
        if digest in self._seen:
            self.stats.duplicates += 1
            return None
        self._seen.add(digest)
        if len(token_ids) < self.block_tokens:
            self.stats.too_short += 1
            return None
        if self.max_tokens is not None and len(token_ids) > self.max_tokens:
            self.stats.too_long += 1
            if len(self.too_long_examples) < 5:
                self.too_long_examples.append(f"{where} ({len(token_ids)} tokens)")
            return None
        keys = self.keys(token_ids)
        missing = [k for k, found in zip(keys, self.exists(keys)) if not found]
        if not missing:
            self.stats.already_stored += 1
            return None
        return missing

    def pending(self, documents: Iterable[Document], chunker: Chunker,
                stop: Callable[[], bool] = lambda: False) -> Iterator[PendingChunk]:
        """The chunks to compute, in corpus order; the counts go to ``stats`` as it goes.
        ``stop`` is asked before each document (a signal ends the run between documents too)."""
        for number, doc in enumerate(documents, start=1):
            if stop():
                return
            self.stats.documents += 1
            if doc.empty:
                self.stats.empty += 1
                continue
            for ids in chunker.chunks(doc.text):
                missing = self.missing_keys(ids, doc.name())
                if missing is not None:
                    yield PendingChunk(number, ids, missing)


def batched(items: Iterable[PendingChunk], size: int) -> Iterator[list[PendingChunk]]:
    batch: list[PendingChunk] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class SubmittedChunks:
    """Submitted chunks whose blocks have not all been seen in the store yet.

    A chunk counts as stored once every key it lacked is a block file; the bytes of
    those files are what this run wrote. The file store writes in I/O threads, so a
    check right after ``generate`` may come early: unconfirmed chunks are checked
    again after later batches and once more after the engine has shut down (which
    flushes its saves); only then are the rest counted as failed.
    """

    def __init__(self, exists: ExistsFn, size_of: Callable[[bytes], int], stats: PrecomputeStats) -> None:
        self.exists = exists
        self.size_of = size_of
        self.stats = stats
        self.unconfirmed: list[PendingChunk] = []

    def add(self, chunks: Iterable[PendingChunk]) -> None:
        self.unconfirmed.extend(chunks)

    def confirm(self, final: bool = False) -> None:
        still = []
        for chunk in self.unconfirmed:
            if all(self.exists(chunk.missing)):
                self.stats.stored += 1
                self.stats.bytes_written += sum(self.size_of(k) for k in chunk.missing)
            else:
                still.append(chunk)
        if final:
            self.stats.failed += len(still)
            still = []
        self.unconfirmed = still
