"""Loud refusals: unsupported vLLM versions, wrong connector configs, house rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_integration_imports_vllm():
    offenders = []
    for path in (ROOT / "ucm").rglob("*.py"):
        if "integration" in path.relative_to(ROOT / "ucm").parts:
            continue
        if re.search(r"^\s*(import vllm|from vllm)", path.read_text(), re.MULTILINE):
            offenders.append(str(path))
    assert offenders == []


#: Command-line front ends: their usage text and one result line on stdout are what a
#: shell user and a script read; they print only inside ``main`` and log everything else.
CLI_MODULES = {"__main__.py", "integration/vllm/precompute_cli.py"}


def test_library_code_never_prints():
    offenders = []
    for path in (ROOT / "ucm").rglob("*.py"):
        text = path.read_text()
        if path.relative_to(ROOT / "ucm").as_posix() in CLI_MODULES:
            main = text.find("\ndef main(")
            text = text[:main] if main >= 0 else text  # prints are allowed in main() only (the last function)
        if re.search(r"^\s*print\(", text, re.MULTILINE):
            offenders.append(str(path))
    assert offenders == []


def test_unsupported_vllm_version_is_refused():
    from ucm.integration.vllm.patches import check_vllm_version

    assert check_vllm_version("0.32.0").endswith("attention")
    assert check_vllm_version("0.26.0")
    with pytest.raises(RuntimeError, match="found vLLM 0.27.1"):
        check_vllm_version("0.27.1")


def test_plugin_does_nothing_without_enable_sparse():
    code = ("import ucm.integration.vllm.plugin as p, ucm.integration.vllm.patches as q;"
            "p.register(); print(q.patches_applied())")
    env = {"PATH": "", "ENABLE_SPARSE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().endswith("False")


def test_plugin_patches_with_enable_sparse():
    code = ("import ucm.integration.vllm.plugin as p, ucm.integration.vllm.patches as q;"
            "p.register(); print(q.patches_applied());"
            "from vllm.model_executor.layers.attention.attention import Attention;"
            "print(Attention.forward._ucm_patched)")
    env = {"PATH": "", "ENABLE_SPARSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["True", "True"]


def test_bad_enable_sparse_value_fails():
    from ucm.config import UcmConfigError, sparse_enabled

    with pytest.raises(UcmConfigError, match="ENABLE_SPARSE"):
        sparse_enabled({"ENABLE_SPARSE": "maybe"})


def test_attention_features_blend_lacks_are_refused():
    from types import SimpleNamespace

    from ucm.integration.vllm.patches import check_attention_layer

    for plain in (None, -1, (-1, -1)):
        check_attention_layer("l0", SimpleNamespace(impl=SimpleNamespace(sliding_window=plain)))
    for attr, value in (("sliding_window", 4096), ("logits_soft_cap", 30.0), ("alibi_slopes", [0.5])):
        with pytest.raises(RuntimeError, match=attr):
            check_attention_layer("l0", SimpleNamespace(impl=SimpleNamespace(**{attr: value})))
