"""The settings of ``ucm precompute``, and every check that refuses them before a corpus
line is read or a model loaded.

Apart from the job (:mod:`corpus_precompute`) and its command line
(:mod:`precompute_cli`): both read them, and a settings error must surface in seconds,
with the flag it is about, whatever drives the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ucm.engine.corpus_plan import DEFAULT_TEXT_FIELD, Shard, UsageError


@dataclass(frozen=True)
class Settings:
    """The command line, checked."""

    model: str
    corpus: str
    store: str
    shard: Shard = Shard()
    text_field: str = DEFAULT_TEXT_FIELD
    cache_salt: Optional[str] = None
    batch_size: int = 16
    block_tokens: Optional[int] = None  # None: the config's default
    blend_special_str: Optional[str] = None
    blend_chunk_end_token_id: Optional[int] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: Optional[float] = None
    progress: bool = True

    def kv_transfer_config(self) -> dict[str, Any]:
        """The connector config: Blend on a file store at ``store``, the given delimiter and
        block size, no per-request log line (a corpus would print one per chunk)."""
        from ucm.config import UcmConfig, UcmConfigError
        from ucm.integration.vllm.cli_flags import blend_kv_transfer_config

        try:
            config = blend_kv_transfer_config(cache_provider=f"file:{self.store}", special_str=self.blend_special_str,
                                              chunk_end_token_id=self.blend_chunk_end_token_id)
            extra = config["kv_connector_extra_config"]
            extra["log_stats"] = False
            if self.block_tokens is not None:
                extra["block_tokens"] = self.block_tokens
            UcmConfig.from_dict(extra)
        except UcmConfigError as err:
            raise UsageError(f"bad setting: {err}") from None
        return config

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(model=self.model, dtype=self.dtype, enforce_eager=self.enforce_eager,
                                      tensor_parallel_size=self.tensor_parallel_size)
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kwargs


def check_corpus_path(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"--corpus: {path} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"--corpus: {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--corpus: {path} is not readable")


def check_store_path(path: str) -> None:
    """The store root must be a directory this process can write (created if missing).

    The file store would serve a read-only root read-only, skipping every save: right for
    a serving engine, useless for a precompute, so it is refused here.
    """
    from ucm.store.base import StoreError
    from ucm.store.block_files import describe_oserror, open_root

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--store: {path} exists and is not a directory")
    try:
        writable = open_root(path)
    except StoreError as exc:
        raise UsageError(f"--store: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--store: cannot use {path}: {describe_oserror(exc)}") from None
    if not writable:
        raise UsageError(f"--store: {path} is not writable by this process (read-only mount or permissions)")


def check_settings(settings: Settings, env: Optional[dict[str, str]] = None) -> None:
    """Everything that can be refused before reading the corpus or loading a model."""
    from ucm.config import CONFIG_FILE_ENV

    env = dict(os.environ) if env is None else env
    if env.get(CONFIG_FILE_ENV, "").strip():
        raise UsageError(f"{CONFIG_FILE_ENV} is set; ucm precompute builds its config from its own flags "
                         f"(--store, --block-tokens, --blend-*): unset {CONFIG_FILE_ENV}")
    if settings.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.tensor_parallel_size < 1:
        raise UsageError(f"--tensor-parallel-size must be >= 1, got {settings.tensor_parallel_size}")
    if settings.cache_salt is not None and not settings.cache_salt:
        raise UsageError("--cache-salt must not be empty (leave it out for no salt)")
    if not settings.text_field:
        raise UsageError("--text-field must not be empty")
    if settings.blend_special_str is not None and settings.blend_chunk_end_token_id is not None:
        raise UsageError("give one chunk delimiter: --blend-special-str or --blend-chunk-end-token-id")
    check_corpus_path(settings.corpus)
    settings.kv_transfer_config()  # block size and delimiter, with the config's own checks
    check_store_path(settings.store)
