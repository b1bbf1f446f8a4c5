"""The package's structure, measured: layers import only downwards, no import cycle, no oversized file.

Every ``import`` statement in fastlora/ counts, function-level ones included (a lazy import is
still a dependency). ARCHITECTURE.md draws the same layers.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastlora"
MAX_BYTES = 20_000

# Lowest first. A module may import modules of lower layers, and of its own top-level package
# (fastlora.quant.* among themselves, ...); never a higher layer or another package of its layer.
# The entry points (the top layer, which nothing imports) may import each other.
LAYERS = [
    ("base", ["fastlora._alloc", "fastlora.dispatch", "fastlora.functional"]),
    ("format", ["fastlora.quant"]),
    ("kernels", ["fastlora.kernels", "fastlora.native"]),
    ("ops", ["fastlora.ops"]),
    ("modules", ["fastlora.modules"]),
    ("methods", ["fastlora.methods"]),
    ("jobs", ["fastlora.train", "fastlora.bench"]),
    (
        "entry points",
        [
            *("fastlora", "fastlora.__main__", "fastlora.cli", "fastlora.demo", "fastlora.aot", "fastlora.env"),
            *("fastlora.adapters", "fastlora.strategies"),  # backward-compatible re-exports of fastlora.methods
        ],
    ),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _group(module: str) -> tuple[int, str]:
    """(layer index, the group prefix) of a fastlora module: its longest matching prefix."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS")
    return best


def _imports(module: str) -> set[str]:
    """The fastlora modules ``module`` imports (``from pkg import name`` resolves to pkg.name when it is a module)."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in out if m == "fastlora" or m.startswith("fastlora.")}


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        _group(module)


def test_layers_import_only_downwards():
    wrong = []
    for module, imports in GRAPH.items():
        layer, group = _group(module)
        for target in imports:
            if target not in MODULES:
                wrong.append(f"{module} imports {target}, which does not exist")
                continue
            target_layer, target_group = _group(target)
            top = len(LAYERS) - 1
            if target_group != group and target_layer >= layer and not layer == target_layer == top:
                wrong.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    """Tarjan's strongly connected components over every import edge: each must be one module."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_nothing_imports_the_compatibility_shims():
    shims = ("fastlora.adapters", "fastlora.strategies")
    users = sorted(
        f"{module} -> {target}"
        for module, imports in GRAPH.items()
        for target in imports
        if target.startswith(shims) and not module.startswith(shims)
    )
    assert not users, users


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_oversized_source_file(path):
    assert path.stat().st_size <= MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes; split it (limit {MAX_BYTES})"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above are not vacuous: on a made-up graph they find what they must."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {**saved, "fastlora.quant.api": saved["fastlora.quant.api"] | {"fastlora.ops.quant"}}
        with pytest.raises(AssertionError, match=r"fastlora.quant.api \(format\) imports fastlora.ops.quant \(ops\)"):
            test_layers_import_only_downwards()
        with pytest.raises(AssertionError, match=r"fastlora\.ops\.quant"):
            test_no_import_cycle()
    finally:
        GRAPH = saved
