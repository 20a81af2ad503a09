"""The host's own cache-line round trip between two cores, measured in the same run.

smpd/tools/hwfloor.c is compiled on the fly when a C compiler exists, once per source
version, into the user's cache ($XDG_CACHE_HOME/smpd, else ~/.cache/smpd; built
under a temporary name and renamed into place, so a build killed halfway leaves
no binary). Otherwise the floor is reported unavailable, with the reason, and
ratios are left out rather than guessed. The measuring process dies with us.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from smpd.host.proc import die_with_parent

SOURCE = Path(__file__).resolve().parent / "hwfloor.c"  # ships in the package: a wheel measures too


def measure(iterations: int = 200_000) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"available": False, "why": "needs two host cores; this process may use one"}
    if not SOURCE.is_file():
        return {"available": False, "why": f"{SOURCE} not found (it ships with the smpd repository)"}
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return {"available": False, "why": "no C compiler (cc, gcc or clang) on PATH"}
    src = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smpd"
    exe = cache / f"hwfloor-{hashlib.sha256(src).hexdigest()[:16]}"
    if not exe.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hwfloor-", dir=cache)
        os.close(fd)
        try:
            r = subprocess.run([cc, "-O2", "-pthread", "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if r.returncode:
                return {"available": False, "why": f"{cc} could not build {SOURCE.name}: {r.stderr.strip()[:200]}"}
            os.replace(tmp, exe)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    a, b = cores[0], cores[-1]
    try:
        r = subprocess.run([str(exe), str(a), str(b), str(iterations)], capture_output=True, text=True,
                           timeout=120, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        return {"available": False, "why": "the ping-pong did not finish within 120 s (host too loaded)"}
    if r.returncode:
        return {"available": False, "why": f"hwfloor failed: {r.stderr.strip()[:200]}"}
    vals = dict(line.split() for line in r.stdout.splitlines() if line.strip())
    return {"available": True, "rtt_ns": int(vals["rtt_ns_p50"]), "rtt_p99_ns": int(vals["rtt_ns_p99"]),
            "rtt_min_ns": int(vals["rtt_ns_min"]), "cores": [a, b], "iterations": iterations, "compiler": cc}
