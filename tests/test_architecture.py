"""The package map is the architecture: imports run one way (tools -> daemon -> kernel -> machine -> host)."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import smpd

REPO = Path(__file__).resolve().parent.parent


def test_imports_run_one_way():
    """lint-imports checks the layers contract in pyproject.toml: an upward import fails here."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is in the test extra: pip install -e '.[test]'"
    r = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("package", ["host", "machine", "kernel", "daemon", "tools"])
def test_each_package_says_what_it_is_and_what_it_may_import(package):
    mod = importlib.import_module(f"smpd.{package}")
    doc = mod.__doc__ or ""
    assert len(doc.split()) > 20 and "import" in doc, f"smpd.{package} needs a docstring with its rule"


def test_every_module_is_in_a_package_of_the_map():
    top = {m.name for m in pkgutil.iter_modules(smpd.__path__)}
    assert top <= {"host", "machine", "kernel", "daemon", "tools", "errors", "config", "cpulist", "inputs",
                   "__main__"}, top
