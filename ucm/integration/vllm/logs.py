"""ucm's log lines printed the way vLLM prints its own, in every vLLM process.

vLLM configures only the ``vllm`` logger (a ``dictConfig`` giving it a stream
handler, its format and level, ``propagate=False``); a ``ucm`` logger nobody
configured falls through to the root logger, whose effective level is WARNING, so
ucm's INFO lines (the per-request "ucm request ... chunk hit N") never appear under
``vllm serve`` or ``LLM(...)``.

:func:`route_ucm_logs` makes the ``ucm`` logger a child of ``vllm`` by setting its
``parent``: ucm's records then take vLLM's level and handlers (format, timestamps,
process name and pid) as they are when each record is made, so a later
reconfiguration by vLLM in the same process is followed with no bookkeeping here.
The core library keeps plain ``logging.getLogger(__name__)``; only this adapter
knows about vLLM.

It changes nothing when vLLM itself leaves logging alone (``VLLM_CONFIGURE_LOGGING=0``
or ``LoggingConfig.configure_logging`` false), nor when the user configured ``ucm``
(handlers, a level or ``propagate=False`` on it, or a ``ucm`` logger in vLLM's
logging config file): a user's configuration wins.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

UCM = "ucm"
VLLM = "vllm"


def route_ucm_logs(logging_config: Optional[Any] = None) -> bool:
    """Send the ``ucm`` logger's records through vLLM's logging; True if it did.

    ``logging_config`` is vLLM's ``LoggingConfig`` (``vllm_config.logging_config``)
    when the caller has one; without it vLLM's environment variables decide, as they
    do for vLLM's own bootstrap logging. Safe to call repeatedly, in any process.
    """
    configure, config_file = _vllm_settings(logging_config)
    ucm = logging.getLogger(UCM)
    vllm = logging.getLogger(VLLM)
    if not configure:
        return False
    if ucm.parent is vllm:
        return True
    if _user_configured(ucm) or _file_names_ucm(config_file):
        return False
    ucm.parent = vllm
    ucm.setLevel(logging.NOTSET)  # unchanged, but clears the cached effective levels below ucm
    return True


def routed() -> bool:
    """Whether ucm's records currently go through vLLM's logger."""
    return logging.getLogger(UCM).parent is logging.getLogger(VLLM)


def _vllm_settings(logging_config: Optional[Any]) -> tuple[bool, Optional[str]]:
    configure = getattr(logging_config, "configure_logging", None)
    config_file = getattr(logging_config, "pylogging_config_file", None)
    if configure is None:
        import vllm.envs as envs

        configure = bool(envs.VLLM_CONFIGURE_LOGGING)
        config_file = envs.VLLM_LOGGING_CONFIG_PATH
    return bool(configure), config_file


def _user_configured(ucm: logging.Logger) -> bool:
    return bool(ucm.handlers) or ucm.level != logging.NOTSET or not ucm.propagate


def _file_names_ucm(path: Optional[str]) -> bool:
    """Whether vLLM's logging config file (a dictConfig JSON) configures ``ucm`` itself.

    Read here because vLLM may apply the file after this runs (the API server loads
    plugins before it configures logging); an unreadable file is vLLM's error to report.
    """
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            loggers = json.load(f).get("loggers", {})
    except (OSError, ValueError, AttributeError):
        return False
    return any(name == UCM or name.startswith(UCM + ".") for name in loggers)
