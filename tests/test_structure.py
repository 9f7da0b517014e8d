"""Imports flow one way: no module imports itself round a cycle (lazy imports inside functions count), and the
orchestration (cli, api, recipe, stages) is imported by nobody below it."""

import ast
from pathlib import Path

from .conftest import ROOT

ORCHESTRATION = {"flatllm_export.cli": 0, "flatllm_export.api": 1, "flatllm_export.preflight": 2,
                 "flatllm_export.recipe": 3, "flatllm_export.stages": 3}
OPEN_PACKAGE_CYCLES: set[frozenset[str]] = set()  # none: a package cycle added later fails here


def modules() -> dict[str, Path]:
    out = {}
    for p in [*(ROOT / "flatllm_export").rglob("*.py"), *(ROOT / "exporters").rglob("*.py")]:
        out[".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {m for m in found if m in mods and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def package(module: str) -> str:
    return "exporters" if module.startswith("exporters") else ".".join(module.split(".")[:2])


def test_no_module_imports_itself_round_a_cycle():
    assert cycles(import_graph()) == []


def test_no_new_package_cycle():
    graph = {}
    for a, targets in import_graph().items():
        graph.setdefault(package(a), set()).update(package(b) for b in targets if package(b) != package(a))
    found = {frozenset(c) for c in cycles(graph)}
    assert found <= OPEN_PACKAGE_CYCLES, found - OPEN_PACKAGE_CYCLES


def test_the_orchestration_is_imported_from_above_only():
    for a, targets in import_graph().items():
        for b in targets & set(ORCHESTRATION):
            assert a in ORCHESTRATION and ORCHESTRATION[a] < ORCHESTRATION[b], f"{a} imports {b}"


def test_rmsnorm_and_rotary_math_written_once():
    """RMSNorm's arithmetic is one function (modeling_flatllm.rms_norm, LlamaRMSNorm's to the bit) that the ONNX
    graph and the float64 reference call; rotate-half is transformers' own."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from flatllm_export.modeling.modeling_flatllm import rms_norm

    sources = {name: path.read_text() for name, path in modules().items()}
    assert [n for n, text in sources.items() if "rsqrt(" in text] == ["flatllm_export.modeling.modeling_flatllm"]
    assert not [n for n, text in sources.items() if "[-x2,x1]" in text.replace(" ", "")]
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64).to(dtype)
        assert torch.equal(norm.to(dtype)(x), rms_norm(x, norm.weight.to(dtype), 1e-5))


def test_peak_rss_from_getrusage_is_bytes_everywhere(monkeypatch):
    import sys

    from flatllm_export.stages import maxrss_bytes

    monkeypatch.setattr(sys, "platform", "darwin")  # macOS reports bytes
    assert maxrss_bytes(5 << 20) == 5 << 20
    monkeypatch.setattr(sys, "platform", "linux")  # Linux reports KiB
    assert maxrss_bytes(5 << 10) == 5 << 20
    scripts = [p for p in (ROOT / "scripts").glob("*.py") if "ru_maxrss / 1024" in p.read_text()]
    assert not scripts, f"{scripts} read ru_maxrss as KiB on every platform: use stages.maxrss_bytes"
