"""Text prompts that hit the chunk cache: split at ``blend_special_str``, tokenize each part alone.

A chunk's KV is found by the hash of its tokens, so a chunk must tokenize the same
wherever it sits and the same as when it was precomputed
(:class:`ucm.rag.prompt.BlendPromptBuilder` tokenizes every part on its own).
Tokenizing the joined text does not give that: BPE merges across the seams (a
separator's trailing space joins the next word), so the separator's own tokens
may not even appear and the connector finds no chunk at all.

Here the text of a request is cut at every occurrence of the separator text, each
part is encoded alone without special tokens, the parts are joined with the
separator's tokens (exactly the ids the connector splits on: ``blend_special_str``
encoded once without special tokens), and the special tokens the tokenizer adds
around a text (BOS, an EOS where the tokenizer appends one) are put once around the
whole prompt, only when the request asked for them (``add_special_tokens``; vLLM's
chat path turns them off because the chat template already wrote them).

Chat requests need nothing more: vLLM renders the messages with the chat template
into one text, which reaches the same tokenization step; the separator written
inside a message's content therefore splits it the same way.

Parts are tokenized exactly as written (no stripping): a passage sent with the same
surrounding whitespace always gets the same tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

from ucm.config import UcmConfig, UcmConfigError

logger = logging.getLogger(__name__)

_NO_SEPARATOR = ""  # cached "this engine has no blend_special_str"


def blend_separator(kv_transfer_config: Any) -> Optional[str]:
    """``blend_special_str`` of the engine's ucm config, or None (no Blend, another delimiter).

    A config ucm cannot read is left to the connector, which refuses it at start.
    """
    if kv_transfer_config is None or "UCMBlendConnector" not in str(getattr(kv_transfer_config, "kv_connector", "")):
        return None
    extra: Optional[Mapping[str, Any]] = getattr(kv_transfer_config, "kv_connector_extra_config", None) or None
    try:
        blend = UcmConfig.from_extra_config(extra).blend
    except UcmConfigError:
        return None
    return blend.blend_special_str if blend is not None and blend.blend_special_str else None


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text's own tokens (e.g. ``[BOS]``, ``[]``)."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []  # the tokenizer changes the text's own tokens: add nothing rather than guess


def tokenize_segments(tokenizer: Any, text: str, separator: str, add_special_tokens: bool) -> list[int]:
    """``text`` cut at ``separator``, each part encoded alone, joined by the separator's ids,
    with the tokenizer's special tokens once around the whole."""
    sep_ids = list(tokenizer.encode(separator, add_special_tokens=False))
    head, tail = special_tokens_around(tokenizer) if add_special_tokens else ([], [])
    ids = list(head)
    for i, part in enumerate(text.split(separator)):
        if i:
            ids.extend(sep_ids)
        if part:
            ids.extend(tokenizer.encode(part, add_special_tokens=False))
    ids.extend(tail)
    return ids


def truncate(ids: Sequence[int], encode_kwargs: Mapping[str, Any], side: str) -> list[int]:
    """Apply the truncation vLLM asked the tokenizer for (so a too-long prompt still fails
    vLLM's own length check, and ``truncate_prompt_tokens`` still cuts)."""
    max_length = encode_kwargs.get("max_length")
    if not encode_kwargs.get("truncation") or max_length is None or len(ids) <= max_length:
        return list(ids)
    return list(ids[-max_length:]) if side == "left" else list(ids[:max_length])


def tokenize_blend_prompt(renderer: Any, prompt: Mapping[str, Any], params: Any) -> Optional[list[int]]:
    """The prompt's token ids by segments, or None to let vLLM tokenize it (no separator
    configured or present, or character offsets asked for, which segments cannot give)."""
    separator = getattr(renderer, "_ucm_blend_separator", None)
    if separator is None:
        separator = blend_separator(getattr(renderer.config, "kv_transfer_config", None)) or _NO_SEPARATOR
        renderer._ucm_blend_separator = separator
    text = prompt.get("prompt")
    if not separator or not isinstance(text, str) or separator not in text:
        return None
    wants_offsets = getattr(renderer, "_wants_offsets", None)
    if wants_offsets is not None and wants_offsets(prompt, params):
        logger.warning("ucm: token offsets requested; the prompt is tokenized whole, so its chunks may miss")
        return None
    tokenizer = renderer.get_tokenizer()
    kwargs = params.get_encode_kwargs()
    ids = tokenize_segments(tokenizer, text, separator, bool(kwargs.get("add_special_tokens", True)))
    return truncate(ids, kwargs, getattr(tokenizer, "truncation_side", "right"))
