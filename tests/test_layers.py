"""The layers meet only through the contract: every import arrow between top-level packages is
one of the allowed ones (DESIGN.md). Imports inside functions and under TYPE_CHECKING count too:
a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("contract", "orchestrator", "launch", "recipes")
# layer -> the other layers it may import
ALLOWED = {
    "contract": set(),
    "orchestrator": {"contract"},
    "launch": {"contract"},
    "recipes": {"contract"},
}


def imported_layers(path: Path) -> set[tuple[str, int, str]]:
    """(layer, line, module) for every import of a spotune layer in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in LAYERS:
                found.add((top, node.lineno, module))
    return found


def arrows() -> list[tuple[str, str, str]]:
    """(importing file, imported layer, where) for every cross-layer import in the tree."""
    result = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            for target, line, module in imported_layers(path):
                if target != layer:
                    result.append((layer, target, f"{path.relative_to(REPO)}:{line} imports {module}"))
    return result


def test_every_cross_layer_import_goes_through_the_contract():
    forbidden = [where for layer, target, where in arrows() if target not in ALLOWED[layer]]
    assert forbidden == []


def test_the_contract_imports_no_other_layer():
    assert [where for layer, _, where in arrows() if layer == "contract"] == []


def test_the_walker_sees_lazy_and_type_checking_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from launch.local import X\n"
                      "def f():\n    import recipes.sft\n")
    assert {(layer, module) for layer, _, module in imported_layers(sample)} == {
        ("launch", "launch.local"), ("recipes", "recipes.sft")}
