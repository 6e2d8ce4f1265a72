"""vLLM general-plugin entry point (``vllm.general_plugins`` in setup.py).

vLLM calls :func:`register` in every engine process (front end, engine core,
workers). With ENABLE_SPARSE on it applies ucm's patches there; otherwise it does
nothing, so installing ucm changes nothing for a vLLM that does not ask for it.
With it on, ucm's log lines are also routed through vLLM's logging here
(:mod:`ucm.integration.vllm.logs`), so every engine process prints them.
"""

from __future__ import annotations

import logging

from ucm.config import sparse_enabled

logger = logging.getLogger(__name__)


def register() -> None:
    if not sparse_enabled():
        return
    from ucm.integration.vllm.logs import route_ucm_logs
    from ucm.integration.vllm.patches import apply_patches

    route_ucm_logs()
    apply_patches()
