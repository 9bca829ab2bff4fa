"""The package's shape: no import cycle among its modules, a small public API, and a README whose
module list matches the tree."""

from __future__ import annotations

import ast
import graphlib
import pkgutil
import re
from pathlib import Path

import pytest

import auglocal_fx

PACKAGE = Path(auglocal_fx.__file__).parent
README = PACKAGE.parent / "README.md"


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {"auglocal_fx": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="auglocal_fx."):
        path = PACKAGE.joinpath(*info.name.split(".")[1:])
        out[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports at run time, at any depth of its code (imports
    inside functions count; those under ``if TYPE_CHECKING:`` do not)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base_parts = parts if is_pkg else parts[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 20 and graph["auglocal_fx.compiler"], "the walk found the package's modules"
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """A lazy import that closes a cycle is still a cycle: the walk reads imports inside functions."""
    modules = {"auglocal_fx.a": tmp_path / "a.py", "auglocal_fx.b": tmp_path / "b.py"}
    modules["auglocal_fx.a"].write_text("from .b import f\n")
    modules["auglocal_fx.b"].write_text("def f():\n    from .a import g\n")
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()


def test_public_api_is_what_the_readme_documents():
    assert sorted(auglocal_fx.__all__) == sorted([
        "AugLocalError", "AugLocalNet", "Plan", "PlanConfig", "StepOutput", "build_plan", "export_onnx", "load_auglocal",
        "save_backbone_state", "to_auglocal"])
    text = README.read_text(encoding="utf-8")
    for name in auglocal_fx.__all__:
        assert f"`{name}" in text, f"{name} is public but the README does not mention it"


def test_readme_module_list_matches_the_tree():
    """The README's "How it works" lists one line per module; every module is there and no other."""
    section = README.read_text(encoding="utf-8").split("## How it works", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(auglocal_fx/[\w/]+\.py)`", section))
    tree = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py" or p.parent.name == "rules"}
    assert listed == tree, f"missing from the README: {sorted(tree - listed)}; not in the tree: {sorted(listed - tree)}"
