"""Tiny random models of each supported architecture, saved as HF folders for vLLM.

float32, head_dim 32 (a CPU_ATTN kernel size), 4 layers, GQA 4:2, a vocabulary of
512. Built deterministically from a seed and cached per session.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
UNSUPPORTED_ARCHS = ("phi", "gpt2")  # architectures Blend refuses (tests of the start-time refusal)


def _config(arch: str):
    import transformers

    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if arch == "llama_h64":  # head_dim 64 (the GPU checks: the kernels' usual head size)
        wide = dict(common, hidden_size=256, intermediate_size=512, head_dim=64)
        return transformers.LlamaConfig(**wide), transformers.LlamaForCausalLM
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    if arch == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **common), transformers.Qwen2ForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config(use_sliding_window=False, **common), transformers.Qwen3ForCausalLM
    small = dict(vocab_size=512, num_hidden_layers=2, max_position_embeddings=4096, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False)
    if arch == "phi":
        return (transformers.PhiConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, **small),
                transformers.PhiForCausalLM)
    if arch == "gpt2":
        small = dict(small, n_layer=small.pop("num_hidden_layers"), n_positions=small.pop("max_position_embeddings"))
        return transformers.GPT2Config(n_embd=128, n_head=4, **small), transformers.GPT2LMHeadModel
    raise ValueError(f"unknown arch {arch}; known: {ARCHS + UNSUPPORTED_ARCHS}")


def build_tiny_model(arch: str, root: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model under ``root/arch`` (once) and return the folder."""
    path = Path(root) / arch
    if (path / "config.json").exists():
        return path
    config, cls = _config(arch)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    with torch.no_grad():
        # HF's std-0.02 init gives near-uniform attention; larger weights make the
        # attention pattern (and so Blend's deviations) position-dependent.
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path
