"""ucm's per-request log line shows in an engine's output, in vLLM's own format.

The user configures no logging: the line must come through vLLM's configuration
(ucm/integration/vllm/logs.py), with vLLM's process name, pid, level, timestamp
and [file:line] prefix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.vllm.conftest import ROOT, Rag, blend_config

RAG = Rag(seed=0)
# vLLM 0.32's text format: "(<process> pid=<pid>) INFO <mm-dd> <HH:MM:SS> [<file>:<line>] <message>"
PREFIX = r"\((?P<proc>[^)]*) pid=(?P<pid>\d+)\) (?P<level>[A-Z]+) \d\d-\d\d \d\d:\d\d:\d\d \[(?P<file>[^\]:]+):\d+\] "
UCM_LINE = re.compile(PREFIX + r"ucm request (?P<req>\S+): (?P<tokens>\d+) tokens, prefix hit (?P<prefix>\d+), "
                      r"chunk hit (?P<chunk>\d+)$", re.M)
VLLM_LINE = re.compile(PREFIX, re.M)


def _engine_output(spec: dict, workdir) -> str:
    """Run tests/engine_runner.py in a fresh process and return its stdout and stderr."""
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_LOGGING", "VLLM_CONFIGURE_LOGGING")) and k != "TRITON_INTERPRET"}
    env.update(ENABLE_SPARSE="1", NO_COLOR="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.engine_runner", str(spec_path), str(out_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_the_request_line_is_printed_in_vllms_format(tiny_models, tmp_path):
    first, second = RAG.prompt([0, 1, 2], 0), RAG.prompt([2, 0, 1], 0)
    spec = {"model": str(tiny_models["llama"]), "ucm": blend_config(ratio=0.5), "actions": [
        {"op": "generate", "prompts": [{"ids": first}]}, {"op": "generate", "prompts": [{"ids": second}]}]}
    output = _engine_output(spec, tmp_path)

    lines = list(UCM_LINE.finditer(output))
    assert len(lines) == 2, output[-4000:]
    assert [int(m["tokens"]) for m in lines] == [len(first), len(second)]
    assert int(lines[0]["chunk"]) == 0 and int(lines[1]["chunk"]) > 0
    assert {(m["level"], m["file"]) for m in lines} == {("INFO", "connector.py")}
    vllm_pids = {m["pid"] for m in VLLM_LINE.finditer(output) if m["file"] != "connector.py"}
    assert {m["pid"] for m in lines} <= vllm_pids  # same process prefix as vLLM's own lines
