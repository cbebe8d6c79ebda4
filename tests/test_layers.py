"""The layers of the README's architecture: `app` -> `relays` -> `schemas`, each importing only those below."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BELOW = {"schemas": {"schemas"}, "relays": {"relays", "schemas"}}


def imported(path: Path) -> set[str]:
    """The top-level packages a module imports (at load time or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    ours = {"app", "relays", "schemas"}
    wrong = {
        str(path.relative_to(ROOT)): sorted((imported(path) & ours) - BELOW[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}
