"""The layers import one way (issue 12): every module of mnq_search, objectives and strategies is
imported in a fresh interpreter with a hook that records which project module imports which while
it loads; the graph has no cycle, and the low layers import nothing above them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECORD = textwrap.dedent(r'''
    import builtins, importlib, json, pkgutil, sys
    ROOTS = ("mnq_search", "objectives", "strategies")
    edges = set()
    real_import = builtins.__import__

    def module_of(name):
        return name if name in sys.modules else None

    def hook(name, globals=None, locals=None, fromlist=(), level=0):
        mod = real_import(name, globals, locals, fromlist, level)
        importer = (globals or {}).get("__name__", "")
        if importer.split(".")[0] in ROOTS:
            if level:
                pkg = (globals or {}).get("__package__") or importer.rpartition(".")[0]
                base = pkg.rsplit(".", level - 1)[0] if level > 1 else pkg
                target = f"{base}.{name}" if name else base
            else:
                target = name
            targets = [target]
            for item in fromlist or ():
                if f"{target}.{item}" in sys.modules:
                    targets.append(f"{target}.{item}")
            for t in targets:
                if t.split(".")[0] in ROOTS and t != importer and t in sys.modules:
                    edges.add((importer, t))
        return mod

    builtins.__import__ = hook
    names = []
    for root in ROOTS:
        pkg = importlib.import_module(root)
        names.append(root)
        for info in pkgutil.walk_packages(pkg.__path__, root + "."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
            names.append(info.name)
    print(json.dumps({"modules": names, "edges": sorted(edges)}))
''')


def _graph():
    proc = subprocess.run([sys.executable, "-c", RECORD], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    graph: dict[str, set[str]] = {m: set() for m in data["modules"]}
    for a, b in data["edges"]:
        if b.startswith(a + "."):  # a package importing its own submodules (re-exports) is not a cycle
            graph.setdefault(a, set())
            continue
        if a.startswith(b + "."):  # a submodule touching its own package: Python loads the parent first
            continue
        graph.setdefault(a, set()).add(b)
    return graph


def _cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle_and_the_layers_point_one_way():
    graph = _graph()
    assert len(graph) > 60  # every module was imported
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    below = {  # layer -> what it may import from the project
        "mnq_search.integer": {"mnq_search.integer"},
        "mnq_search.quant": {"mnq_search.integer", "mnq_search.quant", "mnq_search.errors", "mnq_search.distributed"},
    }
    for layer, allowed in below.items():
        for mod, deps in graph.items():
            if mod == layer or mod.startswith(layer + "."):
                bad = [d for d in deps if not any(d == a or d.startswith(a + ".") for a in allowed) and d != "mnq_search"]
                assert not bad, f"{mod} imports {bad}: {layer} may import only {sorted(allowed)}"
    # the core reaches strategies and objectives only through their registries, at call time
    for mod, deps in graph.items():
        if mod.startswith("mnq_search"):
            assert not [d for d in deps if d.startswith(("strategies", "objectives"))], mod
