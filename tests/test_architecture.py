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


# Size limits a maintainer can hold in mind: a class is one concept, a function one decision
# table at most. A function over MAX_COMPLEXITY says why on a `# complexity:` line just above
# its `def` (the hot paths are written flat on purpose: smpd.machine.hotpath).
MAX_CLASS_LINES = 300
MAX_COMPLEXITY = 20


def _sources():
    return sorted((REPO / "smpd").rglob("*.py"))


def test_no_class_grows_past_one_concept():
    import ast
    big = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
                           f"({node.end_lineno - node.lineno + 1} lines)")
    assert not big, f"classes over {MAX_CLASS_LINES} lines: split them: {big}"


def test_every_function_over_the_complexity_limit_says_why():
    from radon.complexity import cc_visit
    unexplained = []
    for path in _sources():
        text = path.read_text()
        lines = text.splitlines()
        for block in cc_visit(text):
            funcs = [block] + list(getattr(block, "methods", []))
            for f in funcs:
                if getattr(f, "is_method", None) is None and hasattr(f, "methods"):
                    continue  # the class itself: its methods are judged one by one
                above = lines[max(0, f.lineno - 4):f.lineno - 1]
                if f.complexity > MAX_COMPLEXITY and not any("# complexity:" in line for line in above):
                    unexplained.append(f"{path.relative_to(REPO)}:{f.lineno} {f.name} ({f.complexity})")
    assert not unexplained, (f"functions over complexity {MAX_COMPLEXITY} without a '# complexity:' "
                             f"line above them: {unexplained}")


def test_the_template_cpu_processes_are_forked_from_imports_no_threads():
    """Every CPU process runs the at-fork hooks of what the template imported: threading's (pulled
    in by psutil, via subprocess) cost each one ~120 of its ~600 page faults at bring-up
    (smpd.daemon.template); random's reseeds it from urandom. What the CPU needs of psutil, the
    coordinator reads for it. Every memory area the template maps is copied at each fork and torn
    down at each CPU's exit: hashlib's OpenSSL is imported where a page image or digest is made, and
    posix_ipc (three libraries) where a segment is made, attached or unlinked by name."""
    r = subprocess.run([sys.executable, "-P", "-c", "import sys, smpd.daemon.template as t; t.cpu_code(); "
                        "print(' '.join(m for m in ('threading', 'psutil', 'subprocess', 'random', 'hashlib', 'posix_ipc') if m in sys.modules))"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [], f"the template imports {r.stdout.strip()}: import it where it is used instead"
