"""Imports flow one way: data <- meta <- app, bench beside app, the command line above them all.

Read statically from the source (every ``import`` and ``from ... import``, including the ones
inside functions), so a lazy import cannot hide a wrong-way edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"data": ROOT / "data", "meta": ROOT / "meta", "app": ROOT / "app", "bench": ROOT / "bench"}
ALLOWED = {
    "data": set(),
    "meta": {"data"},
    "app": {"meta", "data"},
    "bench": {"meta", "data"},  # the service is measured over HTTP or through meta's public API
    "cli": {"app", "meta", "data", "bench"},
}
GENERIC = {"app", "meta", "data"}  # installed only as metasent.app, metasent.meta, metasent.data


def _imported_layers(path: Path, own: str) -> set[str]:
    """Layers ``path`` imports: relative imports stay in ``own``; ``metasent.<layer>`` and
    ``bench`` name theirs. Raises AssertionError on a bare ``app``/``meta``/``data`` import."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            layers.add(own)
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            assert parts[0] not in GENERIC, f"{path}: imports {name!r}; use metasent.{name} or a relative import"
            if parts[0] == "metasent" and len(parts) > 1 and parts[1] in LAYERS:
                layers.add(parts[1])
            elif parts[0] == "bench":
                layers.add("bench")
    return layers


def _sources() -> list[tuple[str, Path]]:
    files = [(layer, path) for layer, folder in LAYERS.items() for path in sorted(folder.rglob("*.py"))]
    return [*files, ("cli", ROOT / "metasent" / "cli.py")]


@pytest.mark.parametrize(("layer", "path"), _sources(), ids=lambda value: str(value).replace(str(ROOT), ""))
def test_imports_flow_one_way(layer: str, path: Path) -> None:
    wrong = _imported_layers(path, layer) - ALLOWED[layer] - {layer}
    assert not wrong, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(wrong)}"


def test_the_check_catches_a_wrong_way_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from metasent.app.service import ModelService\n")
    assert _imported_layers(module, "meta") == {"app"}
    module.write_text("from meta.model import MetaLearner\n")
    with pytest.raises(AssertionError, match="metasent.meta.model"):
        _imported_layers(module, "bench")


def test_tests_import_the_installed_names() -> None:
    for path in sorted((ROOT / "tests").glob("*.py")):
        _imported_layers(path, "tests")  # no bare app/meta/data import anywhere in the tests
