"""The host's own cache-line round trip between two cores, measured in the same run.

bench/hwfloor.c is compiled on the fly into a temporary directory (removed after
the run) when a C compiler exists; otherwise the floor is reported unavailable,
with the reason, and ratios are left out rather than guessed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "hwfloor.c"


def measure(iterations: int = 200_000) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"available": False, "why": "needs two host cores; this process may use one"}
    if not SOURCE.is_file():
        return {"available": False, "why": f"{SOURCE} not found (it ships with the smpd repository)"}
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return {"available": False, "why": "no C compiler (cc, gcc or clang) on PATH"}
    with tempfile.TemporaryDirectory(prefix="smpd-hwfloor-") as d:
        exe = os.path.join(d, "hwfloor")
        r = subprocess.run([cc, "-O2", "-pthread", "-o", exe, str(SOURCE)], capture_output=True, text=True)
        if r.returncode:
            return {"available": False, "why": f"{cc} could not build {SOURCE.name}: {r.stderr.strip()[:200]}"}
        a, b = cores[0], cores[-1]
        try:
            r = subprocess.run([exe, str(a), str(b), str(iterations)], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return {"available": False, "why": "the ping-pong did not finish within 120 s (host too loaded)"}
    if r.returncode:
        return {"available": False, "why": f"hwfloor failed: {r.stderr.strip()[:200]}"}
    vals = dict(line.split() for line in r.stdout.splitlines() if line.strip())
    return {"available": True, "rtt_ns": int(vals["rtt_ns_p50"]), "rtt_p99_ns": int(vals["rtt_ns_p99"]),
            "rtt_min_ns": int(vals["rtt_ns_min"]), "cores": [a, b], "iterations": iterations, "compiler": cc}
