"""Checks shared by every chunk-reuse method's config section (Blend, EPIC).

Both methods split prompts the same way and store/load chunks the same way, so their
sections share the chunk delimiter keys, ``save_chunks``, ``min_chunk_tokens`` and
``pay_policy``; the rules for those live here once, so the two sections cannot drift.
"""

from __future__ import annotations

from typing import Any, Optional

from ucm.config_checks import UcmConfigError, as_int, as_seq, as_str, expect, set_field

DELIMITER_KEYS = ("chunk_end_token_id", "blend_special_str", "separator_token_ids")
SHARED_KEYS = (*DELIMITER_KEYS, "save_chunks", "min_chunk_tokens", "pay_policy")
PAY_POLICIES = ("auto", "always")


def check_chunk_settings(section: Any) -> None:
    """Validate (and normalise) a frozen section's shared keys. Exactly one chunk
    delimiter must be set: guessed chunk boundaries would silently make every chunk key miss."""
    if section.chunk_end_token_id is not None:
        set_field(section, "chunk_end_token_id", as_int("chunk_end_token_id", section.chunk_end_token_id, lo=0))
    if section.blend_special_str is not None:
        as_str("blend_special_str", section.blend_special_str)
    if section.separator_token_ids is not None:
        ids = as_seq("separator_token_ids", section.separator_token_ids, "token id")
        ids = tuple(as_int(f"separator_token_ids[{i}]", t, lo=0) for i, t in enumerate(ids))
        set_field(section, "separator_token_ids", ids)
    given = [k for k in DELIMITER_KEYS if getattr(section, k) is not None]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise UcmConfigError("", f"set exactly one chunk delimiter of {', '.join(DELIMITER_KEYS)}; got {got}")
    expect("save_chunks", section.save_chunks, bool, "bool")
    set_field(section, "min_chunk_tokens", as_int("min_chunk_tokens", section.min_chunk_tokens, lo=1))
    as_str("pay_policy", section.pay_policy, PAY_POLICIES)


def check_chunk_tokens(section: Any, vocab_size: Optional[int], has_tokenizer: bool) -> None:
    """Refuse delimiter settings the model cannot honour: a token id outside the
    vocabulary never ends a chunk, a separator string needs a tokenizer."""
    if vocab_size is not None:
        ids = [("chunk_end_token_id", section.chunk_end_token_id)] if section.chunk_end_token_id is not None else []
        ids += [(f"separator_token_ids[{i}]", t) for i, t in enumerate(section.separator_token_ids or ())]
        for key, token in ids:
            if token >= vocab_size:
                raise UcmConfigError(key, f"token id {token} is outside the model's vocabulary of {vocab_size} "
                                          f"(allowed: 0..{vocab_size - 1}); it would never match a prompt token")
    if section.blend_special_str is not None and not has_tokenizer:
        raise UcmConfigError("blend_special_str", (
            "needs a tokenizer, but the engine runs with skip_tokenizer_init=True; give the separator "
            "as token ids in separator_token_ids instead"))


def shared_to_dict(section: Any) -> dict[str, Any]:
    """The shared keys of a section as its dict form (JSON and YAML safe)."""
    out: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v
                           for k in DELIMITER_KEYS if (v := getattr(section, k)) is not None}
    out.update(save_chunks=section.save_chunks, min_chunk_tokens=section.min_chunk_tokens,
               pay_policy=section.pay_policy)
    return out
