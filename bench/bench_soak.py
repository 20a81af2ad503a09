"""Soak throughput and faults, measured in this run (issue: soak testing).

    python bench/bench_soak.py                 # 2000 idle trials + 300 under cpu:4, 64 CPUs (~5 min)
    python bench/bench_soak.py --trials 200    # a shorter idle run

Targets: at least 40 trials per second with 64 CPUs on an idle 2-core host (issue 15);
2000 trials with zero emulator faults; under cpu:4 load the report states the
share of kicks that exceed 5 ms. Prints the two summaries smpd itself prints,
then one line per run.

Where a trial's time goes, per run: the host CPU each side used over the whole `smpd soak`
(the coordinator and the CPU processes that lived through it from /proc/PID/schedstat, the
soak client from this process's children's rusage), against the host's cores x that
command's wall time, each divided by its trials. And the host's cold step: one fixed piece
of Python (~50 calls, about what a CPU process runs between two waits) timed warm, back to
back, and right after a 5 ms sleep, as a CPU process runs after each wake-up; measured
before the machine is up. Their ratio is what running right after a sleep costs here:
caches gone cold, the core's or the vCPU's own wake-up (the probe cannot tell them apart),
and whatever else the host ran meanwhile.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from record import Record, check as check_record  # noqa: E402
import smpdrun  # noqa: E402
from smpd.host import trust  # noqa: E402
from smpd.host.proc import cpu_time_ns  # noqa: E402
from smpd.tools import lifecycle  # noqa: E402

NAME = f"benchs{secrets.token_hex(4)}"  # unpredictable: another user cannot squat it first


def smpd(*args: str) -> str:
    return smpdrun.smpd(*args, name=NAME, timeout=7200, columns=120).stdout


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Step:
    """A fixed piece of Python of a CPU process's step's size: an object, a dict, a memoryview of a
    page, ~50 calls."""

    def __init__(self):
        self.d = {"state": 1, "hotplug": 2}
        self.u32 = memoryview(bytearray(4096)).cast("I")

    def word(self, key: str) -> int:
        return self.d.get(key, 0) + self.u32[3]

    def step(self) -> int:
        return sum(self.word(k) for _ in range(8) for k in ("state", "hotplug", "gone"))


def cold_step(runs: int = 300, sleep_s: float = 0.005) -> tuple[float, float]:
    """Median us of ``_Step.step()`` back to back (warm), and right after a ``sleep_s`` sleep."""
    s = _Step()

    def one() -> float:
        t0 = time.thread_time_ns()
        s.step()
        return (time.thread_time_ns() - t0) / 1e3

    warm = [one() for _ in range(runs)]
    cold = []
    for _ in range(runs):
        time.sleep(sleep_s)
        cold.append(one())
    return statistics.median(warm), statistics.median(cold)


class _HostCpu:
    """The host CPU the bench's machine's processes use over one soak: the coordinator and the CPU
    processes, each known by its pid and start time, so that a CPU process replaced mid-run (and
    a pid recycled since) is left out, not counted as another's."""

    def __init__(self):
        live = lifecycle.require(NAME)
        self.coord = live.pid
        pids = [live.pid, *(c["pid"] for c in live.request("status")["cpus"][1:])]
        self.at = {p: (trust.start_ticks(p), cpu_time_ns(p)) for p in pids}

    def used(self) -> tuple[int, int, int]:
        """(ns of the coordinator, ns of the CPU processes, how many CPU processes lived through)."""
        coord = cpus = lived = 0
        for p, (ticks, before) in self.at.items():
            now = cpu_time_ns(p)
            if before is None or now is None or trust.start_ticks(p) != ticks:
                continue
            if p == self.coord:
                coord = now - before
            else:
                cpus, lived = cpus + now - before, lived + 1
        return coord, cpus, lived


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--loaded-trials", type=int, default=300, help="0: no run under load")
    ap.add_argument("--cpus", type=int, default=64)
    ap.add_argument("--record", default=None, help="where the JSON record goes [bench/records/...]")
    args = ap.parse_args()
    check_record(args.record)  # before the run, not at its end
    from smpd.tools import soak

    warm_us, cold_us = cold_step()
    smpd("up", "--cpus", str(args.cpus), "--watch", "adaptive")
    rows = []
    try:
        smpd("offline", f"1-{args.cpus - 1}")
        cores = len(os.sched_getaffinity(0))
        with tempfile.TemporaryDirectory() as d:
            for label, trials, load in (("idle", args.trials, None), ("cpu:4", args.loaded_trials, "cpu:4")):
                if trials == 0:
                    continue
                out = os.path.join(d, f"{label.replace(':', '')}.jsonl")
                extra = ["--host-load", load] if load else []
                host = _HostCpu()  # anew for each run: a CPU process replaced in the last is in this one
                client, t0 = _children_cpu_s(), time.monotonic()
                print(smpd("soak", "--trials", str(trials), "--seed", "1", "--out", out, *extra))
                wall, client = time.monotonic() - t0, _children_cpu_s() - client
                coord_ns, cpus_ns, lived = host.used()
                plan, records, _ = soak.read(out)
                n = len(records)
                # Per trial, ms, all over the same span, the whole `smpd soak` (its start, its idle-kick
                # calibration, its work between trials and its summary included): the coordinator, the
                # CPU processes that lived through it, the client, and the host's cores x that wall time.
                cost = {"coordinator": coord_ns / 1e6 / n, "cpus": cpus_ns / 1e6 / n, "client": client * 1e3 / n,
                        "capacity": cores * wall * 1e3 / n, "lived": lived}
                rows.append((label, soak.summarize(plan, records), records, cost))
    finally:
        smpd("down")
    print(f"{'host':<7}{'trials':>7}{'trials/s':>10}{'CPU_LOST':>10}{'respawns':>10}{'kicks':>8}"
          f"{'>5ms':>9}  kick rtt p50 / p99")
    rec = Record("bench_soak")
    for label, s, records, cost in rows:
        rec.add(f"{args.cpus} CPUs, {label}: trials/s (over the trials' wall time)", "trials/s", [s["trials_per_s"]])
        rec.add(f"{args.cpus} CPUs, {label}: one trial (trial_ms of each)", "ms", [r["trial_ms"] for r in records])
        rec.add(f"{args.cpus} CPUs, {label}: the kexec of a trial (kexec_ms of each)", "ms",
                [r["kexec_ms"] for r in records])
        client = "the soak client (rusage)" if label == "idle" else "the soak client and the load it made (rusage)"
        for who, what in (("coordinator", "the coordinator (schedstat)"),
                          ("cpus", "the CPU processes that lived through it (schedstat)"),
                          ("client", client), ("capacity", "the host's cores x the soak command's wall time")):
            rec.add(f"{args.cpus} CPUs, {label}: host CPU per trial, {what}", "ms", [round(cost[who], 2)])
        rec.add(f"{args.cpus} CPUs, {label}: CPU processes that lived through the soak command", "processes",
                [cost["lived"]])
    rec.add("a fixed Python step (~50 calls), warm: back to back (thread CPU time)", "us", [warm_us])
    rec.add("the same step right after a 5 ms sleep, as a CPU process runs after a wake-up", "us", [cold_us])
    for label, s, _records, _cost in rows:
        k = s["kick_rtt_ns"]
        print(f"{label:<7}{s['trials']:>7}{s['trials_per_s']:>10.1f}{s['cpu_lost']:>10}{s['respawns']:>10}"
              f"{s['kicks']:>8}{100 * s['over_budget_share']:>8.2f}%  "
              f"{k.get('p50', 0) / 1e3:.1f} us / {k.get('p99', 0) / 1e3:.1f} us")
    print("host CPU per trial over the whole `smpd soak`: where a trial's time goes (each side's CPU against "
          "the host's cores x the command's wall time)")
    for label, _s, _records, c in rows:
        print(f"  {label:<7} coordinator {c['coordinator']:.1f} ms, CPU processes {c['cpus']:.1f} ms ({c['lived']} "
              f"lived through it), client {'' if label == 'idle' else 'and its load '}{c['client']:.1f} ms; of "
              f"{c['capacity']:.1f} ms of the host's cores")
    print(f"a CPU-process-sized step of Python: {warm_us:.1f} us warm, {cold_us:.1f} us after a 5 ms sleep "
          f"({cold_us / warm_us:.1f}x)")
    rec.finish(args.record)


if __name__ == "__main__":
    main()
