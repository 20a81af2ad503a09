"""How a bench runs the smpd command: `python -P -m smpd ARGS --name NAME`, this checkout first on
its path.

-P: without it `python -m` puts the working directory first on sys.path, and a bench run (often as
root) from a directory another user can write, such as /tmp, would import their smpd/, click.py or
psutil.py (found by a hostile review, 2026-11-29; smpd's own subprocesses already run -P).
PYTHONPATH names this checkout instead, so the command runs the same smpd the bench imports,
installed or not, and keeps none of the caller's entries that would mean the working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pythonpath(theirs: str) -> str:
    """This checkout, then the caller's entries that name a directory absolutely: an empty entry
    (``PYTHONPATH=/x:``, what `export PYTHONPATH=/x:$PYTHONPATH` makes of an unset one) or a relative
    one means the working directory, which -P is there to keep off the path (hostile review)."""
    return os.pathsep.join([REPO, *(e for e in theirs.split(os.pathsep) if os.path.isabs(e))])


def smpd(*args: str, name: str, timeout: float, ok: tuple[int, ...] = (0,),
         columns: int | None = None) -> subprocess.CompletedProcess:
    """Run `smpd ARGS --name NAME`; SystemExit with its stderr's end when its exit status is not in ``ok``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath(env.get("PYTHONPATH", ""))
    if columns is not None:
        env["COLUMNS"] = str(columns)
    r = subprocess.run([sys.executable, "-P", "-m", "smpd", *args, "--name", name], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if r.returncode not in ok:
        raise SystemExit(f"smpd {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r
