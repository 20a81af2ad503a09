"""Benchmarks of the machine itself (issue: the machine). Prints medians measured in this run.

    python bench/bench_machine.py                # everything, a few minutes on a 2-core host
    python bench/bench_machine.py --quick        # fewer repeats, no 1024-CPU bring-up
    python bench/bench_machine.py --sizes 256,1024,2048,4096 --only bringup --config mem.toml

Every figure is the median of its runs, with min and max; the table is also written as a
JSON record (bench/record.py; compare two with bench/compare.py).

What it measures, and the target it is read against:

* bring-up: `smpd up` of 64, 256 and 1024 CPUs (--sizes), wall time of the command and the
  coordinator's own, from its segment's creation to every CPU online; where its host CPU went (a
  CPU process's page faults and CPU, medians over the machine's; the coordinator's; the
  template's: the copy-on-write faults of the CPU processes are most of it); then `smpd status`
  (the grid of many CPUs), `smpd status --json` (every CPU in full), `smpd offline` of every
  CPU but 0 (each CPU's first park in mwait_play_dead(): no target, but it was quadratic once),
  `smpd down` of that machine, its CPUs parked (before 8e79f8c, online: records of the two are not
  the same measure of down), then `smpd kexec` of a second machine of the size, parked alike (every
  parked CPU kicked, then brought up by the new kernel: each CPU process's first Python since its
  fork, its copy-on-write faults; with the host's kdamond CPU meanwhile; no target) (targets,
  issue 15: 4096 CPUs up under 10 s, per CPU within 1.3x of 256's; status under 0.5 s, down
  under 3 s);
* idle cost: host CPU used by a 64-CPU machine with 63 CPUs parked in
  mwait_play_dead(), per watch strategy, over a fixed window (target: adaptive
  under 2% of one core; spin burns whatever cores there are, by design);
* memory: unique set size (USS) per CPU process (target: under 5 MB);
* the hot path: one bus write to an unmonitored line, to a monitored line of a
  spinning CPU, and of a sleeping one (the watch loop itself is timed by what it
  does, the kick's round trip: bench/bench_kick.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from record import Record, check as check_record  # noqa: E402
import smpdrun  # noqa: E402
from smpd.errors import OUTCOME_NOT_CLEAN  # noqa: E402
from smpd.host.proc import cpu_time_ns, stat_fields  # noqa: E402
from smpd.machine import layout as L  # noqa: E402
from smpd.tools import lifecycle  # noqa: E402

NAME = f"bench{secrets.token_hex(4)}"  # unpredictable: another user cannot squat it first


def smpd(*args: str, ok=(0,)) -> str:
    return smpdrun.smpd(*args, name=NAME, ok=ok, timeout=600).stdout


def ours() -> list[psutil.Process]:
    m = lifecycle.require(NAME).request("status")
    pids = [m["machine"]["pid"], *(c["pid"] for c in m["cpus"][1:])]
    return [psutil.Process(p) for p in pids]


def _kdamond_s() -> float | None:
    """Host CPU seconds used so far by the kernel's DAMON threads (kdamond.N), None without any.

    DAMON (physical-address mode) walks the reverse map of each page it samples; a page the
    coordinator's N CPU processes share costs it O(N) per walk, so on a host running it the
    kernel's own share of a bring-up grows as N^2, outside smpd's processes."""
    total, seen = 0.0, False
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("kdamond"):
            ns = cpu_time_ns(p.pid)
            if ns is not None:
                total += ns / 1e9
                seen = True
    return total if seen else None


def _faults_cpu_ns(pid: int) -> tuple[int, int] | None:
    """A process's page faults (minflt) and host CPU (ns) so far; None once it is gone."""
    fields, ns = stat_fields(pid), cpu_time_ns(pid)
    return None if fields is None or ns is None else (int(fields[7]), ns)  # [7]: minflt ([0] is field 3)


def bringup_costs() -> dict[str, float]:
    """Where a bring-up's host CPU went, read right after it (before any other command): each CPU
    process's page faults and CPU (medians over the machine's), the coordinator's CPU, and the
    template's (the coordinator's reaped children: the template alone at this point)."""
    m = lifecycle.require(NAME).request("status")
    faults, cpu_ms = [], []
    for c in m["cpus"][1:]:
        now = _faults_cpu_ns(c["pid"])
        if now is not None:
            faults.append(now[0])
            cpu_ms.append(now[1] / 1e6)
    coord = stat_fields(m["machine"]["pid"])  # [11:13] utime, stime; [13:15] the reaped children's
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    return {"faults": statistics.median(faults), "cpu_ms": statistics.median(cpu_ms),
            "coordinator_ms": (int(coord[11]) + int(coord[12])) * tick_ms,
            "template_ms": (int(coord[13]) + int(coord[14])) * tick_ms}


def kexec_costs(n: int) -> dict[str, float]:
    """`smpd kexec` of the machine, its CPUs 1..n-1 parked: the command's wall time, the new kernel's
    smp_init() (INIT, SIPI to each AP, from the kexec's timeline: each AP's process runs Python for
    its start in the new generation, the first time since its fork: copy-on-write faults), and what
    each CPU process (medians over the machine's) and the host's kdamond spent during it."""
    pids = [c["pid"] for c in lifecycle.require(NAME).request("status")["cpus"][1:]]
    before = {p: _faults_cpu_ns(p) for p in pids}
    k0 = _kdamond_s()
    t0 = time.perf_counter()
    report = json.loads(smpd("kexec", "--json", ok=(0, OUTCOME_NOT_CLEAN)))  # 3: an outcome, not a failure
    out = {"wall_ms": (time.perf_counter() - t0) * 1e3}
    if report["outcome"] != "CLEAN":  # timed all the same; said, as a 6.6 kexec of an idle machine should be CLEAN
        print(f"kexec of {n} CPUs: {report['outcome']}: {report['evidence']}", file=sys.stderr)
    if k0 is not None:
        out["kdamond_s"] = _kdamond_s() - k0
    faults, cpu_ms = [], []
    for p, then in before.items():
        now = _faults_cpu_ns(p)
        if then is not None and now is not None:
            faults.append(now[0] - then[0])
            cpu_ms.append((now[1] - then[1]) / 1e6)
    out.update(faults=statistics.median(faults), cpu_ms=statistics.median(cpu_ms))
    out["smp_init_ms"] = next(ph["dur_us"] for ph in report["phases"] if "smp_init()" in ph["name"]) / 1e3
    return out


def bench_bringup(rec: Record, sizes: list[int], repeats: int, up_args: list[str]) -> None:
    for n in sizes:
        walls, coords, statuses, jsons, offlines, downs, damon = [], [], [], [], [], [], []
        costs: dict[str, list[float]] = {}
        kexecs: dict[str, list[float]] = {}
        for _ in range(repeats if n <= 256 else 1):
            k0 = _kdamond_s()
            t0 = time.perf_counter()
            smpd("up", "--cpus", str(n), "--watch", "adaptive", *up_args)
            walls.append((time.perf_counter() - t0) * 1e3)
            if k0 is not None:
                damon.append(_kdamond_s() - k0)
            for k, v in bringup_costs().items():
                costs.setdefault(k, []).append(v)
            coords.append(lifecycle.require(NAME).request("status")["machine"]["bringup_ms"])
            for _ in range(3):
                for args, times in ((("status",), statuses), (("status", "--json"), jsons)):
                    t0 = time.perf_counter()
                    smpd(*args)
                    times.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            smpd("offline", f"1-{n - 1}")  # every CPU's first park (a resume plan each: a11e646)
            offlines.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            smpd("down")
            downs.append((time.perf_counter() - t0) * 1e3)
            # The kexec on a machine of its own: after one, each CPU process has ~280 more pages of its
            # own to free at its exit, and down would no longer be timed as its earlier records were.
            smpd("up", "--cpus", str(n), "--watch", "adaptive", *up_args)
            smpd("offline", f"1-{n - 1}")
            for k, v in kexec_costs(n).items():
                kexecs.setdefault(k, []).append(v)
            smpd("down")
        rec.add(f"bring-up {n} CPUs (smpd up, wall)", "ms", walls)
        rec.add(f"bring-up {n} CPUs, per CPU (smpd up, wall)", "ms/CPU", [w / n for w in walls])
        rec.add(f"bring-up {n} CPUs (coordinator: segment created to all online)", "ms", coords)
        rec.add(f"bring-up {n} CPUs: a CPU process's page faults once online (median of its CPUs)", "faults",
                costs["faults"])
        rec.add(f"bring-up {n} CPUs: a CPU process's host CPU once online (median of its CPUs)", "ms",
                costs["cpu_ms"])
        rec.add(f"bring-up {n} CPUs: the coordinator's host CPU, from its start", "ms", costs["coordinator_ms"])
        rec.add(f"bring-up {n} CPUs: the template's host CPU (it forks every CPU process)", "ms",
                costs["template_ms"])
        rec.add(f"status {n} CPUs (smpd status, wall)", "ms", statuses)
        rec.add(f"status {n} CPUs, every CPU in full (smpd status --json, wall)", "ms", jsons)
        rec.add(f"offline {n - 1} CPUs (smpd offline 1-{n - 1}, wall)", "ms", offlines)
        rec.add(f"kexec of {n} CPUs, {n - 1} parked (smpd kexec, wall)", "ms", kexecs["wall_ms"])
        rec.add(f"kexec of {n} CPUs: the new kernel's INIT, SIPI to each AP (smp_init(), its timeline)", "ms",
                kexecs["smp_init_ms"])
        rec.add(f"kexec of {n} CPUs: a CPU process's host CPU during it (median of its CPUs)", "ms",
                kexecs["cpu_ms"])
        rec.add(f"kexec of {n} CPUs: a CPU process's page faults during it (median of its CPUs)", "faults",
                kexecs["faults"])
        if "kdamond_s" in kexecs:
            rec.add(f"host kdamond CPU during kexec {n} (not smpd's)", "s", kexecs["kdamond_s"])
        rec.add(f"down {n} CPUs (smpd down, wall)", "ms", downs)
        if damon:
            rec.add(f"host kdamond CPU during bring-up {n} (not smpd's)", "s", damon)


def bench_idle(rec: Record, watch: str, window_s: float) -> None:
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
        rec.add(f"host CPU, 64-CPU machine, 63 parked, watch={watch}", "% of one core", [100 * used / elapsed])
        if watch == "adaptive":
            rec.add("USS per CPU process (of the 63)", "MiB", [p.memory_full_info().uss / 2**20 for p in procs[1:]])
            rec.add("USS of the coordinator", "MiB", [procs[0].memory_full_info().uss / 2**20])
    finally:
        smpd("down")


def bench_hot_path(rec: Record, n: int, repeats: int) -> None:
    """Bus writes from this process (a real writer on the segment, like a DMA engine): each run
    times ``n`` writes (n/10 to a monitored line) and gives one sample, ns per write."""
    from smpd.host import names
    from smpd.machine.bus import Bus
    from smpd.machine.segment import Segment

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
            plain, monitored = [], []
            for _ in range(repeats):
                if watch == "spin":
                    t0 = time.perf_counter_ns()
                    for _ in range(n):
                        bus.write(other, payload)
                    plain.append((time.perf_counter_ns() - t0) / n)
                t0 = time.perf_counter_ns()
                for _ in range(n // 10):
                    bus.write(md, payload)
                monitored.append((time.perf_counter_ns() - t0) / (n // 10))
            rec.add("bus write, unmonitored line", "ns", plain)
            rec.add(f"bus write, monitored line, CPU watch={watch}", "ns", monitored)
        finally:
            del bus
            seg.close()
            smpd("down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats; skip 1024 CPUs")
    ap.add_argument("--sizes", default=None, help="bring-up sizes, comma-separated [64,256,1024]")
    ap.add_argument("--only", choices=("bringup", "idle", "hotpath"), default=None)
    ap.add_argument("--window", type=float, default=5.0, help="seconds of idle-cost sampling (default 5)")
    ap.add_argument("--record", default=None, help="where the JSON record goes [bench/records/...]")
    ap.add_argument("--config", default=None,
                    help="a config for `smpd up` (e.g. [host] memory_share = 0.85 for 4096 CPUs on 24 GiB)")
    args = ap.parse_args()
    check_record(args.record)  # before the run, not at its end
    repeats = 3 if args.quick else 5
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [64, 256] if args.quick else [64, 256, 1024]
    print(f"host: {psutil.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"python {sys.version.split()[0]}", flush=True)
    rec = Record("bench_machine")
    try:
        if args.only in (None, "bringup"):
            bench_bringup(rec, sizes, repeats, ["--config", args.config] if args.config else [])
        if args.only in (None, "idle"):
            bench_idle(rec, "adaptive", args.window)
            bench_idle(rec, "spin", args.window)
        if args.only in (None, "hotpath"):
            bench_hot_path(rec, 20_000 if args.quick else 100_000, repeats)
    finally:
        lifecycle.down(NAME)
    rec.finish(args.record)


if __name__ == "__main__":
    main()
