"""Session-wide test setup.

Triton kernels (delta-RoPE, the load kernel, paged attention) are tested on this
CPU-only machine through Triton's interpreter. The interpreter must be chosen before
``triton`` is first imported: triton.language's own helpers (``tl.max``, ``tl.sum``)
are decorated at import time, and a kernel interpreted later could not call them.
Engine subprocesses get the variable removed again (tests/vllm/conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

# The example's scoring and report helpers (examples/rag_eval/) are not part of the
# installed library; their tests import them from the examples folder.
sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "examples"))


import pytest  # noqa: E402  (after TRITON_INTERPRET, which must be set first)
from pathlib import Path  # noqa: E402

# Test modules that start vLLM engines, servers or model conversions in subprocesses: the
# full suite (.ci/run) runs them; the fast lane (`pytest -m "not slow"`) leaves them out.
SLOW_MODULES = {"test_example.py", "test_precompute.py", "test_precompute_file_store.py", "test_serve_cli.py"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts vLLM engines, servers or model conversions (full suite only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(tests)
        if rel.parts[0] == "vllm" or rel.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
