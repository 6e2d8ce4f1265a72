"""Per-request ucm arguments checked where vLLM admits a request, so a bad one gets a 400.

``SamplingParams.extra_args["ucm_blend_ratio"]`` (the completions API's ``vllm_xargs``)
reaches ucm only in the scheduler, which cannot fail a request: there a bad value is
logged and the configured ratios apply (:func:`ucm.engine.scheduler_side.request_ratio`).
vLLM validates every request's parameters in the API server first
(``InputProcessor._validate_params``; a ``ValueError`` there is the client's error, a
400 with its message), so the same rule is applied there (patch 6) and the caller
learns that the ratio was not used instead of getting a silently different answer.
"""

from __future__ import annotations

from typing import Any, Optional

from ucm.engine.scheduler_side import RATIO_ARG, ratio_error

try:  # 0.32 and 0.26: a 400 on both (0.32 turns a bare ValueError at admission into a 500)
    from vllm.exceptions import VLLMValidationError as _RequestError
except ImportError:  # a vLLM without it: a ValueError at admission is its 400
    _RequestError = None


def check_request_params(params: Any) -> None:
    """Raise what vLLM answers with a 400 (``VLLMValidationError``, else ValueError)
    for a request whose ucm arguments cannot be used."""
    extra_args = getattr(params, "extra_args", None)
    error = ratio_error(extra_args)
    if error is None:
        return
    if _RequestError is not None:
        raise _RequestError(error, parameter=RATIO_ARG, value=extra_args[RATIO_ARG])
    raise ValueError(error)
