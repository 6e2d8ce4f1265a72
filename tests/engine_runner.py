"""Run one vLLM engine through a scripted scenario in a fresh process.

Tests need several engines (with and without ucm, different ratios, two engines on
one store). vLLM holds process-wide state, so each engine runs here, in its own
process: ``python -m tests.engine_runner spec.json out.json``. The spec lists
actions; the output holds, per action, each request's tokens, logprobs and ucm
stats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_process(spec: dict, workdir: Path, enable_sparse: bool = True,
                   timeout: int = 600) -> tuple[int, dict, str]:
    """Run ``spec`` in a fresh ``python -m tests.engine_runner`` process (the tests' and the
    GPU checks' one way to start an engine): (return code, its output, its stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.pop("ENABLE_SPARSE", None)
    env.pop("TRITON_INTERPRET", None)  # set for the in-process kernel tests (tests/conftest.py) only
    if enable_sparse:
        env["ENABLE_SPARSE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.engine_runner", str(spec_path), str(out_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = json.loads(out_path.read_text()) if proc.returncode == 0 else {}
    return proc.returncode, out, proc.stderr


def _stats(out) -> dict:
    """ucm's record of a request: the in-process registry (scheduler and worker parts) or,
    with vLLM's multiprocess engine, the scheduler's part that comes back with the output."""
    from ucm.engine.stats import request_stats

    return request_stats(out.request_id) or dict((out.kv_transfer_params or {}).get("ucm_stats", {}))


def _generate(llm, action: dict) -> list[dict]:
    from vllm import SamplingParams

    from ucm.engine.stats import request_stats

    prompts, params = [], []
    for item in action["prompts"]:
        prompt = {"prompt_token_ids": item["ids"]}
        if item.get("salt"):
            prompt["cache_salt"] = item["salt"]
        prompts.append(prompt)
        extra = {"ucm_blend_ratio": item["ratio"]} if "ratio" in item else {}
        extra.update(item.get("extra_args", {}))  # other per-request ucm arguments (ucm_epic_tokens, ...)
        params.append(SamplingParams(max_tokens=action.get("max_tokens", 4), temperature=0.0,
                                     logprobs=action.get("logprobs", 1), ignore_eos=True, extra_args=extra or None))
    results = []
    outputs = llm.generate(prompts, params, use_tqdm=False) if action.get("batch", True) else [
        llm.generate([p], [sp], use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    for out in outputs:
        completion = out.outputs[0]
        top = [{str(k): v.logprob for k, v in step.items()} for step in completion.logprobs]
        results.append({"tokens": list(completion.token_ids),
                        "logprobs": [step[str(t)] for step, t in zip(top, completion.token_ids)],
                        "top": top, "stats": _stats(out),
                        "finish_reason": completion.finish_reason})
    return results


def _corrupt(action: dict) -> list[dict]:
    """Damage store files: 'truncate' or 'flip' a byte in each file under a directory."""
    changed = []
    for dirpath, _, names in os.walk(action["dir"]):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                if action["how"] == "truncate":
                    f.seek(0)
                    f.truncate(len(data) // 2)
                else:
                    data[-5] ^= 0xFF
                    f.seek(0)
                    f.write(data)
            changed.append(path)
    return [{"changed": len(changed)}]


def _inject_fault(target: str, fail_on_call: int) -> None:
    """Make ``pkg.module:Class.attr`` (a function or method) raise on its Nth call
    (1-based) in this process, where the worker runs: a fault injected into ucm."""
    import importlib

    module, path = target.split(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_on_call:
            raise RuntimeError(f"injected fault in {target} (call {calls[0]})")
        return original(*args, **kwargs)

    setattr(owner, name, faulty)


def _build(spec: dict):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    engine = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=4096,
                  max_num_batched_tokens=4096, seed=0)
    engine.update(spec.get("engine", {}))
    if spec.get("ucm") is not None:
        engine["kv_transfer_config"] = KVTransferConfig(
            kv_connector=spec.get("connector", "UCMBlendConnector"),
            kv_connector_module_path=spec.get("module", "ucm.integration.vllm.blend_connector"),
            kv_role="kv_both", kv_connector_extra_config=spec["ucm"])
    return LLM(spec["model"], **engine)


def _start_error(attempt: dict) -> dict:
    """Build an engine that should be refused at start; the error text (causes included),
    or ``started`` when ``LLM(...)`` returned."""
    saved = {key: os.environ.get(key) for key in attempt.get("env", {})}
    os.environ.update(attempt.get("env", {}))
    try:
        llm = _build(attempt)
    except Exception as exc:  # noqa: BLE001 - the refusal under test
        chain, seen = [], exc
        while seen is not None and len(chain) < 8:
            chain.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        return {"error": " <- ".join(chain)}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    del llm
    return {"started": True}


def run(spec: dict) -> dict:
    for key, value in spec.get("env", {}).items():
        os.environ[key] = value
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for fault in spec.get("faults", []):
        _inject_fault(fault["target"], fault["fail_on_call"])
    if "start_errors" in spec:  # engines that must be refused at start, one after another
        return {"start_errors": [_start_error(attempt) for attempt in spec["start_errors"]]}
    llm = _build(spec)
    out: dict = {}
    for i, action in enumerate(spec["actions"]):
        name = action.get("name", str(i))
        if action["op"] == "generate":
            out[name] = _generate(llm, action)
        elif action["op"] == "corrupt":
            out[name] = _corrupt(action)
        elif action["op"] == "patched":
            from vllm.model_executor.layers.attention.attention import Attention

            out[name] = [{"patched": bool(getattr(Attention.forward, "_ucm_patched", False))}]
        elif action["op"] == "eager_kernels":
            from ucm.integration.vllm.eager_kernels import summary

            out[name] = [summary()]
        elif action["op"] == "totals":
            from ucm.engine.stats import totals

            out[name] = [totals()]
        else:
            raise ValueError(f"unknown action {action['op']}")
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
