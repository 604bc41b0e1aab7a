"""Package discovery for the root-as-package layout (metadata lives in pyproject.toml).

The repository root is the package ``rankalloc``: ``allocators/``, ``profiling/``, ``decomposers/`` and
``studies/`` are its subpackages. setuptools cannot prefix discovered packages from pyproject.toml alone, so
every directory below the root that holds an ``__init__.py`` is found here and mapped under ``rankalloc.``: a new
subpackage is in the wheel without editing a list (``tests/test_layout.py`` builds the wheel and checks it).
This file itself sits in the package directory and is kept out of the wheel.
"""

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "rankalloc" and m[1] == "setup")]


regular = find_packages(".", exclude=["tests", "tests.*", "build*"])
# Data folders inside a subpackage (studies/fixtures, studies/examples) are importable namespace packages to Python;
# naming them here ships their package data without setuptools' "absent from `packages`" warning.
data = [p for p in find_namespace_packages(".", exclude=["tests*", "build*", "*__pycache__*"])
        if p not in regular and p.rpartition(".")[0] in regular]

setup(
    package_dir={"rankalloc": "."},
    packages=["rankalloc"] + [f"rankalloc.{p}" for p in regular + data],
    cmdclass={"build_py": BuildPy},
)
