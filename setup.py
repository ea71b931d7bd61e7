"""Development installs only: ``pip install -e .`` also maps the repository's ``bench/`` package
(the benchmarks, run from a checkout by ``metasent benchmark`` and ``metasent speed``), so that it
imports as ``bench`` from any folder. Wheels and the image (``pip install .``,
``scripts/install.sh``) are built from pyproject.toml's package list alone and hold no ``bench``.
"""

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel


class EditableWithBench(editable_wheel):
    """The editable wheel of a checkout, with ``bench`` beside the ``metasent`` packages."""

    def run(self) -> None:
        packages = self.distribution.packages or []
        if "bench" not in packages:
            self.distribution.packages = [*packages, "bench"]
        super().run()


setup(cmdclass={"editable_wheel": EditableWithBench})
