"""The Blend plugin spec's surface as a thin translation into vLLM's ``kv_transfer_config``.

``--enable-blend --blend-check-layers 1 --blend-recompute-ratios 0.15
--blend-cache-provider cpu|file:PATH|cpu+file:PATH`` on ``ucm-serve``'s command line,
and the same as keyword arguments of :func:`ucm.integration.vllm.llm_factory.LLM`,
become exactly the dict a user could have written: ``UCMBlendConnector`` with
``compute_meta`` (one check layer per ``blend_check_layers`` entry), the store chain of
the provider, and the chunk delimiter. That dict is then checked by
:class:`ucm.config.UcmConfig`, so errors carry the same messages and key paths as a
hand-written config. Nothing here imports vLLM.

A delimiter is needed (Blend refuses to guess chunk boundaries): ``blend_special_str``
(text, default :data:`DEFAULT_SPECIAL_STR`, LMCache's separator) or
``blend_chunk_end_token_id`` (a token id, for engines without a tokenizer).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional, Sequence

from ucm.config import UcmConfig, UcmConfigError

CONNECTOR = "UCMBlendConnector"
CONNECTOR_MODULE = "ucm.integration.vllm.blend_connector"
DEFAULT_CHECK_LAYERS = (1,)
DEFAULT_RATIOS = (0.15,)
DEFAULT_PROVIDER = "cpu"
DEFAULT_SPECIAL_STR = " # # "
PROVIDER_FORMS = "cpu, file:PATH or cpu+file:PATH"


def cache_provider_stores(provider: Any) -> list[dict[str, Any]]:
    """``ucm_connectors`` for a cache provider: ``cpu`` (host memory), ``file:PATH`` (one
    file per block under PATH), ``cpu+file:PATH`` (host memory in front of the files)."""
    if not isinstance(provider, str) or not provider.strip():
        raise UcmConfigError("blend_cache_provider", f"expected {PROVIDER_FORMS}, got {provider!r}")
    text = provider.strip()
    dram = {"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {}}
    if text == "cpu":
        return [dram]
    front, files = ([dram], text[len("cpu+"):]) if text.startswith("cpu+") else ([], text)
    path = files[len("file:"):].strip() if files.startswith("file:") else ""
    if not path:
        raise UcmConfigError("blend_cache_provider", f"expected {PROVIDER_FORMS}, got {provider!r}")
    return front + [{"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": path}}]


def _as_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value]
    if not value:
        raise UcmConfigError(name, "must not be empty")
    return list(value)


def blend_kv_transfer_config(check_layers: Any = DEFAULT_CHECK_LAYERS, recompute_ratios: Any = DEFAULT_RATIOS,
                             cache_provider: Any = DEFAULT_PROVIDER, special_str: Optional[str] = None,
                             chunk_end_token_id: Optional[int] = None) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for the spec's Blend settings, validated by UcmConfig.

    ``recompute_ratios`` has one ratio per check layer, or one for all of them.
    """
    layers = _as_list("blend_check_layers", check_layers)
    ratios = _as_list("blend_recompute_ratios", recompute_ratios)
    if len(ratios) == 1:
        ratios = ratios * len(layers)
    if len(ratios) != len(layers):
        raise UcmConfigError("blend_recompute_ratios", f"{len(ratios)} ratios for {len(layers)} check layers "
                                                       "(give one per layer, or one for all)")
    blend: dict[str, Any] = {"compute_meta": {f"model.layers.{layer}.self_attn.attn": {"ratio": ratio}
                                              for layer, ratio in zip(layers, ratios)}}
    if chunk_end_token_id is not None:
        blend["chunk_end_token_id"] = chunk_end_token_id
    if special_str is not None or chunk_end_token_id is None:
        blend["blend_special_str"] = DEFAULT_SPECIAL_STR if special_str is None else special_str
    if len(blend["compute_meta"]) != len(layers):
        raise UcmConfigError("blend_check_layers", f"a layer is given twice: {layers}")
    extra = {"ucm_connectors": cache_provider_stores(cache_provider), "ucm_sparse_config": {"Blend": blend}}
    UcmConfig.from_dict(extra)  # the dict config's own checks and messages
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_connector_extra_config": extra}


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices, got {text!r}") from None


def flag_parser() -> argparse.ArgumentParser:
    """The Blend flags alone (the rest of the command line is vLLM's)."""
    parser = argparse.ArgumentParser(prog="ucm-serve serve", add_help=False, allow_abbrev=False)
    parser.add_argument("--enable-blend", action="store_true", help="serve with ucm's Blend connector")
    parser.add_argument("--blend-check-layers", type=_ints, nargs="+", default=None,
                        help="check layer indices, e.g. 1 or 1,3 (default 1)")
    parser.add_argument("--blend-recompute-ratios", type=_floats, nargs="+", default=None,
                        help="share of reused tokens recomputed per check layer (default 0.15)")
    parser.add_argument("--blend-cache-provider", default=None, help=f"{PROVIDER_FORMS} (default cpu)")
    parser.add_argument("--blend-special-str", default=None,
                        help=f"chunk separator text (default {DEFAULT_SPECIAL_STR!r})")
    parser.add_argument("--blend-chunk-end-token-id", type=int, default=None,
                        help="chunk delimiter as a token id ending each chunk (instead of --blend-special-str)")
    return parser


class FlagError(ValueError):
    """A Blend flag the launcher refuses; the message names the flag."""


def translate_argv(argv: Sequence[str]) -> tuple[list[str], bool]:
    """vLLM's argv with the Blend flags replaced by ``--kv-transfer-config JSON``, and whether
    Blend was enabled (so the launcher sets ENABLE_SPARSE). Other subcommands and argv
    without Blend flags come back unchanged."""
    argv = list(argv)
    if not argv or argv[0] != "serve" or not any(a.split("=", 1)[0].startswith(("--enable-blend", "--blend-"))
                                                  for a in argv):
        return argv, False
    known, rest = flag_parser().parse_known_args(argv[1:])
    leftover = [a for a in rest if a.split("=", 1)[0].startswith(("--blend-", "--enable-blend"))]
    if leftover:
        raise FlagError(f"unknown Blend flag {leftover[0]}; known: {' '.join(_flag_names())}")
    if not known.enable_blend:
        raise FlagError("--blend-* flags need --enable-blend")
    if any(a.split("=", 1)[0] == "--kv-transfer-config" for a in rest):
        raise FlagError("--enable-blend builds --kv-transfer-config itself; give one or the other")
    flat = lambda lists: [x for chunk in lists for x in chunk] if lists else None  # noqa: E731
    try:
        config = blend_kv_transfer_config(
            flat(known.blend_check_layers) or DEFAULT_CHECK_LAYERS, flat(known.blend_recompute_ratios) or DEFAULT_RATIOS,
            known.blend_cache_provider or DEFAULT_PROVIDER, known.blend_special_str, known.blend_chunk_end_token_id)
    except UcmConfigError as err:
        raise FlagError(f"--enable-blend: {err}") from None
    return ["serve", *rest, "--kv-transfer-config", json.dumps(config)], True


def _flag_names() -> list[str]:
    return [a.option_strings[0] for a in flag_parser()._actions]

