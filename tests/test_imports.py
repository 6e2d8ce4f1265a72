"""The package's dependency rules, read from the source (every import, module level or
inside a function): dependencies point one way (no import circle), and only the vLLM
adapter (ucm/integration/vllm/) imports vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "ucm.integration.vllm"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "ucm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target in _imports(name, path):
            top = target.split(".")[0]
            if top != "ucm":
                external[name].add(top)
                continue
            while target and target not in mods:
                target = target.rpartition(".")[0]
            # a package's __init__ is not a dependency of its own modules
            if target and target != name and not name.startswith(target + "."):
                edges[name].add(target)
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_only_the_vllm_adapter_imports_vllm():
    _, external = _graph()
    offenders = sorted(m for m, tops in external.items() if "vllm" in tops and not m.startswith(ADAPTER))
    assert offenders == []


def test_the_walk_finds_circles_and_vllm_imports(tmp_path):
    """The checks above can fail: a made-up pair of modules importing each other is found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from vllm.config import VllmConfig\n    from . import sibling\n")
    assert {"vllm.config", "vllm.config.VllmConfig", "ucm.x", "ucm.x.sibling"} <= _imports("ucm.x.m", mod)
