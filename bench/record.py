"""A bench's record: every figure with its median, min, max and number of runs, and where it was
measured (the commit, the host), printed as a table and written as JSON beside it.

    rec = Record("bench_machine")
    rec.add("bring-up 64 CPUs (smpd up, wall)", "ms", [812.0, 790.3, 801.1])
    rec.finish()              # prints the table; writes bench/records/bench_machine-<commit>-<time>.json

`python bench/compare.py OLD.json NEW.json` puts two records side by side (bench/README.md).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "records")
sys.path.insert(0, os.path.dirname(HERE))  # (the benches put the checkout first too)

from smpd.errors import SmpdError  # noqa: E402
from smpd.host import files  # noqa: E402


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=HERE, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host() -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0], "hostname": platform.node()}


class Record:
    def __init__(self, bench: str):
        self.bench = bench
        self.figures: list[dict] = []
        self.started = time.time()

    def add(self, what: str, unit: str, samples: list[float]) -> None:
        """One figure from ``samples`` (one value per run): its median is the figure."""
        if not samples:
            return
        self.figures.append({"figure": what, "unit": unit, "median": statistics.median(samples),
                             "min": min(samples), "max": max(samples), "runs": len(samples)})

    def median(self, what: str) -> float:
        return next(f["median"] for f in self.figures if f["figure"] == what)

    def table(self) -> str:
        width = max([len(f["figure"]) for f in self.figures] + [6])
        lines = [f"{'figure':<{width}}  {'median':>11}  {'min':>11}  {'max':>11}  {'runs':>5}  unit"]
        for f in self.figures:
            lines.append(f"{f['figure']:<{width}}  {f['median']:>11.2f}  {f['min']:>11.2f}  {f['max']:>11.2f}  "
                         f"{f['runs']:>5}  {f['unit']}")
        return "\n".join(lines)

    def write(self, path: str | None = None) -> tuple[str | None, Exception | None]:
        """The record to ``path`` (None: bench/records/BENCH-COMMIT-TIME.json), written as any smpd
        output is (smpd.host.files: no link followed, no other user's file or FIFO written), or kept
        in $TMPDIR when that is refused now. Returns where it went (None: nowhere) and the refusal."""
        commit = _commit()
        if path is None:
            os.makedirs(RECORDS, exist_ok=True)
            path = os.path.join(RECORDS, f"{self.bench}-{commit[:12]}-{time.strftime('%Y%m%dT%H%M%S')}.json")
        data = json.dumps({"bench": self.bench, "commit": commit, "host": host(), "started": self.started,
                           "finished": time.time(), "figures": self.figures}, indent=1) + "\n"
        return files.write_output_or_keep(path, "--record", data.encode(), f"smpd-{self.bench}-record", "the record")

    def finish(self, path: str | None = None) -> str | None:
        """Print the table, write the record; a record refused at the end is kept in $TMPDIR and the
        bench exits 2 once it has said where (the table is printed whatever happens)."""
        print(self.table())
        where, refused = self.write(path)
        print(f"record: {where or 'none'}")
        if refused is not None:
            print(f"Error: {refused}", file=sys.stderr)
            sys.exit(2)
        return where


def check(path: str | None) -> None:
    """Before a bench runs: refuse (exit 2, one line) a --record path its end would refuse (another
    user's file or link, a FIFO, a directory that does not exist or is not ours to write)."""
    if path is None:
        return
    try:
        files.check_output(path, "--record")
    except SmpdError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
