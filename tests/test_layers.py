"""Layers point one way: service -> app and routes -> services -> policy -> runners -> ground floor.

The ground floor (`llmux.core`) imports nothing of llmux's above it; runners stand on it alone; the
residency policy on it and the runners. Checked on the source with `ast`, every import statement
counted, including those inside functions and `TYPE_CHECKING` blocks: a layer that needs a name
from above at type-check time has the arrow the wrong way too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the first-party packages its modules may import.
ALLOWED: dict[str, tuple[str, ...]] = {
    "llmux.core": ("llmux.core",),
    "runners": ("llmux.core", "runners"),
    "llmux_policy": ("llmux.core", "runners", "llmux_policy"),
}
FIRST_PARTY = ("llmux", "runners", "llmux_policy", "service")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every first-party import in the file, relative ones resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
            if node.module in ("llmux",) or (node.level and not node.module):
                names = [f"{names[0]}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in FIRST_PARTY]
    return found


def allowed(importer_package: str, imported: str) -> bool:
    return any(imported == p or imported.startswith(p + ".") for p in ALLOWED[importer_package])


def layer_of(path: Path) -> str | None:
    name = module_name(path)
    return next((p for p in ALLOWED if name == p or name.startswith(p + ".")), None)


MODULES = sorted(
    p for folder in ("llmux", "runners", "llmux_policy") for p in (ROOT / folder).rglob("*.py")
)
GUARDED = [p for p in MODULES if layer_of(p) is not None]


def test_every_layer_has_modules() -> None:
    assert {layer_of(p) for p in GUARDED} == set(ALLOWED)


@pytest.mark.parametrize("path", GUARDED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_points_up(path: Path) -> None:
    layer = layer_of(path)
    assert layer is not None
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for line, name in imports_of(path)
        if not allowed(layer, name)
    ]
    assert not upward, f"{layer} may import only {ALLOWED[layer]}:\n" + "\n".join(upward)


def test_the_planner_is_pure() -> None:
    """The policy decides without effects: the planner imports no runner and no executor."""
    names = [name for _, name in imports_of(ROOT / "llmux_policy" / "planner.py")]
    assert all(name.startswith("llmux.core.") for name in names), names


def test_the_checker_sees_an_upward_import() -> None:
    """The walk itself: an import of the app from a runner is found, relative or absolute."""
    bad = ROOT / "runners" / "_layer_probe.py"
    bad.write_text("from llmux.app import create_app\nfrom llmux import state\n")
    try:
        names = [name for _, name in imports_of(bad)]
        assert names == ["llmux.app", "llmux.state"]
        assert not any(allowed("runners", name) for name in names)
    finally:
        bad.unlink()
