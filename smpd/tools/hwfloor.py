"""The host's own floors, measured in the same run: a cache-line round trip between two cores,
the same round trip to a sleeping process (a signal wake-up), for the adaptive watch, and N
sleeping processes woken one after the other on one core, for a whole kick of N sleeping CPUs.

smpd/tools/hwfloor.c is compiled on the fly when a C compiler exists, into a fresh
private directory (mkdtemp: 0700, ours, made for this run) and run from there; the
directory goes when the measurement is done. No cache: a binary that smpd runs,
often as root, must be one it has just built where nobody else can write (a cache
under $XDG_CACHE_HOME or ~ may be another user's to plant a file in). The build
costs a fraction of a second per benchmark. Without a compiler the floor is
reported unavailable, with the reason, and ratios are left out rather than
guessed. The measuring process dies with us.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from smpd.host.proc import die_with_parent

SOURCE = Path(__file__).resolve().parent / "hwfloor.c"  # ships in the package: a wheel measures too


def measure(iterations: int = 200_000, wake: bool = False, sequence: int = 0, pause_us: int = 2000) -> dict:
    """The host's floor: a cache line's round trip between two cores (hwfloor.c), or with
    ``wake`` the same round trip to a process asleep in sigwaitinfo() woken by SIGURG, what an
    adaptive CPU's kick adds on the host (cold: each round lets the sleeper settle for 300 us;
    a reference, not a bound), or with ``sequence`` N the time to wake N such processes one
    after the other, all on one core, each asleep ``pause_us`` first (hwfloor.c wakeseq: the
    host's own whole kick of N sleeping CPUs; rtt_ns is that whole time). A floor that cannot be measured (no
    compiler, a full $TMPDIR) is reported unavailable, with why: it must never cost the run it
    is compared with."""
    try:
        return _measure(iterations, wake, sequence, pause_us)
    except OSError as err:
        return {"available": False, "why": f"could not build or run hwfloor: {err}"}


def build(private: str) -> tuple[str | None, str]:
    """hwfloor.c built into ``private``, a directory of ours that nobody else can write:
    (the executable, the compiler), or (None, why not)."""
    if not SOURCE.is_file():
        return None, f"{SOURCE} not found (it ships with the smpd repository)"
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    exe = os.path.join(private, "hwfloor")
    r = subprocess.run([cc, "-O2", "-pthread", "-o", exe, str(SOURCE)], capture_output=True, text=True, cwd=private)
    if r.returncode:
        return None, f"{cc} could not build {SOURCE.name}: {r.stderr.strip()[:200]}"
    return exe, cc


def _measure(iterations: int, wake: bool, sequence: int, pause_us: int) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 and not sequence:
        return {"available": False, "why": "needs two host cores; this process may use one"}
    with tempfile.TemporaryDirectory(prefix="smpd-hwfloor-") as private:  # 0700, ours, new
        exe, cc = build(private)
        if exe is None:
            return {"available": False, "why": cc}
        a, b = cores[0], cores[-1]
        argv = ([exe, "wakeseq", str(a), str(sequence), str(iterations), str(pause_us)] if sequence else
                [exe, *(["wake"] if wake else []), str(a), str(b), str(iterations)])
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            return {"available": False, "why": "the ping-pong did not finish within 120 s (host too loaded)"}
    if r.returncode:
        return {"available": False, "why": f"hwfloor failed: {r.stderr.strip()[:200]}"}
    vals = dict(line.split() for line in r.stdout.splitlines() if line.strip())
    return {"available": True, "rtt_ns": int(vals["rtt_ns_p50"]), "rtt_p99_ns": int(vals["rtt_ns_p99"]),
            "rtt_min_ns": int(vals["rtt_ns_min"]), "cores": [a] if sequence else [a, b], "iterations": iterations,
            "compiler": cc, **({"sequence": sequence, "pause_us": pause_us} if sequence else {})}
