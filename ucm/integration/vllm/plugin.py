"""vLLM general-plugin entry point (``vllm.general_plugins`` in setup.py).

vLLM calls :func:`register` in every engine process (front end, engine core,
workers). With ENABLE_SPARSE on it applies ucm's patches there; otherwise it does
nothing, so installing ucm changes nothing for a vLLM that does not ask for it.
"""

from __future__ import annotations

import logging

from ucm.config import sparse_enabled

logger = logging.getLogger(__name__)


def register() -> None:
    if not sparse_enabled():
        return
    from ucm.integration.vllm.patches import apply_patches

    apply_patches()
