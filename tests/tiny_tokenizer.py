"""A real byte-level BPE tokenizer with a 512-token vocabulary, for the tiny test models.

The tiny models (tests/tiny_models.py) have no tokenizer, and text-prompt tests need one
that behaves like a production BPE: merges across word boundaries, spaces attached to
the next word, BOS added by ``encode``. Trained deterministically on a small built-in
corpus in well under a second; ids 0-2 are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS),
matching the tiny Llama config.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

WORDS = ("the river city bank holds old records of trade and law while north gate stands near "
         "a quiet market where people sell bread fish salt cloth and stone tools in early spring "
         "summer autumn winter seasons travellers ask questions about roads bridges towers kings "
         "queens ships harbours mountains valleys forests lakes islands rain wind snow light").split()


def passages(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` deterministic pseudo-English passages of ``words`` words each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(f"Passage {i}: {body}.")
    return out


def _corpus() -> list[str]:
    """Passages run on after a space, as in running text: the BPE learns ``" Passage"`` as
    one token, so a separator's trailing space merges with the next passage when the joined
    text is tokenized (the seam problem segment-wise tokenization solves)."""
    texts = passages(200, 60, seed=1)
    return [" ".join(texts[i:i + 4]) for i in range(0, len(texts), 4)] + [" # # ", "Question: Answer:", "\n\n"]


def build_tokenizer(path: Path) -> Path:
    """Train and save the tokenizer (``tokenizer.json`` + config) into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    return path


def with_tokenizer(model_dir: Path, root: Path) -> Path:
    """A copy of a tiny model folder (weights linked) with the tokenizer added."""
    out = Path(root) / (Path(model_dir).name + "-tok")
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        target = out / f.name
        if not target.exists():
            os.symlink(f, target) if f.suffix == ".safetensors" else shutil.copy(f, target)
    return build_tokenizer(out)
