"""Benchmarks of the machine itself (issue: the machine). Prints medians measured in this run.

    python bench/bench_machine.py                # everything, a few minutes on a 2-core host
    python bench/bench_machine.py --quick        # fewer repeats, no 1024-CPU bring-up

What it measures, and the target it is read against:

* bring-up: `smpd up` of 64, 256 and 1024 CPUs, wall time of the command and the
  coordinator's own SIPI-to-online time (target: 64 CPUs under 1 s; 1024 come up);
* idle cost: host CPU used by a 64-CPU machine with 63 CPUs parked in
  mwait_play_dead(), per watch strategy, over a fixed window (target: adaptive
  under 2% of one core; spin burns whatever cores there are, by design);
* memory: unique set size (USS) per CPU process (target: under 5 MB);
* the hot path: one bus write to an unmonitored line, to a monitored line of a
  spinning CPU, and of a sleeping one; the watch loop's cost per iteration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from smpd.machine import layout as L
from smpd.tools import lifecycle  # noqa: E402

NAME = f"bench{os.getpid() % 100000}"


def smpd(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "smpd", *args, "--name", NAME],
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"smpd {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def ours() -> list[psutil.Process]:
    m = lifecycle.require(NAME).request("status")
    pids = [m["machine"]["pid"], *(c["pid"] for c in m["cpus"][1:])]
    return [psutil.Process(p) for p in pids]


def bench_bringup(sizes: list[int], repeats: int) -> list[tuple]:
    rows = []
    for n in sizes:
        walls, coords = [], []
        for _ in range(repeats if n <= 256 else 1):
            t0 = time.perf_counter()
            smpd("up", "--cpus", str(n), "--watch", "adaptive")
            walls.append(time.perf_counter() - t0)
            coords.append(lifecycle.require(NAME).request("status")["machine"]["bringup_ms"])
            smpd("down")
        rows.append((f"bring-up {n} CPUs (smpd up, wall)", statistics.median(walls) * 1e3, "ms", len(walls)))
        rows.append((f"bring-up {n} CPUs (coordinator: segment+fork+SIPI)", statistics.median(coords), "ms",
                     len(coords)))
    return rows


def bench_idle(watch: str, window_s: float) -> list[tuple]:
    smpd("up", "--cpus", "64", "--watch", watch)
    try:
        smpd("offline", "1-63")
        procs = ours()
        time.sleep(0.5)  # let adaptive CPUs use up their spin budget and sleep
        t0 = time.perf_counter()
        c0 = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(window_s)
        c1 = [sum(p.cpu_times()[:2]) for p in procs]
        elapsed = time.perf_counter() - t0
        used = sum(c1) - sum(c0)
        rows = [(f"host CPU, 64-CPU machine, 63 parked, watch={watch}", 100 * used / elapsed,
                 "% of one core", 1)]
        if watch == "adaptive":
            uss = [p.memory_full_info().uss for p in procs[1:]]
            rows.append(("USS per CPU process (median of 63)", statistics.median(uss) / 2**20, "MiB", len(uss)))
            rows.append(("USS of the coordinator", procs[0].memory_full_info().uss / 2**20, "MiB", 1))
        return rows
    finally:
        smpd("down")


def bench_hot_path(n: int) -> list[tuple]:
    """Bus writes from this process (a real writer on the segment, like a DMA engine)."""
    from smpd.host import names
    from smpd.machine.bus import Bus
    from smpd.machine.segment import Segment

    rows = []
    for watch in ("spin", "adaptive"):
        smpd("up", "--cpus", "2", "--watch", watch)
        seg = Segment.attach(names.segment(NAME))
        try:
            smpd("offline", "1")
            bus = Bus(seg)
            geo = seg.geo
            md = geo.mwait_cpu_dead_addr(1)
            other = geo.thread_info_addr(1)
            payload = (L.CPUDEAD_MWAIT_WAIT).to_bytes(4, "little")
            if watch == "spin":
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    bus.write(other, payload)
                rows.append(("bus write, unmonitored line", (time.perf_counter_ns() - t0) / n, "ns", n))
            t0 = time.perf_counter_ns()
            for _ in range(n // 10):
                bus.write(md, payload)
            rows.append((f"bus write, monitored line, CPU watch={watch}",
                         (time.perf_counter_ns() - t0) / (n // 10), "ns", n // 10))
        finally:
            del bus
            seg.close()
            smpd("down")
    # The watch loop's body, `u32[i] == 0` on a segment-like memoryview, timed alone.
    import mmap
    import timeit

    mm = mmap.mmap(-1, 4096)
    u32 = memoryview(mm).cast("I")
    per = min(timeit.repeat("u32[5] == 0", globals={"u32": u32}, number=n * 10, repeat=5)) / (n * 10)
    rows.append(("watch loop body (one load, one compare)", per * 1e9, "ns", n * 10))
    u32.release()
    mm.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats; skip 1024 CPUs")
    ap.add_argument("--window", type=float, default=5.0, help="seconds of idle-cost sampling (default 5)")
    args = ap.parse_args()
    repeats = 3 if args.quick else 5
    sizes = [64, 256] if args.quick else [64, 256, 1024]
    print(f"host: {psutil.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"python {sys.version.split()[0]}", flush=True)
    rows = []
    try:
        rows += bench_bringup(sizes, repeats)
        rows += bench_idle("adaptive", args.window)
        rows += bench_idle("spin", args.window)
        rows += bench_hot_path(20_000 if args.quick else 100_000)
    finally:
        lifecycle.down(NAME)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'median':>10}  unit            runs")
    for what, value, unit, runs in rows:
        print(f"{what:<{width}}  {value:>10.1f}  {unit:<15} {runs}")


if __name__ == "__main__":
    main()
