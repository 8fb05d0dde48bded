"""The package's architecture holds: layers import only downward, and no module imports in a cycle.

Layers, bottom to top (``rmlib/__init__.py`` says what each holds):
core -> data -> model -> reward -> rloo -> analysis -> plots -> pipeline.
Every import statement counts, also one inside a function.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rmlib"
LAYERS = ["core", "data", "model", "reward", "rloo", "analysis", "plots", "pipeline"]
ENTRY_POINTS = {"run": "pipeline"}  # top-level modules that are not a layer of their own: ``python -m rmlib.run``


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    """Rank of a module's layer; None for the package root (``rmlib``)."""
    parts = module.split(".")
    return LAYERS.index(ENTRY_POINTS.get(parts[1], parts[1])) if len(parts) > 1 else None


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the rmlib modules it imports (``from rmlib.x import y`` counts y when it is a module)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("rmlib")}
            elif isinstance(node, ast.ImportFrom):
                base = resolve(module, node, path.name == "__init__.py")
                if not base.startswith("rmlib"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in files else base)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def test_every_module_sits_in_a_known_layer():
    for module in import_graph():
        assert module == "rmlib" or ENTRY_POINTS.get(module.split(".")[1], module.split(".")[1]) in LAYERS, f"{module} is in no layer of {LAYERS}"


def test_layers_import_only_downward():
    upward = [f"{m} (layer {LAYERS[layer(m)]}) imports {t} (layer {LAYERS[layer(t)]})"
              for m, targets in import_graph().items() if layer(m) is not None
              for t in targets if layer(t) is None or layer(t) > layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for():
    """The cycle finder and the layer rank see a planted cycle and an upward import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("rmlib.model.scoring") < layer("rmlib.analysis.bon")

