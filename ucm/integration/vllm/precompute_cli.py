"""The ``ucm precompute`` / ``ucm-precompute`` command line over :mod:`corpus_precompute`.

Kept apart from the job itself: this is the only part that parses arguments, prints
(the one ``key=value`` summary line a script reads, and a refused setting on stderr)
and turns the job's outcome into an exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

from ucm.engine.corpus_plan import DEFAULT_TEXT_FIELD, Shard, UsageError
from ucm.integration.vllm.corpus_precompute import Settings, StopSignal, run

EXIT_OK = 0
EXIT_FAILED = 1  # chunks were submitted but not all of their blocks reached the store
EXIT_USAGE = 2  # a bad argument, corpus line or setting, refused before any compute
EXIT_SIGNAL_BASE = 128  # interrupted: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)


def build_parser(prog: str = "ucm precompute") -> argparse.ArgumentParser:
    from ucm.integration.vllm.cli_flags import DEFAULT_SPECIAL_STR

    p = argparse.ArgumentParser(
        prog=prog, description="Store each corpus document's KV as a Blend chunk in a file store, so that "
        "served prompts holding the document reuse it. Resumable: chunks already in the store are skipped.")
    p.add_argument("--model", required=True, help="the model, as served (path or hub name)")
    p.add_argument("--corpus", required=True,
                   help='JSON Lines file, one document per line: {"text": ..., "id": ...} (id optional)')
    p.add_argument("--store", required=True, help="root directory of the file store (UcmNfsStore storage_backends)")
    p.add_argument("--shard", default="0/1", help="i/n: process shard i (0-based) of n; run all n, on any "
                   "hosts, into one store (default 0/1)")
    p.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="the field holding the text (default text)")
    p.add_argument("--cache-salt", default=None, help="the cache_salt of the requests that will reuse the chunks")
    p.add_argument("--batch-size", type=int, default=16, help="requests per generate call (default 16)")
    p.add_argument("--block-tokens", type=int, default=None,
                   help="tokens per stored block, the serving config's block_tokens (default: the config's, 16)")
    p.add_argument("--blend-special-str", default=None,
                   help=f"the served chunk separator text (default {DEFAULT_SPECIAL_STR!r})")
    p.add_argument("--blend-chunk-end-token-id", type=int, default=None,
                   help="the chunk END token id, for engines configured with chunk_end_token_id")
    p.add_argument("--dtype", default="auto", help="model dtype, as served (it is part of the store keys)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + 1 (default: the model's)")
    p.add_argument("--enforce-eager", action="store_true", help="run vLLM eagerly (no compilation)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="as served (it is part of the store keys)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="passed to vLLM")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_settings(argv: Sequence[str], prog: str = "ucm precompute") -> Settings:
    """Settings from the command line; argparse exits 2 on unknown flags, UsageError for bad values."""
    a = build_parser(prog).parse_args(list(argv))
    return Settings(model=a.model, corpus=a.corpus, store=os.path.abspath(a.store), shard=Shard.parse(a.shard),
                    text_field=a.text_field, cache_salt=a.cache_salt, batch_size=a.batch_size,
                    block_tokens=a.block_tokens, blend_special_str=a.blend_special_str,
                    blend_chunk_end_token_id=a.blend_chunk_end_token_id, dtype=a.dtype,
                    max_model_len=a.max_model_len, enforce_eager=a.enforce_eager,
                    tensor_parallel_size=a.tensor_parallel_size, gpu_memory_utilization=a.gpu_memory_utilization,
                    progress=not a.no_progress)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``ucm precompute`` / ``ucm-precompute``: the exit code (0 done, 1 chunks failed to
    store, 2 refused at start, 128 + signal number when interrupted)."""
    if prog is None:
        prog = "ucm-precompute" if argv is None else "ucm precompute"
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = parse_settings(argv, prog)
        with StopSignal() as stop:
            stats = run(settings, stop)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(stats.summary(), flush=True)
    if stats.interrupted is not None:
        return EXIT_SIGNAL_BASE + int(signal.Signals[stats.interrupted])
    return EXIT_FAILED if stats.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
