"""The package's layers, as docs/architecture.md draws them: no module imports from a layer above
its own (a lower layer reaching up is how import cycles and two-way coupling start)."""

from __future__ import annotations

import ast
from pathlib import Path

import mupad_core

ROOT = Path(mupad_core.__file__).parent
# Bottom to top; a subpackage may import its own layer and any below it.
LAYERS = [
    {"hub", "tasks", "zoo"},
    {"slide"},
    {"store"},
    {"models"},
    {"transport"},
    {"rna"},
    {"generate"},
    {"train"},
    {"evaluate"},
    {"demo_data", "demo", "cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imported_subpackages(path: Path) -> set[str]:
    """mupad_core subpackages a module imports, absolute or relative, at any depth in the file."""
    parts = path.relative_to(ROOT).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            package = list(parts[:-1])
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "mupad_core":
            target = node.module.split(".")[1:]
        else:
            continue
        if target:
            found.add(target[0].removesuffix(".py"))
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] == "__init__.py":
            continue
        own = parts[0].removesuffix(".py")
        assert own in RANK, f"{own} is in no layer: add it to LAYERS (and to docs/architecture.md)"
        for target in imported_subpackages(path):
            if target in RANK and RANK[target] > RANK[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not upward, upward
