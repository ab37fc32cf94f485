"""The package's layers import one way (README, "Layout"): every import, at module level or inside a function,
goes to the importer's own layer or one below it, no two parts import each other, and no module imports itself
back through others."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# bottom to top; the parts of one layer may import each other one way only
LAYERS = [
    {"ds_distill", "errors", "dist", "peers"},  # "ds_distill": the package's __init__ (its version)
    {"config"},
    {"data"},
    {"models"},
    {"objectives"},
    {"surgery"},
    {"train"},
    {"planner", "evaluation", "chain", "demo"},
    {"cli", "__main__"},
]
LAYER = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def imports(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file: `from package import module` counts as
    the module, `from module import name` as the module; relative imports resolved."""
    root = package.parent
    paths = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
             for path in package.rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith(package.name)}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from .x import y: from the importing module's package, `level` up
                    home = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join([*home, *([base] if base else [])])
                if base.startswith(package.name):
                    for alias in node.names:
                        submodule = f"{base}.{alias.name}"
                        targets.add(submodule if submodule in paths else base)
        graph[name] = targets - {name}
    return graph


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if LAYER[part(target)] > LAYER[part(module)])  # fmt: skip


def mutual(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    edges = {(part(module), part(target)) for module, targets in graph.items() for target in targets}
    return sorted({tuple(sorted(edge)) for edge in edges if edge[0] != edge[1] and edge[::-1] in edges})


def cycles(graph: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_part_has_a_layer():
    parts = {part(module) for module in imports(REPO / "ds_distill")}
    assert parts <= set(LAYER), f"place {sorted(parts - set(LAYER))} in LAYERS (and the README's layer line)"


def test_every_import_goes_to_its_own_layer_or_below():
    assert upward(imports(REPO / "ds_distill")) == []


def test_no_two_parts_import_each_other():
    assert mutual(imports(REPO / "ds_distill")) == []


def test_no_module_imports_itself_back():
    assert cycles(imports(REPO / "ds_distill")) == []


def test_the_checks_see_upward_mutual_and_circular_imports_in_functions_and_relative_ones(tmp_path):
    package = tmp_path / "ds_distill"
    (package / "config").mkdir(parents=True)
    (package / "train").mkdir()
    (package / "config" / "a.py").write_text("def f():\n    from ..train import b\n")
    (package / "train" / "b.py").write_text("from ds_distill.config.a import f\n")
    graph = imports(package)
    assert graph == {"ds_distill.config.a": {"ds_distill.train.b"}, "ds_distill.train.b": {"ds_distill.config.a"}}
    assert upward(graph) == ["ds_distill.config.a -> ds_distill.train.b"]
    assert mutual(graph) == [("config", "train")]
    assert cycles(graph) == ["ds_distill.config.a -> ds_distill.train.b -> ds_distill.config.a"]
