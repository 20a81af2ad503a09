"""The README's examples run as written.

Every fenced block that follows a ``<!-- example -->`` line is run line by line, with bash,
in a scratch directory, with the venv's `smpd` first on PATH and SMPD_NAME naming a machine
of this test (so a user's `default` machine is never touched). Only the lengths change:
SHORTER lists each substitution (a 2000-trial soak becomes a 16-trial one). A line passes
when it exits 0, or 1 where smpd says 1 means an outcome other than CLEAN: then nothing
may be on stderr but the trace-file note. Nothing of the machine may be left afterwards.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_name
from smpd.tools import lifecycle

README = Path(__file__).resolve().parent.parent / "README.md"
SHORTER = [("--rounds 20000", "--rounds 200"), ("--rounds 100000", "--rounds 200"),
           ("--duration 2m", "--duration 1s"), ("--trials 2000", "--trials 16"),
           ("--duration 10m", "--duration 1s")]


def examples() -> list[tuple[int, list[str]]]:
    """(line number, commands) of each example block."""
    lines = README.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() == "<!-- example -->":
            assert lines[i + 1].startswith("```"), f"README line {i + 1}: an example marker without a block"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            out.append((i + 3, [c for c in lines[i + 2:end] if c.strip() and not c.lstrip().startswith("#")]))
    return out


def test_the_readme_marks_its_examples():
    blocks = examples()
    assert len(blocks) >= 4
    assert all(any(c.startswith("smpd up") for c in cmds) for _, cmds in blocks)


@pytest.mark.parametrize("where, commands", examples(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_a_readme_example_runs_as_written(where, commands, tmp_path):
    name = run_name("readme")
    env = dict(os.environ, SMPD_NAME=name, COLUMNS="100",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    try:
        for command in commands:
            for long, short in SHORTER:
                command = command.replace(long, short)
            r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
            said = f"README line {where}: `{command}` exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            assert r.returncode in (0, 3), said  # 3: the machine's outcome was not CLEAN
            assert "Traceback" not in r.stderr and "Error:" not in r.stderr, said
            if r.returncode == 3:
                assert re.search(r"^(TRIPLE_FAULT|CORRUPTION|MCE_SHUTDOWN|SMM_HANG|STUCK|CPU_LOST)\b|link \d+ of \d+ "
                                 r"failed|\"outcome\": \"(?!CLEAN)", r.stdout, re.M), said
    finally:
        lifecycle.down(name)
