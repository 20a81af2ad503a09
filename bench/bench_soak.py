"""Soak throughput and faults, measured in this run (issue: soak testing).

    python bench/bench_soak.py                 # 2000 idle trials + 300 under cpu:4, 64 CPUs (~5 min)
    python bench/bench_soak.py --trials 200    # a shorter idle run

Targets: at least 40 trials per second with 64 CPUs on an idle 2-core host (issue 15);
2000 trials with zero emulator faults; under cpu:4 load the report states the
share of kicks that exceed 5 ms. Prints the two summaries smpd itself prints,
then one line per run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from record import Record  # noqa: E402

NAME = f"benchs{os.getpid() % 100000}"


def smpd(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "smpd", *args, "--name", NAME], capture_output=True, text=True,
                       timeout=7200, env=dict(os.environ, COLUMNS="120"))
    if r.returncode:
        raise SystemExit(f"smpd {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--loaded-trials", type=int, default=300, help="0: no run under load")
    ap.add_argument("--cpus", type=int, default=64)
    ap.add_argument("--record", default=None, help="where the JSON record goes [bench/records/...]")
    args = ap.parse_args()
    from smpd.tools import soak

    smpd("up", "--cpus", str(args.cpus), "--watch", "adaptive")
    rows = []
    try:
        smpd("offline", f"1-{args.cpus - 1}")
        with tempfile.TemporaryDirectory() as d:
            for label, trials, load in (("idle", args.trials, None), ("cpu:4", args.loaded_trials, "cpu:4")):
                if trials == 0:
                    continue
                out = os.path.join(d, f"{label.replace(':', '')}.jsonl")
                extra = ["--host-load", load] if load else []
                print(smpd("soak", "--trials", str(trials), "--seed", "1", "--out", out, *extra))
                plan, records, _ = soak.read(out)
                rows.append((label, soak.summarize(plan, records), records))
    finally:
        smpd("down")
    print(f"{'host':<7}{'trials':>7}{'trials/s':>10}{'CPU_LOST':>10}{'respawns':>10}{'kicks':>8}"
          f"{'>5ms':>9}  kick rtt p50 / p99")
    rec = Record("bench_soak")
    for label, s, records in rows:
        rec.add(f"{args.cpus} CPUs, {label}: trials/s (over the trials' wall time)", "trials/s", [s["trials_per_s"]])
        rec.add(f"{args.cpus} CPUs, {label}: one trial (trial_ms of each)", "ms", [r["trial_ms"] for r in records])
        rec.add(f"{args.cpus} CPUs, {label}: the kexec of a trial (kexec_ms of each)", "ms",
                [r["kexec_ms"] for r in records])
    for label, s, _records in rows:
        k = s["kick_rtt_ns"]
        print(f"{label:<7}{s['trials']:>7}{s['trials_per_s']:>10.1f}{s['cpu_lost']:>10}{s['respawns']:>10}"
              f"{s['kicks']:>8}{100 * s['over_budget_share']:>8.2f}%  "
              f"{k.get('p50', 0) / 1e3:.1f} us / {k.get('p99', 0) / 1e3:.1f} us")
    rec.finish(args.record)


if __name__ == "__main__":
    main()
