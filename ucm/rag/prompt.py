"""Build Blend prompts as token ids, so users never hand-assemble token lists.

A Blend prompt is ``prefix | chunk_1 ... chunk_n | suffix``. The chunk cache hits
only when a chunk's tokens are *identical* wherever it appears, so every part is
tokenized **separately** (tokenizing the joined text would let BPE merge across
a boundary and shift a chunk's tokens with its neighbours). Then:

* **BOS** appears once, at the very start, and only if the tokenizer would add
  one itself (or the chat template already starts with it). Chunks and the suffix
  never carry BOS, so a chunk's precompute request has the same tokens as the
  chunk inside a prompt.
* **Delimiter**, in the two modes of the Blend config (see
  :mod:`ucm.sparse.blend.chunking`): ``chunk_end_token_id`` ends every segment
  before the suffix, ``[BOS] sys END c1 END ... cN END question``, and a chunk's
  span includes its END; ``separator_token_ids`` goes *between* segments,
  ``sys SEP c1 SEP ... SEP question``, and belongs to no segment.
* **Chat format**: an instruct model answers well only inside its chat template.
  The template is rendered once with a placeholder user message and cut there:
  everything before the user content (system turn, ``<|im_start|>user\\n``) plus
  a short intro is the *prefix*; the question plus the rest of the template
  (``<|im_end|>\\n<|im_start|>assistant\\n``) is the *suffix*. The passages sit
  inside the user turn, between the two, as chunks.

Default delimiter for SmolLM2: ``<file_sep>`` (id 5) in END mode. It is one of
SmolLM2's 17 special tokens (ids 0-16): ids 1 and 2 (``<|im_start|>``,
``<|im_end|>``) are chat markup and occur in the prefix and suffix, so they cannot
mark chunk ends; ``<|endoftext|>`` (0) tells the model that an unrelated
document follows, inviting it to ignore earlier passages; the others are code
metadata (``<repo_name>``, ``<gh_stars>``, Jupyter cells). ``<file_sep>``
separated *related* files of one repository in pretraining, the closest
meaning to "next passage", and ordinary text never tokenizes to it.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union

from ucm.sparse.blend.chunking import Delimiter, split_prompt

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_END_TOKEN = "<file_sep>"
DEFAULT_CHUNK_END_TOKEN_ID = 5  # "<file_sep>" in the SmolLM2 vocabulary
# Tried in order by default_delimiter() on tokenizers other than SmolLM2's.
CHUNK_END_TOKEN_CANDIDATES = (
    "<file_sep>",  # SmolLM / StarCoder vocabularies
    "<|file_sep|>",  # Qwen2.5
    "<|reserved_special_token_0|>",  # Llama 3
)
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the passages. "
    "Reply with a short answer only, a few words."
)
DEFAULT_CONTEXT_INTRO = "Passages:\n"
DEFAULT_QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
_PLACEHOLDER = "@@UCM_USER_CONTENT@@"

DelimiterSpec = Union[int, Sequence[int], Delimiter, None]


class TokenizerLike(Protocol):
    """What the builder needs from a tokenizer (a HF tokenizer fits)."""

    bos_token_id: Optional[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class DelimiterInTextError(ValueError):
    """A prompt part tokenizes to the chunk delimiter, which would mis-split it."""


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt's token ids and where its parts lie (half-open token ranges).

    Spans follow :func:`ucm.sparse.blend.chunking.split_prompt`: in END mode the
    prefix and every chunk include their END token; in separator mode the
    separators (``separator_spans``) belong to no part. ``prefix_len`` is where the
    prefix ends.
    """

    token_ids: list[int]
    prefix_len: int
    chunk_spans: list[tuple[int, int]]
    suffix_span: tuple[int, int]
    separator_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_chunk_tokens(self) -> int:
        """Tokens inside chunks: what Blend can reuse from the chunk cache."""
        return sum(end - start for start, end in self.chunk_spans)


def _to_delimiter(spec: DelimiterSpec, tokenizer: Any) -> Delimiter:
    """Normalise the user's delimiter argument to a chunking.Delimiter."""
    if spec is None:
        return default_delimiter(tokenizer)
    if isinstance(spec, Delimiter):
        return spec
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return Delimiter(chunk_end_token_id=int(spec))
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise TypeError(f"delimiter must be a token id, a list of token ids or a Delimiter, got {spec!r}")
    return Delimiter(separator_token_ids=tuple(int(t) for t in spec))


def default_delimiter(tokenizer: Any) -> Delimiter:
    """END-token mode with the first of :data:`CHUNK_END_TOKEN_CANDIDATES` in the vocab.

    Raises ValueError if none is a real (non-unknown) token: pass one explicitly.
    """
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    unk_token = getattr(tokenizer, "unk_token", None)
    if convert is not None:
        for name in CHUNK_END_TOKEN_CANDIDATES:
            token_id = convert(name)
            if isinstance(token_id, int) and (token_id != unk or name == unk_token):
                return Delimiter(chunk_end_token_id=token_id)
    raise ValueError(
        "No default chunk delimiter for this tokenizer: pass delimiter=<token id> (a special "
        "token that never occurs in text) or delimiter=[ids...] (a separator sequence)"
    )


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``encode(text)`` prepends BOS, found by asking the tokenizer."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    without = list(tokenizer.encode("a", add_special_tokens=False))
    return len(with_special) > len(without) and with_special[0] == bos


class BlendPromptBuilder:
    """Turns (chunk texts, question) into Blend-ready token ids and spans.

    ``delimiter``: a token id (END mode), a list of ids (separator mode), a
    :class:`~ucm.sparse.blend.chunking.Delimiter`, or ``None`` for
    :func:`default_delimiter`. ``use_chat_template``: ``None`` = use it when the
    tokenizer has one. Use :meth:`sparse_config_delimiter` for the matching keys of
    the Blend config so the builder and the connector can never disagree.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        delimiter: DelimiterSpec = None,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        context_intro: str = DEFAULT_CONTEXT_INTRO,
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
        use_chat_template: Optional[bool] = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.delimiter = _to_delimiter(delimiter, tokenizer)
        self.question_template = question_template
        if "{question}" not in question_template:
            raise ValueError("question_template must contain '{question}'")
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template
        self._prefix_text, self._suffix_tail = self._frame(system_prompt, context_intro)
        self._bos_id = getattr(tokenizer, "bos_token_id", None) if _tokenizer_adds_bos(tokenizer) else None
        prefix = self._encode(self._prefix_text)
        if self._bos_id is not None and (not prefix or prefix[0] != self._bos_id):
            prefix = [self._bos_id] + prefix
        self._check_segment(prefix, "the system prompt / prefix")
        self._prefix_ids = prefix

    # ----------------------------------------------------------------- framing
    def _frame(self, system_prompt: str, context_intro: str) -> tuple[str, str]:
        """Text before the chunks and the template tail after the question."""
        if not self.use_chat_template:
            head = f"{system_prompt}\n\n" if system_prompt else ""
            return head + context_intro, ""
        messages = [{"role": "user", "content": _PLACEHOLDER}]
        try:
            rendered = self._render([{"role": "system", "content": system_prompt}] + messages)
        except Exception as exc:  # e.g. templates that refuse a system role
            logger.info("Chat template rejected a system message (%s); folding it into the user turn", exc)
            rendered = self._render(messages)
            context_intro = f"{system_prompt}\n\n{context_intro}" if system_prompt else context_intro
        if rendered.count(_PLACEHOLDER) != 1:
            raise ValueError("Chat template did not render the user message exactly once")
        head, tail = rendered.split(_PLACEHOLDER)
        return head + context_intro, tail

    def _render(self, messages: list[dict[str, str]]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    # ------------------------------------------------------------ tokenization
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _token_name(self, token_id: int) -> str:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        return repr(convert(token_id)) if convert is not None else str(token_id)

    def _check_segment(self, ids: Sequence[int], where: str) -> None:
        """Raise if the delimiter occurs inside one part of the prompt."""
        end = self.delimiter.chunk_end_token_id
        if end is not None:
            if end in ids:
                raise DelimiterInTextError(
                    f"{where} contains the chunk delimiter token {end} ({self._token_name(end)}) "
                    f"at token offset {list(ids).index(end)}; remove it from the text or pick another delimiter"
                )
            return
        sep = list(self.delimiter.separator_token_ids or ())
        for i in range(len(ids) - len(sep) + 1):
            if list(ids[i:i + len(sep)]) == sep:
                raise DelimiterInTextError(
                    f"{where} contains the separator token sequence {sep} at token offset {i}; "
                    "remove it from the text or pick another delimiter"
                )

    @property
    def chunk_end_token_id(self) -> Optional[int]:
        return self.delimiter.chunk_end_token_id

    @property
    def separator_token_ids(self) -> Optional[list[int]]:
        sep = self.delimiter.separator_token_ids
        return list(sep) if sep is not None else None

    def sparse_config_delimiter(self) -> dict[str, Any]:
        """The delimiter as Blend config keys, e.g. ``{"chunk_end_token_id": 5}``."""
        if self.delimiter.chunk_end_token_id is not None:
            return {"chunk_end_token_id": self.delimiter.chunk_end_token_id}
        return {"separator_token_ids": list(self.delimiter.separator_token_ids or ())}

    def prefix_token_ids(self) -> list[int]:
        """[BOS] + system/template head + intro, without the delimiter."""
        return list(self._prefix_ids)

    def chunk_text_ids(self, chunk_text: str) -> list[int]:
        """A chunk's own tokens, checked for the delimiter, without it."""
        ids = self._encode(chunk_text)
        if not ids:
            raise ValueError("A chunk must not be empty")
        self._check_segment(ids, f"chunk {chunk_text[:40]!r}...")
        return ids

    def chunk_token_ids(self, chunk_text: str) -> list[int]:
        """Exactly the tokens a precompute request for this chunk should send.

        END mode: chunk tokens + END, i.e. the chunk's span in any prompt, so the
        cached KV covers the END token too. Separator mode: the chunk tokens alone
        (separators are never cached). Sent as a prompt of its own, these tokens
        sit at positions 0..L-1 and get exactly the chunk-hash keys that Blend
        looks up.
        """
        ids = self.chunk_text_ids(chunk_text)
        if self.delimiter.chunk_end_token_id is not None:
            ids.append(self.delimiter.chunk_end_token_id)
        return ids

    def suffix_token_ids(self, question: str) -> list[int]:
        """Question (through ``question_template``) + chat-template tail."""
        text = self.question_template.format(question=question.strip()) + self._suffix_tail
        ids = self._encode(text)
        self._check_segment(ids, "the question / suffix")
        return ids

    # ------------------------------------------------------------------ build
    def build(self, chunks: Sequence[str], question: str) -> BuiltPrompt:
        """Assemble prefix, chunks (in the given order) and question.

        The result is checked against :func:`split_prompt`, the splitter the
        connector runs, so a prompt the connector would cut differently (e.g. a
        separator formed across a part boundary) is refused here, not mis-served.
        """
        return self._assemble(chunks, self.suffix_token_ids(question))

    def precompute_prompt(self, chunk_text: str) -> BuiltPrompt:
        """A precompute request that computes one chunk *behind the prompt prefix*.

        Prefix + the chunk (+ the closing separator in separator mode), no question.
        The connector finds the chunk with the same splitter as in a RAG prompt and
        stores its KV under the chunk keys (``save_chunks``), re-rotated to start at 0.
        Why not the chunk alone at position 0: the first token of a sequence becomes an
        attention sink (outsized keys, little value) in most models, and a chunk
        computed from position 0 carries a sink wherever it is reused; behind the
        prefix, the prefix holds the sink, as it does in every real prompt.
        """
        return self._assemble([chunk_text], [])

    def _assemble(self, chunks: Sequence[str], suffix_ids: Sequence[int]) -> BuiltPrompt:
        end = self.delimiter.chunk_end_token_id
        sep = list(self.delimiter.separator_token_ids or ())
        ids: list[int] = list(self._prefix_ids)
        if end is not None:
            ids.append(end)
        prefix_len = len(ids) if end is not None else len(self._prefix_ids)
        chunk_spans: list[tuple[int, int]] = []
        separator_spans: list[tuple[int, int]] = []
        for text in chunks:
            if sep:
                separator_spans.append((len(ids), len(ids) + len(sep)))
                ids.extend(sep)
            start = len(ids)
            ids.extend(self.chunk_token_ids(text))
            chunk_spans.append((start, len(ids)))
        if sep:
            separator_spans.append((len(ids), len(ids) + len(sep)))
            ids.extend(sep)
        suffix_start = len(ids)
        ids.extend(suffix_ids)
        built = BuiltPrompt(
            token_ids=ids,
            prefix_len=prefix_len,
            chunk_spans=chunk_spans,
            suffix_span=(suffix_start, len(ids)),
            separator_spans=separator_spans,
        )
        self._verify(built)
        return built

    def _verify(self, built: BuiltPrompt) -> None:
        """Refuse a prompt the connector's splitter would cut differently."""
        split = split_prompt(built.token_ids, self.delimiter)
        got_chunks = [(s.start, s.end) for s in split.chunks]
        if (
            split.prefix.end != built.prefix_len
            or got_chunks != built.chunk_spans
            or (split.suffix.start, split.suffix.end) != built.suffix_span
        ):
            raise DelimiterInTextError(
                "The delimiter occurs across a part boundary: the connector would split this "
                f"prompt into {len(got_chunks)} chunks instead of {len(built.chunk_spans)}; "
                "pick another delimiter"
            )
