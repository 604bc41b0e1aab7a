"""The package layout ordinary tools can follow: one copy of every module, and a wheel that holds every subpackage.

The repository root is the package ``rankalloc``. Importing a subpackage under another name (``allocators``
with the root on ``sys.path``) would make a second copy of its registries, so it is refused. The wheel is built
from a copy of the tracked tree plus a new, unlisted subpackage, and every subpackage must be in it and import
from it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("allocators", "profiling", "decomposers", "studies")


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_a_subpackage_under_another_name_is_refused(name):
    """With the repository root on sys.path, ``import allocators`` would load a second registry: it fails, saying
    how to import it."""
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"import this package as rankalloc.{name}, not {name}" in proc.stderr


def test_one_registry_whatever_sys_path_holds():
    """The solver registry reached through the package is the one every solver registers in."""
    code = ("import sys; sys.path.insert(0, '.'); import rankalloc.allocators.registry as r; "
            "import rankalloc.allocators.exact as e; assert r.SOLVERS['exact'] is e.Exact; "
            "assert 'allocators' not in sys.modules and 'allocators.registry' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f]


def test_the_wheel_holds_every_subpackage_including_a_new_one(tmp_path):
    """A copy of the tracked tree plus a new subpackage ``newpart/`` that nothing lists: the wheel built from it
    holds every subpackage, and each module imports from the unpacked wheel (not from this checkout)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (git ls-files)")
    src = tmp_path / "src"
    for f in _tracked_files():
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    (src / "newpart").mkdir()
    (src / "newpart" / "__init__.py").write_text('VALUE = 7\n')
    packages = sorted(p.parent.relative_to(src).as_posix() for p in src.rglob("__init__.py")
                      if "tests" not in p.parts)
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "Could not find a version that satisfies" in proc.stderr:
        pytest.skip("no package index reachable to fetch the build backend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("rankalloc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in packages if f"rankalloc/{p}/__init__.py".replace("rankalloc/./", "rankalloc/") not in names]
    assert "newpart" in packages and not missing, missing
    assert {"rankalloc/studies/fixtures/curves_small.csv", "rankalloc/studies/examples/bandwidth_cost.py"} <= names
    assert "rankalloc/setup.py" not in names  # the build script is no module of the package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    modules = sorted("rankalloc." + p.relative_to(site / "rankalloc").with_suffix("").as_posix().replace("/", ".")
                     for p in (site / "rankalloc").rglob("*.py") if p.name != "__init__.py")
    code = ("import importlib, sys, rankalloc; assert rankalloc.__file__.startswith(sys.argv[1]), rankalloc.__file__; "
            "[importlib.import_module(m) for m in sys.argv[2:]]; import rankalloc.newpart as n; print(n.VALUE)")
    proc = subprocess.run([sys.executable, "-c", code, str(site), *modules], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "7", proc.stderr[-3000:]
