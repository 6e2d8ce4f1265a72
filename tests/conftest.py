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
