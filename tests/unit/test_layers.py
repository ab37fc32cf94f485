"""The package's layers import one way (README, "Layout"): every import, at module level or inside a function,
goes to the importer's own layer or one below it, no two sub-packages import each other, and no module imports
itself back through others."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "ds_distill"
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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (`from package import module` counted
    as the module, `from module import name` as the module)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("ds_distill")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ds_distill"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = targets - {name}
    return graph


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_import_goes_to_its_own_layer_or_below():
    upward = sorted(f"{module} -> {target}" for module, targets in imports().items() for target in targets
                    if LAYER[part(target)] > LAYER[part(module)])  # fmt: skip
    assert upward == []


def test_no_two_parts_import_each_other():
    edges = {(part(module), part(target)) for module, targets in imports().items() for target in targets}
    mutual = sorted({tuple(sorted(edge)) for edge in edges if edge[0] != edge[1] and edge[::-1] in edges})
    assert mutual == []


def test_no_module_imports_itself_back():
    graph = imports()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk reads function-level imports too: a config module importing train inside a function counts."""
    (tmp_path / "ds_distill" / "config").mkdir(parents=True)
    (tmp_path / "ds_distill" / "train").mkdir()
    (tmp_path / "ds_distill" / "config" / "a.py").write_text("def f():\n    from ds_distill.train import b\n")
    (tmp_path / "ds_distill" / "train" / "b.py").write_text("from ds_distill.config.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "ds_distill")
    assert imports() == {"ds_distill.config.a": {"ds_distill.train.b"}, "ds_distill.train.b": {"ds_distill.config.a"}}
    assert LAYER[part("ds_distill.train.b")] > LAYER[part("ds_distill.config.a")]
