"""One implementation switch read from the environment: ``auto``, ``torch``, ``triton``...

ucm has several places that may run a Triton kernel or a plain-torch path
(``UCM_ROPE_KERNEL``, ``UCM_LOAD_KERNEL``, ``UCM_BLEND_ATTENTION``). Each needs the same
four things, which used to be written once per place and disagreed on a bad value:

* read the variable and refuse anything but its allowed values, naming the variable,
  the value and what is allowed (:meth:`KernelChoice.mode`);
* import the kernel module lazily, so the torch path works without Triton, and only
  once (:meth:`KernelChoice.module`);
* under ``auto``, give the kernel up for the process on its first failure, with one
  warning, and run the fallback from then on (:meth:`KernelChoice.give_up`);
* at engine start, refuse a bad value, and a forced kernel that cannot run on this
  device, before any request (:meth:`KernelChoice.check`).

The value is validated once per distinct setting: a process that never changes the
variable pays one dict lookup per call, and tests and benchmarks may still switch it.
No vLLM import; the kernel modules are imported only by name, on first use.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Optional

from ucm.config_checks import UcmConfigError

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def triton_unavailable(device_type: str, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """Why a Triton kernel cannot run on ``device_type`` in this process, or None.

    Off CUDA, Triton runs only as its interpreter (``TRITON_INTERPRET=1``, how the tests
    run the kernels on CPU). Imports Triton: call it only where a kernel is forced.
    """
    if device_type != "cuda" and env.get("TRITON_INTERPRET", "0").strip().lower() not in _TRUE:
        return f"the device is {device_type} and TRITON_INTERPRET is not set (Triton runs on CUDA only)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing, or a Triton that fails to initialise
        return f"Triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


class KernelChoice:
    """The setting of one environment switch and the state of the kernel behind it.

    ``choices``: the allowed values, the first being the default (unset or empty).
    ``kernel``: the value that forces the Triton kernel (a start error where it cannot
    run). ``module_name``: the kernel module, imported on first use. ``label``/``fallback``: what
    the warnings call the kernel and what runs instead.
    """

    def __init__(self, env: str, choices: tuple[str, ...], *, kernel: str = "triton",
                 module_name: Optional[str] = None, label: str = "Triton kernel",
                 fallback: str = "the torch path") -> None:
        self.env = env
        self.choices = choices
        self.kernel = kernel
        self.label = label
        self.fallback = fallback
        self.module_name = module_name
        self._raw: Optional[str] = None
        self._mode = choices[0]
        self._module: Any = None
        self._loaded = False
        self._broken: Optional[str] = None
        self._lock = threading.Lock()

    # ---- the setting -----------------------------------------------------------------
    def parse(self, raw: Optional[str]) -> str:
        """``raw`` as one of :attr:`choices` (case and spaces ignored); refuses anything else."""
        value = (raw or "").strip().lower() or self.choices[0]
        if value not in self.choices:
            raise UcmConfigError(self.env, f"must be one of {', '.join(self.choices)}, got {raw!r}")
        return value

    def mode(self, env: Mapping[str, str] = os.environ) -> str:
        """The current setting, validated once per distinct raw value."""
        raw = env.get(self.env, "")
        if raw != self._raw:
            self._mode = self.parse(raw)
            self._raw = raw
        return self._mode

    def forced(self) -> bool:
        """Whether the kernel is insisted on (its failures are errors, not fallbacks)."""
        return self.mode() == self.kernel

    def check(self, device_type: str, env: Mapping[str, str] = os.environ) -> None:
        """Start-time check: a bad value, or a forced kernel that cannot run on
        ``device_type``, raises :class:`UcmConfigError` naming the variable."""
        value = self.parse(env.get(self.env, ""))
        if value != self.kernel:
            return
        reason = triton_unavailable(device_type, env)
        if reason is not None:
            allowed = ", ".join(c for c in self.choices if c != self.kernel)
            raise UcmConfigError(self.env, f"{value!r} asks for the {self.label}, which cannot run here: "
                                 f"{reason}; use one of {allowed}, or set TRITON_INTERPRET=1 on CPU")

    # ---- the kernel module -------------------------------------------------------------
    def module(self) -> Any:
        """The kernel module, imported on first use; None when it cannot be imported
        (one warning: the fallback runs instead)."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._module = self._import()
                    self._loaded = True
        return self._module

    def _import(self) -> Any:
        if self.module_name is None:
            return None
        try:
            return importlib.import_module(self.module_name)
        except Exception as exc:  # noqa: BLE001 - no Triton, or one that fails to initialise
            logger.warning("ucm: %s unavailable (%s: %s); using %s", self.label, type(exc).__name__, exc,
                           self.fallback)
            return None

    # ---- giving up -------------------------------------------------------------------------
    @property
    def broken(self) -> Optional[str]:
        """Why the kernel was given up in this process, or None."""
        return self._broken

    def give_up(self, exc: BaseException) -> None:
        """Give the kernel up for the process after ``exc`` (one warning)."""
        if self._broken is not None:
            return
        self._broken = f"{type(exc).__name__}: {exc}"
        logger.warning("ucm: the %s failed (%s); using %s from now on", self.label, self._broken[:500],
                       self.fallback)

    def reset(self) -> None:
        """Forget a give-up (tests that break the kernel on purpose)."""
        self._broken = None
