"""Segment-wise tokenization of text prompts (ucm.integration.vllm.text_prompts), no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.tiny_tokenizer import build_tokenizer, passages
from ucm.integration.vllm.text_prompts import (
    blend_separator,
    special_tokens_around,
    tokenize_blend_prompt,
    tokenize_segments,
    truncate,
)
from ucm.rag.prompt import BlendPromptBuilder
from ucm.sparse.blend.chunking import Delimiter, split_prompt

SEP = " # # "


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


def _chunks(tokenizer, ids):
    split = split_prompt(ids, Delimiter(separator_token_ids=tuple(tokenizer.encode(SEP, add_special_tokens=False))))
    return [tuple(ids[c.start:c.end]) for c in split.chunks]


def test_joined_text_loses_the_separator_at_the_seams(tokenizer):
    """Why this module exists: the whole text tokenized at once merges the separator's
    trailing space into the next passage, so the connector would find no chunk."""
    p = passages(3, 20)
    assert _chunks(tokenizer, tokenizer.encode("Context" + SEP + SEP.join(p) + SEP + "Question: where?")) == []


def test_each_chunk_tokenizes_the_same_in_any_order_and_as_precompute_stores_it(tokenizer):
    p = passages(3, 20)
    a = tokenize_segments(tokenizer, "Context" + SEP + SEP.join(p) + SEP + "Question: where?", SEP, True)
    b = tokenize_segments(tokenizer, "Context" + SEP + SEP.join([p[2], p[0], p[1]]) + SEP + "Question: where?",
                          SEP, True)
    ca, cb = _chunks(tokenizer, a), _chunks(tokenizer, b)
    assert len(ca) == 3 and sorted(ca) == sorted(cb)
    builder = BlendPromptBuilder(tokenizer, list(tokenizer.encode(SEP, add_special_tokens=False)),
                                 use_chat_template=False)
    assert [tuple(builder.chunk_token_ids(t)) for t in p] == ca  # what precompute_chunks stores
    assert a[0] == tokenizer.bos_token_id and a.count(tokenizer.bos_token_id) == 1  # BOS once, at the start


def test_special_tokens_only_when_asked(tokenizer):
    assert special_tokens_around(tokenizer) == ([tokenizer.bos_token_id], [])
    ids = tokenize_segments(tokenizer, "a" + SEP + "b", SEP, add_special_tokens=False)
    assert tokenizer.bos_token_id not in ids


def test_edge_texts_keep_the_separator_structure(tokenizer):
    sep = tokenizer.encode(SEP, add_special_tokens=False)
    assert tokenize_segments(tokenizer, SEP, SEP, False) == sep  # only a separator
    assert tokenize_segments(tokenizer, SEP + "x", SEP, False)[:len(sep)] == sep  # separator first
    assert tokenize_segments(tokenizer, "x" + SEP + SEP + "y", SEP, False).count(sep[0]) >= 4  # an empty chunk


def test_truncation_follows_vllms_request():
    assert truncate([1, 2, 3, 4], {"truncation": True, "max_length": 3}, "right") == [1, 2, 3]
    assert truncate([1, 2, 3, 4], {"truncation": True, "max_length": 3}, "left") == [2, 3, 4]
    assert truncate([1, 2, 3, 4], {"truncation": False, "max_length": 3}, "right") == [1, 2, 3, 4]


def _kv(extra, connector="UCMBlendConnector"):
    return SimpleNamespace(kv_connector=connector, kv_connector_extra_config=extra)


def test_separator_read_from_the_blend_config_only():
    assert blend_separator(_kv({"ucm_sparse_config": {"Blend": {"blend_special_str": SEP}}})) == SEP
    assert blend_separator(_kv({"ucm_sparse_config": {"Blend": {"chunk_end_token_id": 5}}})) is None
    assert blend_separator(_kv({"ucm_sparse_config": {"Blend": {"blend_special_str": SEP}}}, "Other")) is None
    assert blend_separator(None) is None


class _Params:
    def __init__(self, **kwargs):
        self.kwargs = {"truncation": False, "max_length": None, "add_special_tokens": True, **kwargs}

    def get_encode_kwargs(self):
        return dict(self.kwargs)


def test_renderer_hook_leaves_other_prompts_to_vllm(tokenizer):
    renderer = SimpleNamespace(config=SimpleNamespace(kv_transfer_config=_kv(
        {"ucm_sparse_config": {"Blend": {"blend_special_str": SEP}}})), get_tokenizer=lambda: tokenizer,
        _wants_offsets=lambda prompt, params: False)
    assert tokenize_blend_prompt(renderer, {"prompt": "no separator here"}, _Params()) is None
    ids = tokenize_blend_prompt(renderer, {"prompt": "a" + SEP + "b"}, _Params())
    assert ids == tokenize_segments(tokenizer, "a" + SEP + "b", SEP, True)
    assert len(tokenize_blend_prompt(renderer, {"prompt": "a" + SEP + "b"}, _Params(truncation=True,
                                                                                    max_length=2))) == 2
