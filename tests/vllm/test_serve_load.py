"""The serving load benchmark as a CI smoke test: ``benchmarks/serve_load.py --tiny``.

64 concurrent mixed requests (Blend text prompts at ratio 1.0 and 0.15, chat with the
separator in the message, plain prompts) through ``ucm-serve serve --enable-blend`` on
127.0.0.1, prefix caching off, after a reference server of vLLM alone: every request
answers 200, the server tokenizes each text prompt as the reference does, every ratio-1.0
request decodes what the full prefill decodes, chunks hit, and the server still serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_64_concurrent_mixed_requests_all_succeed_and_ratio_one_equals_full_prefill(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--tiny", "--workdir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout
    assert proc.returncode == 0, (text[-4000:], proc.stderr[-4000:])
    summary = json.loads(text[text.rindex("{\n \"requests\""):])
    assert summary["requests"] == summary["succeeded"] == 64
    assert all(summary["kinds"][k] > 0 for k in ("blend_r1", "blend", "chat", "plain")), summary["kinds"]
    assert summary["ratio_1_equal_to_full_prefill"] == summary["ratio_1_requests"] > 0
    assert summary["text_prompts_tokenized_as_reference"] == summary["text_prompts"] > 0
    assert summary["chunk_hit_tokens"] > 0 and summary["server_alive_after"]
