"""The wheel installs one import name, ``metasent``, and every source package folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = {"app": "metasent.app", "meta": "metasent.meta", "data": "metasent.data"}


def _source_packages() -> set[str]:
    """Dotted names of every folder with an ``__init__.py`` under app/, meta/ and data/."""
    names = {"metasent"}
    for folder, name in SOURCE_PACKAGES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            names.add(".".join((name, *relative)))
    return names


def test_pyproject_lists_every_package_folder() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _source_packages()
    assert setuptools["package-dir"] == {name: folder for folder, name in SOURCE_PACKAGES.items()}


def test_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    # Build from a copy without the checkout's metasent/app, meta, data links: the wheel must
    # come from the package-dir mapping alone.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in SOURCE_PACKAGES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "metasent").mkdir()
    for module in (ROOT / "metasent").glob("*.py"):  # __init__.py, cli.py and the command modules
        shutil.copy(module, src / "metasent" / module.name)
    shutil.copytree(ROOT / "metasent" / "models", src / "metasent" / "models")  # the shipped default model
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*command, str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("metasent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = archive.read(top_level).decode().split()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {"metasent"}, tops
    assert declared == ["metasent"]
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == _source_packages()
    assert not [n for n in names if n.startswith(("bench/", "tests/", "metasent/bench/"))]
    assert "metasent = metasent.cli:main" in scripts
    assert {f"metasent/{p.name}" for p in (ROOT / "metasent").glob("*.py")} <= set(names)  # every command module
    shipped = {n for n in names if n.startswith("metasent/models/")}
    models = {p.parent.name for p in (ROOT / "metasent" / "models").glob("*/metasent.json")}
    assert "default" in models  # every shipped model: its config and its compact weights, nothing else
    assert shipped == {f"metasent/models/{m}/{f}" for m in models for f in ("metasent.json", "model.safetensors")}
    page = {n for n in names if n.startswith("metasent/app/static/")}  # the playground at /
    assert page == {f"metasent/app/static/{p.name}" for p in (ROOT / "app" / "static").iterdir()}
    assert {"metasent/app/static/index.html", "metasent/app/static/playground.js"} <= page
