"""Imports flow one way: data <- meta <- app, bench beside app, the command line above them all.
Inside app, only the SQL store (``app/store.py``) and its migrations import SQLAlchemy, and only
the application factory (``app/main.py``) names the store's implementation: everything else
uses the :class:`app.storage.DomainStore` protocol and its exceptions.

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
CLI_MODULES = sorted((ROOT / "metasent").glob("*.py"))  # cli.py and the command modules beside it


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
    return [*files, *(("cli", path) for path in CLI_MODULES)]


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


def _meta_modules(path: Path, meta: Path = ROOT / "meta") -> set[str]:
    """The ``meta`` modules ``path`` (a file under ``meta``) imports, relatively or as
    ``metasent.meta.x``, dotted below ``meta``: ``algorithms``, ``algorithms.registry`` ..."""
    package = path.parent.relative_to(meta).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            found.add(".".join([*base, *(node.module or "").split(".")]).strip("."))
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name.removeprefix("metasent.meta.") for name in names if name.startswith("metasent.meta.")}
    return found


def test_config_imports_no_algorithm() -> None:
    # config.py is plain data: each algorithm's defaults live with its spec, and meta/resolve.py,
    # above both, applies them (review of 1e3091a: config <-> algorithms/registry was a cycle)
    imported = _meta_modules(ROOT / "meta" / "config.py")
    assert not {m for m in imported if m.split(".")[0] in ("algorithms", "resolve")}, imported


def test_the_config_check_catches_an_algorithm_import(tmp_path: Path) -> None:
    (tmp_path / "algorithms").mkdir()
    module = tmp_path / "config.py"
    module.write_text("def f():\n    from .algorithms import get\n")  # a lazy import
    assert _meta_modules(module, tmp_path) == {"algorithms"}
    module.write_text("from metasent.meta.algorithms.registry import get\n")
    assert _meta_modules(module, tmp_path) == {"algorithms.registry"}
    inner = tmp_path / "algorithms" / "fomaml.py"
    inner.write_text("from ..config import InnerLoopConfig\nfrom .registry import register\n")
    assert _meta_modules(inner, tmp_path) == {"config", "algorithms.registry"}


def _attributes(path: Path) -> set[str]:
    """Every ``name.attribute`` read in ``path`` (``sys.path``, ``os.environ`` ...)."""
    tree = ast.parse(path.read_text(), str(path))
    return {
        f"{n.value.id}.{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    }


def test_the_command_line_only_parses_and_calls() -> None:
    # cli.py stays a thin command line (training, evaluation and export live in meta/), and no
    # command module reaches the benchmarks through sys.path: bench imports as a package
    assert len((ROOT / "metasent" / "cli.py").read_text().splitlines()) <= 400
    assert {path.name for path in CLI_MODULES} >= {"cli.py", "cli_train.py", "cli_bench.py", "cli_client.py"}
    for path in CLI_MODULES:
        assert "sys.path" not in _attributes(path), f"{path.name} uses sys.path"


APP = ROOT / "app"
SQL_MODULES = {APP / "store.py"}  # with app/migrations/: the only app modules that import SQLAlchemy
STORE_USERS = {APP / "main.py"}  # the one app module that names the store's implementation


def _imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of the modules (and imported names) ``path`` imports, relative ones resolved
    inside its package; ``source`` instead of the file's text."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name.removeprefix("metasent.") for name in names}


def _app_modules() -> list[Path]:
    return sorted(APP.rglob("*.py"))


@pytest.mark.parametrize("path", _app_modules(), ids=lambda value: str(value.relative_to(ROOT)))
def test_only_the_store_imports_sqlalchemy(path: Path) -> None:
    if path in SQL_MODULES or (APP / "migrations") in path.parents:
        return
    sql = sorted(name for name in _imported_modules(path) if name.split(".")[0] == "sqlalchemy")
    assert not sql, f"{path.relative_to(ROOT)} imports {sql}: raise or catch app.storage's exceptions instead"


@pytest.mark.parametrize("path", _app_modules(), ids=lambda value: str(value.relative_to(ROOT)))
def test_only_the_factory_names_the_store_implementation(path: Path) -> None:
    if path in SQL_MODULES | STORE_USERS or (APP / "migrations") in path.parents:
        return
    store = sorted(name for name in _imported_modules(path) if name == "app.store" or name.startswith("app.store."))
    assert not store, f"{path.relative_to(ROOT)} imports {store}: use app.storage (the DomainStore protocol)"


def test_the_store_checks_catch_an_import() -> None:
    source = "from sqlalchemy.exc import OperationalError\nfrom ..store import SqlDomainStore\nimport sqlalchemy\n"
    names = _imported_modules(APP / "routers" / "example.py", source)
    assert {"sqlalchemy.exc", "sqlalchemy", "app.store.SqlDomainStore"} <= names
