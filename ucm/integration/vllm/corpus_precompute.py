"""``ucm precompute``: put the KV of every document of a corpus into a file store, resumably.

An operator fills a shared store once (a corpus of passages a RAG service retrieves
from) so that the first request carrying a passage already reuses it. This module
is that job: read a JSON Lines corpus, tokenize each document exactly as a served
text prompt tokenizes a chunk, keep the chunks this shard owns, skip those the store
already holds, and send the rest through :func:`precompute.precompute_chunks`.

How its parts relate, and why:

* **Corpus** (:func:`read_corpus`, :func:`count_documents`): the whole file is parsed
  once before any engine starts, so a malformed line 900,000 fails in seconds, not
  after hours of compute; the second pass streams, so memory does not grow with
  the corpus.
* **Chunks** (:class:`DocumentChunker`): with ``blend_special_str`` a served text
  prompt is cut at the separator and each part encoded alone
  (:func:`text_prompts.tokenize_segments`), so a document's chunk is its text encoded
  alone, without BOS. A document that itself contains the delimiter becomes several
  chunks, split by the connector's own splitter, because that is what a request
  holding the document finds.
* **Skip/resume** (:class:`ChunkPlanner`): the store is the ground truth. A chunk is
  done when the files of all its block keys (every TP rank's shard) are in the store,
  found with the file store's own ``lookup``. No ledger file: it could disagree with
  the store (blocks evicted, a store wiped, another host filling it) and would have
  to be kept consistent across shards writing at once.
* **Shards** (:class:`Shard`): a chunk belongs to shard ``digest(tokens) mod n``.
  Identical chunks therefore always land on the same shard (deduplicated across
  hosts too), the split needs no ids, and it does not depend on line order.
* **Keys**: the seed is computed from the engine config as the connector computes
  it (:func:`hash_context`). It is computed before any engine starts, so a rerun on a
  complete store starts no engine; once an engine runs, its own config is checked
  again and a differing seed (weights downloaded at start) re-plans the corpus.

Library code logs; the command line (:mod:`precompute_cli`) also prints one ``key=value``
summary line on stdout.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from ucm.engine.corpus_plan import (  # noqa: F401  (re-exported: the command's whole surface in one place)
    DEFAULT_TEXT_FIELD, GB, ID_FIELD, ChunkPlanner, CorpusError, Document, PendingChunk, PrecomputeStats, Shard,
    SubmittedChunks, UsageError, batched, chunk_digest, count_documents, parse_summary, read_corpus, store_keys_fn)
from ucm.integration.vllm.precompute_settings import (  # noqa: F401  (re-exported)
    Settings, check_corpus_path, check_settings, check_store_path)
from ucm.integration.vllm.text_prompts import tokenize_segments
from ucm.sparse.blend.chunking import Delimiter, split_by_end_token, split_by_separator

logger = logging.getLogger(__name__)

# ---- documents to chunks ----------------------------------------------------------


@dataclass(frozen=True)
class DocumentChunker:
    """A document's chunk token ids, exactly as the connector finds them in a served prompt.

    ``separator``: the engine's ``blend_special_str`` (text prompts are cut at it and each
    part encoded alone); ``delimiter``: what the connector splits on (the separator's ids,
    or the END token, which ends every chunk and belongs to it).
    """

    tokenizer: Any
    delimiter: Delimiter
    separator: Optional[str] = None

    def chunks(self, text: str) -> list[list[int]]:
        """The document's non-empty chunks (one, unless the text holds the delimiter)."""
        if self.separator is not None:
            ids = tokenize_segments(self.tokenizer, text, self.separator, add_special_tokens=False)
        else:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        # Split the document as it sits between two delimiters of a prompt, with the
        # connector's own splitter (so an occurrence inside the text splits it alike).
        end = self.delimiter.chunk_end_token_id
        if end is not None:
            wrapped = [end] + ids + [end]
            spans = split_by_end_token(wrapped, end).chunks
        else:
            sep = list(self.delimiter.separator_token_ids or ())
            wrapped = sep + ids + sep
            spans = split_by_separator(wrapped, sep).chunks
        out = [wrapped[s.start:s.end] for s in spans]
        return [c for c in out if c and c != [end]]


# ---- signals ----------------------------------------------------------------------


class StopSignal:
    """SIGINT/SIGTERM ask the run to stop after the batch in flight (its chunks are then
    stored and counted); a second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("ucm precompute: %s received, stopping after the current batch (again to stop now)",
                       signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received is not None else None


# ---- the engine side ------------------------------------------------------------------


def hash_context(vllm_config: Any) -> Any:
    """The store-key context of an engine, the connector's own (``vllm_hash_context``)."""
    from ucm.integration.vllm.model_identity import vllm_hash_context

    return vllm_hash_context(vllm_config)


def delimiter_of(blend: Any, tokenizer: Any) -> tuple[Delimiter, Optional[str]]:
    """The connector's delimiter for the Blend section, and the separator text if any."""
    if blend.chunk_end_token_id is not None:
        return Delimiter(chunk_end_token_id=blend.chunk_end_token_id), None
    if blend.separator_token_ids is not None:
        return Delimiter(separator_token_ids=tuple(blend.separator_token_ids)), None
    ids = tuple(tokenizer.encode(blend.blend_special_str, add_special_tokens=False))
    if not ids:
        raise UsageError(f"--blend-special-str {blend.blend_special_str!r} tokenizes to no tokens")
    return Delimiter(separator_token_ids=ids), blend.blend_special_str


@dataclass
class EngineView:
    """What planning needs from an engine config: the key seed, the TP size, the longest prompt."""

    seed: bytes
    tp_size: int
    max_tokens: Optional[int]

    @classmethod
    def of(cls, vllm_config: Any, cache_salt: Optional[str]) -> EngineView:
        ctx = hash_context(vllm_config)
        max_len = getattr(vllm_config.model_config, "max_model_len", None)
        # A precompute request samples one token after the prompt.
        return cls(ctx.seed(cache_salt), ctx.tp_size, max_len - 1 if max_len else None)


class Engine:
    """The vLLM engine, started only when a chunk must be computed."""

    def __init__(self, settings: Settings, kv_config: dict[str, Any]) -> None:
        self.settings = settings
        self.kv_config = kv_config
        self.llm: Any = None

    def pre_config(self) -> Any:
        """The engine config vLLM would build, without starting an engine (for keys and tokenizer)."""
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs

        try:
            return EngineArgs(**self.settings.engine_kwargs(),
                              kv_transfer_config=KVTransferConfig(**self.kv_config)).create_engine_config()
        except Exception as exc:  # noqa: BLE001 -- vLLM raises many kinds; all mean "cannot run this"
            raise UsageError(f"cannot configure vLLM for --model {self.settings.model}: {exc}") from None

    def start(self) -> Any:
        from vllm import LLM

        from ucm.integration.vllm import plugin

        from ucm.config import UcmConfigError

        plugin.register()  # the Blend patches, in case vLLM loaded its plugins before ENABLE_SPARSE was on
        logger.info("ucm precompute: starting the engine for %s", self.settings.model)
        try:
            self.llm = LLM(**self.settings.engine_kwargs(), kv_transfer_config=self.kv_config)
        except UcmConfigError as err:  # ucm's start-time refusals (model, layers, vocabulary): a setting
            raise UsageError(f"the engine refused the settings: {err}") from None
        return self.llm

    def shutdown(self) -> None:
        """Stop the engine; its connector waits for the saves still being written."""
        if self.llm is None:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # noqa: BLE001 -- shutting down is best effort; the files are checked after
            logger.warning("ucm precompute: engine shutdown: %s", exc)
        self.llm = None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="doc", desc="precompute", dynamic_ncols=True, file=sys.stderr)


class CorpusJob:
    """One run over the corpus: plan against the store, start the engine when a chunk is
    missing, compute in batches, confirm each batch's files, stop on a signal."""

    def __init__(self, settings: Settings, stop: Optional[StopSignal] = None) -> None:
        os.environ["ENABLE_SPARSE"] = "1"  # before vLLM is imported: engine processes inherit it
        # One process unless asked otherwise: the saves then land in this process, where
        # INFLIGHT lets the run confirm each batch at once, and a signal reaches only us.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm.tokenizers import cached_tokenizer_from_config

        from ucm.config import UcmConfig
        from ucm.integration.vllm.logs import route_ucm_logs
        from ucm.store.nfs_store import UcmNfsStore

        route_ucm_logs()
        # The run reports once at its end; precompute_chunks' line per batch would be noise.
        logging.getLogger("ucm.integration.vllm.precompute").setLevel(logging.WARNING)
        self.settings = settings
        self.stop = stop
        kv_config = settings.kv_transfer_config()
        ucm_config = UcmConfig.from_dict(kv_config["kv_connector_extra_config"])
        self.block_tokens = ucm_config.block_tokens
        self.engine = Engine(settings, kv_config)
        pre = self.engine.pre_config()
        tokenizer = cached_tokenizer_from_config(pre.model_config)
        delimiter, separator = delimiter_of(ucm_config.blend, tokenizer)
        self.chunker = DocumentChunker(tokenizer, delimiter, separator)
        self.view = EngineView.of(pre, settings.cache_salt)
        self.store = UcmNfsStore(settings.store, io_threads=1)  # lookups only: the engine has its own
        self.submitted: Optional[SubmittedChunks] = None
        self.planner: Optional[ChunkPlanner] = None

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.received is not None

    def size_of(self, key: bytes) -> int:
        try:
            return os.stat(self.store.path_for(key)).st_size
        except OSError:
            return 0

    def run(self, total: int) -> PrecomputeStats:
        stats = PrecomputeStats(shard=self.settings.shard)
        try:
            while True:  # once, or twice when the started engine's keys differ from the planned ones
                stats = PrecomputeStats(shard=self.settings.shard, engine_started=self.engine.llm is not None)
                if not self._one_pass(stats, total):
                    break
        except KeyboardInterrupt:  # a second signal: stop now, mid-batch (that batch is not counted)
            stats.interrupted = (self.stop.name if self.stop is not None else None) or "SIGINT"
        finally:
            self.engine.shutdown()  # flushes the saves still being written
            if self.submitted is not None:
                self.submitted.confirm(final=True)
            self.store.close()
        if self.planner is not None and self.planner.too_long_examples:
            logger.warning("ucm precompute: %d chunks do not fit the engine (max_model_len %s) and were skipped, "
                           "e.g. %s", stats.too_long, (self.view.max_tokens or 0) + 1,
                           "; ".join(self.planner.too_long_examples))
        return stats

    def _one_pass(self, stats: PrecomputeStats, total: int) -> bool:
        """Plan and compute the corpus; True when it must start over with the engine's keys."""
        from ucm.engine.inflight import INFLIGHT
        from ucm.integration.vllm.precompute import precompute_chunks

        s = self.settings
        self.planner = ChunkPlanner(s.shard, self.block_tokens, store_keys_fn(self.view.seed, self.block_tokens,
                                                                             self.view.tp_size),
                                    self.store.lookup, self.view.max_tokens, stats)
        self.submitted = SubmittedChunks(self.store.lookup, self.size_of, stats)
        bar = _progress(total, s.progress)
        try:
            pending = self.planner.pending(read_corpus(s.corpus, s.text_field), self.chunker, self.stopping)
            for batch in batched(pending, s.batch_size):
                if self.engine.llm is None and self._start_engine(stats):
                    return True
                report = precompute_chunks(self.engine.llm, [c.token_ids for c in batch], s.cache_salt, s.batch_size)
                stats.submitted += report.num_submitted
                stats.tokens += report.num_tokens
                stats.compute_seconds += report.seconds
                self.submitted.add(batch)
                INFLIGHT.wait([k for c in batch for k in c.missing])  # this process's file writes land first
                self.submitted.confirm()
                if bar is not None:
                    bar.update(batch[-1].doc_number - bar.n)
                    bar.set_postfix(stored=stats.stored, skipped=stats.already_stored, refresh=False)
                if self.stopping():
                    break
            if self.stopping():
                stats.interrupted = self.stop.name if self.stop is not None else None
            elif bar is not None:
                bar.update(total - bar.n)
            return False
        finally:
            if bar is not None:
                bar.close()

    def _start_engine(self, stats: PrecomputeStats) -> bool:
        """Start the engine; True when its store keys differ from the planned ones."""
        llm = self.engine.start()
        stats.engine_started = True
        started = EngineView.of(llm.llm_engine.vllm_config, self.settings.cache_salt)
        if (started.seed, started.tp_size) != (self.view.seed, self.view.tp_size):
            logger.warning("ucm precompute: the engine's store keys differ from the planned ones (model files "
                           "resolved at start?); checking the store again with the engine's keys")
            self.view = started
            return True
        self.view.max_tokens = started.max_tokens
        return False


def run(settings: Settings, stop: Optional[StopSignal] = None) -> PrecomputeStats:
    """The whole job; raises :class:`UsageError` for what it refuses before computing.

    Everything that can be refused (settings, every corpus line, the model's config) is
    checked before an engine starts.
    """
    started = time.perf_counter()
    check_settings(settings)
    total = count_documents(settings.corpus, settings.text_field)
    stats = CorpusJob(settings, stop).run(total)
    stats.seconds = time.perf_counter() - started
    logger.info("%s", stats.summary())
    return stats
