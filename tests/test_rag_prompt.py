"""BlendPromptBuilder with the real SmolLM2 tokenizer and a tiny fake one."""

import re
from typing import Callable, Optional

import pytest

from ucm.rag.prompt import (
    DEFAULT_CHUNK_END_TOKEN,
    DEFAULT_CHUNK_END_TOKEN_ID,
    BlendPromptBuilder,
    BuiltPrompt,
    DelimiterInTextError,
    default_delimiter,
)
from ucm.sparse.blend.chunking import Delimiter, split_prompt

CHUNKS = [
    "Scott Derrickson\nScott Derrickson (born July 16, 1966) is an American director.\n",
    "Ed Wood\nEdward Davis Wood Jr. was an American filmmaker, actor and writer.\n",
    "Woodson, Arkansas\nWoodson is a census-designated place in Pulaski County.\n",
]
QUESTION = "Were Scott Derrickson and Ed Wood of the same nationality?"


def span_tokens(built: BuiltPrompt, i: int) -> list[int]:
    start, end = built.chunk_spans[i]
    return built.token_ids[start:end]


# ------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smol_tokenizer():
    from ucm.rag.models import ModelUnavailableError, default_model_dir

    try:
        model_dir = default_model_dir()
    except ModelUnavailableError as exc:
        pytest.fail(str(exc))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_default_delimiter_is_file_sep(smol_tokenizer):
    assert smol_tokenizer.convert_tokens_to_ids(DEFAULT_CHUNK_END_TOKEN) == DEFAULT_CHUNK_END_TOKEN_ID == 5
    builder = BlendPromptBuilder(smol_tokenizer)
    assert builder.chunk_end_token_id == 5
    assert builder.sparse_config_delimiter() == {"chunk_end_token_id": 5}


def test_chunk_tokens_identical_in_any_order_and_position(smol_tokenizer):
    builder = BlendPromptBuilder(smol_tokenizer)
    a = builder.build(CHUNKS, QUESTION)
    b = builder.build([CHUNKS[2], CHUNKS[0], CHUNKS[1]], QUESTION)
    c = builder.build([CHUNKS[1]], "Another question?")
    expected = [builder.chunk_token_ids(text) for text in CHUNKS]
    assert [span_tokens(a, i) for i in range(3)] == expected
    assert [span_tokens(b, i) for i in range(3)] == [expected[2], expected[0], expected[1]]
    assert span_tokens(c, 0) == expected[1]
    assert a.chunk_spans[0] != b.chunk_spans[1]  # same tokens, different position
    # Every chunk (and its precompute request) ends with END, and the prefix too.
    assert all(ids[-1] == 5 and 5 not in ids[:-1] for ids in expected)
    assert a.token_ids[a.prefix_len - 1] == 5
    assert a.token_ids[: a.prefix_len] == b.token_ids[: b.prefix_len] == c.token_ids[: c.prefix_len]
    assert a.token_ids.count(5) == len(CHUNKS) + 1


def test_separate_tokenization_differs_from_joint(smol_tokenizer):
    """Why parts are tokenized separately: joint BPE merges across a boundary."""
    builder = BlendPromptBuilder(smol_tokenizer)
    joint = smol_tokenizer.encode("The cats are here", add_special_tokens=False)
    first, second = builder.chunk_text_ids("The cat"), builder.chunk_text_ids("s are here")
    assert joint != first + second  # " cats" is one token jointly, " cat" + "s" apart
    built = builder.build(["The cat", "s are here"], "q")
    assert span_tokens(built, 0) == first + [5] and span_tokens(built, 1) == second + [5]


def test_chat_frame_and_spans(smol_tokenizer):
    builder = BlendPromptBuilder(smol_tokenizer)
    built = builder.build(CHUNKS, QUESTION)
    ids = built.token_ids
    text = smol_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2 adds no BOS itself: the template's own <|im_start|> opens the prompt.
    assert ids[0] == 1 and ids[1] != 1
    assert smol_tokenizer.decode(ids[: built.prefix_len]).endswith("<|im_start|>user\nPassages:\n<file_sep>")
    start, end = built.suffix_span
    assert end == len(ids) and start == built.chunk_spans[-1][1]
    assert ids[start:end] == builder.suffix_token_ids(QUESTION)
    assert QUESTION in smol_tokenizer.decode(ids[start:end])
    # The connector's splitter sees exactly the same parts.
    split = split_prompt(ids, Delimiter(chunk_end_token_id=5))
    assert [(s.start, s.end) for s in split.chunks] == built.chunk_spans
    assert split.prefix.end == built.prefix_len
    assert built.num_chunk_tokens == sum(len(builder.chunk_token_ids(c)) for c in CHUNKS)


def test_delimiter_inside_text_is_refused(smol_tokenizer):
    builder = BlendPromptBuilder(smol_tokenizer)
    with pytest.raises(DelimiterInTextError, match=r"chunk delimiter token 5 \('<file_sep>'\)"):
        builder.build([CHUNKS[0], "bad <file_sep> passage"], QUESTION)
    with pytest.raises(DelimiterInTextError, match="question"):
        builder.build(CHUNKS, "what is <file_sep>?")
    # Chat markup cannot be the END token: the template's prefix contains it.
    with pytest.raises(DelimiterInTextError, match="prefix"):
        BlendPromptBuilder(smol_tokenizer, delimiter=2)


def test_no_chat_template_mode(smol_tokenizer):
    builder = BlendPromptBuilder(smol_tokenizer, use_chat_template=False, system_prompt="Be brief.")
    built = builder.build(CHUNKS[:1], QUESTION)
    assert smol_tokenizer.decode(built.token_ids).startswith("Be brief.\n\nPassages:\n<file_sep>")
    assert 1 not in built.token_ids and 2 not in built.token_ids


# ---------------------------------------------------------------- fake tokenizer

SPECIALS = {"<bos>": 1, "<end>": 2, "<file_sep>": 3}


class FakeTokenizer:
    """Whitespace words -> ids from 100 up; <bos>/<end>/<file_sep> are specials."""

    unk_token_id = 0
    unk_token = "<unk>"

    def __init__(self, add_bos: bool = True, template: Optional[Callable] = None, file_sep: bool = True):
        self.bos_token_id = 1
        self.add_bos = add_bos
        self.template = template
        self.chat_template = "fake" if template else None
        self.specials = dict(SPECIALS) if file_sep else {k: v for k, v in SPECIALS.items() if k != "<file_sep>"}
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [1] if add_special_tokens and self.add_bos else []
        for piece in re.split(r"(<bos>|<end>|<file_sep>)", text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            else:
                ids.extend(self.vocab.setdefault(w, 100 + len(self.vocab)) for w in piece.split())
        return ids

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials.get(token, self.vocab.get(token, self.unk_token_id))

    def convert_ids_to_tokens(self, token_id: int) -> str:
        names = {v: k for k, v in {**self.specials, **self.vocab}.items()}
        return names.get(token_id, self.unk_token)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.template(messages)


def test_fake_bos_exactly_once_at_start():
    tok = FakeTokenizer(add_bos=True)
    builder = BlendPromptBuilder(
        tok, delimiter=2, system_prompt="sys text", context_intro="", question_template="{question}"
    )
    built = builder.build(["alpha beta", "gamma"], "why")
    assert built.token_ids.count(1) == 1 and built.token_ids[0] == 1
    alpha, beta, gamma, why, sys_, text = (tok.vocab[w] for w in ["alpha", "beta", "gamma", "why", "sys", "text"])
    assert built.token_ids == [1, sys_, text, 2, alpha, beta, 2, gamma, 2, why]
    assert built.prefix_len == 4
    assert built.chunk_spans == [(4, 7), (7, 9)]
    assert built.suffix_span == (9, 10)
    assert builder.chunk_token_ids("alpha beta") == [alpha, beta, 2]  # no BOS in a precompute request


def test_fake_without_bos_adds_none():
    tok = FakeTokenizer(add_bos=False)
    built = BlendPromptBuilder(tok, delimiter=2, system_prompt="s", context_intro="").build(["c"], "q")
    assert 1 not in built.token_ids


def test_template_that_starts_with_bos_gets_no_second_bos():
    def template(messages):
        body = "".join(f"[{m['role']}] {m['content']} <end>" for m in messages)
        return "<bos>" + body + " [assistant]"

    tok = FakeTokenizer(add_bos=True, template=template)
    builder = BlendPromptBuilder(tok, delimiter=3, system_prompt="sys")
    built = builder.build(["c1 words", "c2"], "q?")
    assert built.token_ids[0] == 1 and built.token_ids.count(1) == 1
    # Prefix = template head up to the user content + intro + END; suffix = question + tail.
    head = tok.encode("<bos>[system] sys <end>[user] Passages:", add_special_tokens=False)
    assert built.token_ids[: built.prefix_len] == head + [3]
    assert built.token_ids[built.suffix_span[0]:] == tok.encode(
        "Question: q?\nAnswer: <end> [assistant]", add_special_tokens=False
    )


def test_template_without_system_role_folds_system_prompt_into_user_turn():
    def template(messages):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("system role not supported")
        return "".join(f"[{m['role']}] {m['content']} <end>" for m in messages) + " [assistant]"

    tok = FakeTokenizer(add_bos=False, template=template)
    builder = BlendPromptBuilder(tok, delimiter=3, system_prompt="be brief")
    prefix = builder.prefix_token_ids()
    assert prefix == tok.encode("[user] be brief Passages:", add_special_tokens=False)


def test_separator_mode_spans_and_checks():
    tok = FakeTokenizer(add_bos=False)
    sep = tok.encode("SEP SEP", add_special_tokens=False)
    builder = BlendPromptBuilder(
        tok, delimiter=sep, system_prompt="sys", context_intro="", question_template="{question}"
    )
    assert builder.sparse_config_delimiter() == {"separator_token_ids": sep}
    assert builder.separator_token_ids == sep and builder.chunk_end_token_id is None
    built = builder.build(["a b", "c"], "q")
    s, a, b, c, q = (tok.vocab[w] for w in ["sys", "a", "b", "c", "q"])
    S = sep[0]
    assert built.token_ids == [s, S, S, a, b, S, S, c, S, S, q]
    assert built.prefix_len == 1
    assert built.chunk_spans == [(3, 5), (7, 8)]
    assert built.separator_spans == [(1, 3), (5, 7), (8, 10)]
    assert built.suffix_span == (10, 11)
    assert builder.chunk_token_ids("a b") == [a, b]  # separators are never cached
    with pytest.raises(DelimiterInTextError, match="separator"):
        builder.build(["x SEP SEP y"], "q")
    # "... SEP" + separator "SEP SEP" would be split one token early by the connector.
    with pytest.raises(DelimiterInTextError, match="part boundary"):
        builder.build(["ends with SEP"], "q")


def test_no_chunks_gives_prefix_and_suffix_only():
    tok = FakeTokenizer(add_bos=False)
    builder = BlendPromptBuilder(tok, delimiter=2, system_prompt="s", context_intro="", question_template="{question}")
    built = builder.build([], "q")
    assert built.chunk_spans == [] and built.prefix_len == 2 and built.suffix_span == (2, 3)


def test_bad_arguments():
    tok = FakeTokenizer()
    builder = BlendPromptBuilder(tok, delimiter=2)
    with pytest.raises(ValueError, match="empty"):
        builder.chunk_token_ids("   ")
    with pytest.raises(TypeError):
        BlendPromptBuilder(tok, delimiter="<end>")
    with pytest.raises(ValueError, match="question"):
        BlendPromptBuilder(tok, delimiter=2, question_template="no placeholder")
    with pytest.raises(ValueError):
        BlendPromptBuilder(tok, delimiter=[])


def test_default_delimiter_lookup():
    assert default_delimiter(FakeTokenizer()) == Delimiter(chunk_end_token_id=3)
    assert BlendPromptBuilder(FakeTokenizer()).chunk_end_token_id == 3
    with pytest.raises(ValueError, match="No default chunk delimiter"):
        default_delimiter(FakeTokenizer(file_sep=False))
