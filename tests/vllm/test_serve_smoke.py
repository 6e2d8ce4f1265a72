"""Smoke test: a real OpenAI-compatible server (ucm-serve serve) with the Blend connector.

One server on 127.0.0.1 (tiny float32 Llama, token-id prompts, vLLM's prefix cache
left on as serve has it). Requests: a RAG prompt, the same prompt again (vLLM's
prefix cache serves it), then the same chunks in another order: ucm must report
chunk hits for that last one. Chunk hits are read from ucm's per-request log line,
which reaches the server's output through vLLM's logging (ucm/integration/vllm/logs.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tests.vllm.conftest import END, ROOT, Rag

RAG = Rag(seed=0)
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
UCM_LINE = re.compile(r"\) INFO .*\[connector\.py:\d+\] ucm request (?P<req>\S+): (?P<tokens>\d+) tokens, "
                      r"prefix hit (?P<prefix>\d+), chunk hit (?P<chunk>\d+)$", re.M)


def default_store(tmp: Path) -> Optional[list[dict[str, Any]]]:
    """No ``ucm_connectors``: the default host-memory store, which lives in the worker's
    process while the scheduler runs in the engine core's: the worker reports its keys."""
    return None


def file_store(tmp: Path) -> Optional[list[dict[str, Any]]]:
    return [{"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(tmp / "store")}}]


STORE: Callable[[Path], Optional[list[dict[str, Any]]]] = default_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_transfer_config(stores: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
    blend = {"chunk_end_token_id": END, "compute_meta": {"model.layers.1.self_attn.attn": {"ratio": 0.5}}}
    extra: dict[str, Any] = {"ucm_sparse_config": {"Blend": blend}}
    if stores is not None:
        extra["ucm_connectors"] = stores
    return {"kv_connector": "UCMBlendConnector", "kv_connector_module_path": "ucm.integration.vllm.blend_connector",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}


class Server:
    """``ucm-serve serve`` in its own session; output to a file (a pipe could fill and block it).

    ``kv_config``: None for ucm's default test config, a dict, or False for vLLM alone."""

    def __init__(self, model: Path, stores: Optional[list[dict[str, Any]]], log: Path,
                 kv_config: "Optional[dict[str, Any]] | bool" = None, tokenizer: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        self.port, self.log = free_port(), log
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VLLM_LOGGING", "VLLM_CONFIGURE_LOGGING")) and k != "TRITON_INTERPRET"}
        env.update(ENABLE_SPARSE="1", NO_COLOR="1", VLLM_CPU_KVCACHE_SPACE="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "ucm.integration.vllm.serve_cli", "serve", str(model),
               "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", "--dtype", "float32",
               *(() if tokenizer else ("--skip-tokenizer-init",)), "--max-model-len", "4096",
               "--max-num-batched-tokens", "4096", "--seed", "0",
               *(() if kv_config is False else ("--kv-transfer-config",
                                                 json.dumps(kv_config or kv_transfer_config(stores)))),
               *extra_args]
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.output()[-6000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise AssertionError(f"server not healthy after {START_TIMEOUT_S}s:\n{self.output()[-6000:]}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=REQUEST_TIMEOUT_S) as r:
            return r.read().decode()

    def complete(self, model: Path, ids: list[int]) -> dict[str, Any]:
        body = {"model": str(model), "prompt": ids, "max_tokens": 4, "temperature": 0.0, "return_token_ids": True}
        req = urllib.request.Request(self.base + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST JSON; (status, parsed body), for error statuses too."""
        req = urllib.request.Request(self.base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, {"raw": text}

    def ucm_line(self, response_id: str) -> Optional[re.Match]:
        """ucm's line for a request (the engine's id is the response's id plus suffixes); waits a little."""
        deadline = time.monotonic() + 30
        while True:
            found = [m for m in UCM_LINE.finditer(self.output()) if m["req"].startswith(response_id + "-")]
            if found or time.monotonic() > deadline:
                return found[-1] if found else None
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started: server and engines
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self._out.close()


def prefix_cache_hits(metrics: str) -> float:
    found = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", metrics, re.M)
    assert found, "vllm:prefix_cache_hits_total missing from /metrics"
    return float(found.group(1))


def ucm_counter(metrics: str, name: str) -> float:
    """Sum of a ucm counter over its label sets in a /metrics scrape (0 if absent)."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", metrics, re.M))


def scrape_until(server: "Server", done: Callable[[str], bool], timeout_s: float = 15) -> str:
    """/metrics once ``done`` holds (the front end records a step's stats as it handles its
    outputs, which may trail the HTTP response a little), or the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = server.get("/metrics")
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_serve_with_blend_reuses_chunks_in_another_order(tiny_models, tmp_path):
    model = tiny_models["llama"]
    first, reordered = RAG.prompt([0, 1, 2], 0), RAG.prompt([2, 0, 1], 0)
    server = Server(model, STORE(tmp_path), tmp_path / "server.log")
    try:
        server.wait_healthy()
        a = server.complete(model, first)
        hits_before = prefix_cache_hits(server.get("/metrics"))
        again = server.complete(model, first)
        hits_after = prefix_cache_hits(server.get("/metrics"))
        b = server.complete(model, reordered)

        tokens = [r["choices"][0]["token_ids"] for r in (a, again, b)]
        assert all(len(t) == 4 for t in tokens), tokens
        assert tokens[1] == tokens[0]  # the prefix-cached repeat decodes the same
        assert hits_after > hits_before  # vLLM's prefix cache served the repeat

        line_a, line_b = server.ucm_line(a["id"]), server.ucm_line(b["id"])
        assert line_a is not None and line_b is not None, server.output()[-6000:]
        assert int(line_a["tokens"]) == len(first) and int(line_a["chunk"]) == 0
        assert int(line_b["tokens"]) == len(reordered)
        assert int(line_b["chunk"]) > 0, line_b.group(0)

        # ucm's counters in vLLM's /metrics, through the KV-connector stats path.
        metrics = scrape_until(server, lambda m: ucm_counter(m, "ucm_requests_total") >= 3)
        assert ucm_counter(metrics, "ucm_requests_total") == 3, metrics
        assert ucm_counter(metrics, "ucm_prompt_tokens_total") == 2 * len(first) + len(reordered)
        assert ucm_counter(metrics, "ucm_chunk_hit_tokens_total") == int(line_b["chunk"])
        assert ucm_counter(metrics, "ucm_chunk_tokens_total") > 0
        assert ucm_counter(metrics, "ucm_save_bytes_total") > 0  # the first request's blocks (worker's process)
        assert ucm_counter(metrics, "ucm_save_seconds_total") > 0
    finally:
        server.stop()
    assert server.proc.returncode is not None
