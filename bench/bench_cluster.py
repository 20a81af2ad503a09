"""Soak throughput on one host vs `smpd soak --cluster` on Ray (issue: soak campaigns on Ray).

    python bench/bench_cluster.py                        # 3 runs of 200 trials per row (~6 min)
    python bench/bench_cluster.py --trials 100 --runs 1  # a quick look

Rows, in one run of this script on this host:

* single host: `smpd soak` on one 8-CPU machine (the reference);
* cluster 1 node x 1 slot: the same trials through Ray (a local test cluster of one
  raylet): what Ray costs per trial (target: under 10% fewer trials/s);
* cluster 2 nodes x 1 slot: two raylets on this same 2-core host, so two machines share
  its cores: the rate says what a second host's worth of slots adds when the cores are
  not there (on real hosts each node brings its own cores, and the rate adds up).

trials/s is over the wall time from the first trial's start to the last one's end (the
summary's "wall"), so machine bring-up and Ray's start are not in it; the total time of the
command is shown beside it. Each figure is the median of --runs runs, with min and max,
also written as a JSON record (bench/record.py; compare two with bench/compare.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from record import Record, check as check_record  # noqa: E402
import smpdrun  # noqa: E402
from smpd.tools import soak  # noqa: E402

NAME = f"benchc{secrets.token_hex(4)}"  # unpredictable: another user cannot squat it first
CPUS = 8


def smpd(*args: str, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    smpdrun.smpd(*args, name=NAME, timeout=timeout, columns=120)
    return time.perf_counter() - t0


class Cluster:
    def __init__(self, nodes: int):
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "raycluster.py"), str(nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(60)


def one_run(d: str, trials: int, n: int, address: str | None) -> tuple[float, float]:
    out = os.path.join(d, f"run{n}.jsonl")
    cluster = ["--cluster", address, "--cpus", str(CPUS)] if address else []
    total = smpd("soak", "--trials", str(trials), "--seed", "1", "--out", out, *cluster)
    plan, records, _ = soak.read(out)
    s = soak.summarize(plan, records)
    return trials / s["wall_s"], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--record", default=None, help="where the JSON record goes [bench/records/...]")
    args = ap.parse_args()
    check_record(args.record)  # before the run, not at its end
    rows = []
    n = 0
    with tempfile.TemporaryDirectory() as d:
        smpd("up", "--cpus", str(CPUS), "--watch", "adaptive")
        try:
            runs = [one_run(d, args.trials, n := n + 1, None) for _ in range(args.runs)]
        finally:
            smpd("down")
        rows.append(("single host", runs))
        for nodes in (1, 2):
            c = Cluster(nodes)
            try:
                runs = [one_run(d, args.trials, n := n + 1, c.address) for _ in range(args.runs)]
            finally:
                c.close()
            rows.append((f"cluster {nodes} node{'s' if nodes > 1 else ''} x 1 slot", runs))
    print(f"{args.trials} trials per run, {CPUS}-CPU machines, {args.runs} runs per row, on {os.cpu_count()} cores")
    rec = Record("bench_cluster")
    for label, runs in rows:
        rec.add(f"{label}: trials/s (over the trials' wall time)", "trials/s", [r for r, _ in runs])
        rec.add(f"{label}: whole command", "s", [t for _, t in runs])
    base = rec.median(f"{rows[0][0]}: trials/s (over the trials' wall time)")
    for label, _ in rows[1:]:
        rate = rec.median(f"{label}: trials/s (over the trials' wall time)")
        print(f"{label}: {rate / base:.2f}x the single host's trials/s (median / median)")
    rec.finish(args.record)


if __name__ == "__main__":
    main()
