"""The kick-latency comparison a reader of the README wants, as one table, measured in this run.

    python bench/bench_kick.py            # a few minutes on a 2-core host
    python bench/bench_kick.py --quick    # fewer rounds

Rows: hot path (c, python) x watch strategy (spin, adaptive) x targets (1, 7,
63 parked CPUs) x host (idle, loaded by two busy-loop processes), and `adaptive@one`: the
adaptive x63 idle row on a machine whose every process is on one host core (`smpd up --pin
one`: on a VM no sleeping CPU's wake-up waits for the other, idle vCPU, which is where the
unpinned whole kick's worst cases come from). Each row is
one `smpd bench kick` run on a fresh machine of targets+1 CPUs; spin with one
target is pinned (--pin spread: the CPU and the coordinator on different cores).
Every latency is also shown as a ratio to the C cache-line ping-pong floor of
the same run. "whole kick" is `smpd kick` of every target, WHOLE times (with a
`smpd reset` between): the median and the worst, and how many CPUs were stuck. The idle
adaptive rows of more than one target also kick WHOLE_PAUSED more times, each PAUSE_S after
the last reset (printed below the table): those right after a reset move with the host more.
They also bring up FIRST fresh machines of as many CPUs, park them, and kick each once,
FIRST_ASLEEP_S after parking: the first kick, what a kexec right after bring-up finds (no kick,
bench or reset before it has touched the pages a CPU's answer reads).

What each floor is. The cache-line floor (hwfloor.c) is the host's coherence floor: ping
goes to the other core, pong comes back, four moves of two lines (each store takes its
line from the core that reads it, each read brings it over). It is also measured on the two
words of one line, alternated with the first in the same run: the kick's own layout, and on
the development host the cheaper conversation of the two (by 20-50 ns), so the kick's ratio
to it is the stricter. A spin kick (compiled path)
makes the same four moves of one line, struct mwait_cpu_dead's: (1) the coordinator's
store to .control takes the line from the CPU; (2) the CPU's spin loop, which watches
.control as MWAIT watches its line, reads it back and sees the change; (3) its store to
.status takes the line again; (4) the coordinator's poll of .status reads it back.
Between (2) and (3) stands only a compare: the CPU's looks at its `wake` word (did an
interrupt or IPI come with the kick?) and at the page tags of its resume (lines in its own
cache, which no bus write touches: smpd.machine.layout) come in every round of its spin,
right after its load of .control, so they are made while the line is on its way (loaded
after it in program order, they see every write before the kick; _hotpath.c spin()). The coordinator, when the CPU was awake (its
`sleeping` word, read before the kick's first instant), looks at .status right after its
store, as the floor's ping does (for up to one udelay, 5 us), and only then does the rest of the
bus's rule: a fence, a load of the line directory's entry (written by the CPU at its
MONITOR), the store of the CPU's WRITE byte (`mon_write`, the bus's line of that CPU: one
more move), a fence for it, and a load of `sleeping`. Done first, that rule had cost the
spin kick ~30 ns of its round trip here; a sleeping CPU still gets it first (its
doorbell). After its status store, off the round trip, the CPU stamps kick_seen_ns (a
clock read, ~30 ns: before the store, it had cost as much again), takes its WRITE byte and
leaves the directory. That is the emulator's conversation: a real parked CPU has flushed the line (clflush() before
__monitor()) and is woken by the monitor hardware seeing the store, then leaves the
C-state mwait_play_dead() asked for, which neither floor includes. An adaptive CPU asleep in sigwaitinfo() pays a process wake-up besides (the bus rings
its doorbell, SIGURG): the wake-up floor is the same round trip to a process that sleeps
(hwfloor.c wake, cold: 300 us idle first, the two on different cores). It is a reference,
not a bound: a wake-up on a core that is not idle yet, or a hand-off on the same core, beats
it. The kernel kicks one CPU at a time (for each offline CPU: store, then up to 1000 rounds
of udelay(5) for its status), so a whole kick costs about the sum of its CPUs' round trips.
Its floor (hwfloor.c wakeseq, measured in the idle rows) is the host's own version of that:
as many C processes as targets asleep in sigwaitinfo(), woken one after the other by SIGURG
while the waker polls each one's answer and yields its core between looks, all on one host
core (a hand-off there is the cheapest wake-up; unpinned, the host spreads them, and one
woken on the other, idle vCPU costs several times more; after a whole kick, 55-63 of smpd's
63 CPU processes had last run on the kicker's core, by /proc/PID/stat). Its sleepers sleep
2 ms before each round, about what a kick right after `smpd reset` finds (the whole kicks
here), and 200 ms in a second measure (colder: about twice the time here). A third measure
pins nothing (2 ms asleep): the host's scheduler places the C processes as it places a
default (`--pin none`) machine's. For the unpinned rows it is a reference, not a bound, as
the one-core floors are for `adaptive@one`: freshly forked, the C sleepers are spread over
the cores, and many wake-ups then cross to the other, idle vCPU, while smpd's CPU processes,
after their first kicks, mostly sit on the kicker's core (above). Here it came out 0.8-1.8 ms
for 63 sleepers, 2-5x the one-core one, and smpd's unpinned whole kick at 0.4-1.0x of it. Not under load:
there the pinned C processes share their one core with a busy loop, which each yield hands a
whole slice (6 ms for 63, once), a cost smpd's unpinned processes do not pay. A CPU its doorbell wakes stamps
when its process runs again (woke_ns, as sigwaitinfo() returns the doorbell): "to running" sums,
in each whole kick, those CPUs' write -> running again, mostly the host's (signal delivery,
the wake-up, its scheduler handing a core over; also the bus's rule and the kicker's udelay on
the core the CPU may need). The kernel kicks one CPU at a time, so in each whole kick these
intervals do not overlap: their sum is part of that kick. The adaptive rows of one
target run 2-CPU machines, which fit a 2-core host: their CPUs spin 50 us after each re-park
([watch] spin_budget_us = "auto") and most of their kicks find them spinning, not asleep.

Read against the issue's targets: spin, one target, pinned, idle host: round-trip
p50 within 1.3x of the floor (the "beside" column is the steadier reading: each ~50 ms stretch
of kicks against the floor measured on its two sides, as the host moves it); adaptive, 63 targets: the whole kick's worst of 20
under 5 ms and its median under 1 ms, zero stuck (those come from `smpd kick`).
Every figure also goes to a JSON record (bench/record.py; compare with bench/compare.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from record import Record, check as check_record  # noqa: E402
import smpdrun  # noqa: E402

NAME = f"benchk{secrets.token_hex(4)}"  # unpredictable: another user cannot squat it first


def smpd(*args: str) -> str:
    return smpdrun.smpd(*args, name=NAME, timeout=1800).stdout


def _burn() -> None:
    while True:
        pass


WHOLE = 20
# The whole-kick floor (hwfloor.c wakeseq), three times: (key, rounds, its sleepers asleep before each, as said,
# all on one core or where the host puts them: the placement of `--pin one`, and of the default `--pin none`)
SEQUENCE_FLOORS = (("sequence_floor_ns", 40, 2000, "2 ms", True),
                   ("sequence_floor_cold_ns", 10, 200_000, "200 ms", True),
                   ("sequence_floor_free_ns", 40, 2000, "2 ms", False))
WHOLE_PAUSED, PAUSE_S = 10, 0.5  # whole kicks of sleeping CPUs, each PAUSE_S after the last reset
FIRST, FIRST_ASLEEP_S = 5, 1.0  # first kicks: fresh machines, each kicked once, FIRST_ASLEEP_S after parking


def whole_kicks(m, times: int, pause_s: float = 0) -> tuple[list[int], list[int], int]:
    """``times`` x (`smpd kick` of every target, then `smpd reset`), each ``pause_s`` after the last
    reset: each kick's total_ns, each kick's write -> running again summed over the CPUs their
    doorbell woke, and the CPUs stuck in all."""
    totals, woke, stuck = [], [], 0
    for _ in range(times):
        time.sleep(pause_s)
        whole = m.request("kick")["kick"]
        totals.append(whole["total_ns"])
        woke.append(sum(e.get("wake_ns", 0) for e in whole["cpus"].values()))
        stuck += len(whole["stuck"])
        m.request("reset")
    return totals, woke, stuck


def first_kicks(hot: str, watch: str, targets: int, times: int) -> list[int]:
    """``times`` fresh machines of ``targets`` + 1 CPUs, each parked, asleep FIRST_ASLEEP_S, kicked
    once (what a kexec right after bring-up finds: no kick, bench or reset before it) and taken
    down: each kick's total_ns."""
    from smpd.tools import lifecycle

    totals = []
    for _ in range(times):
        smpd("up", "--cpus", str(targets + 1), "--watch", watch, "--hot-path", hot)
        try:
            smpd("offline", f"1-{targets}")
            time.sleep(FIRST_ASLEEP_S)
            totals.append(lifecycle.require(NAME).request("kick")["kick"]["total_ns"])
        finally:
            smpd("down")
    return totals


def row(hot: str, watch: str, targets: int, loaded: bool, rounds: int, pin_one: bool = False) -> dict:
    pin = ["--pin", "spread"] if targets == 1 else ["--pin", "one"] if pin_one else []
    smpd("up", "--cpus", str(targets + 1), "--watch", watch, "--hot-path", hot, *pin)
    burners = []
    try:
        smpd("offline", f"1-{targets}")
        if loaded:
            burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(2)]
            for b in burners:
                b.start()
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "k.json")
            smpd("bench", "kick", "--rounds", str(rounds), "--json", out)
            with open(out) as f:
                r = json.load(f)
        from smpd.tools import lifecycle

        m = lifecycle.require(NAME)
        totals, woke, stuck = whole_kicks(m, WHOLE)
        r["whole_kick_ns"], r["whole_kick_host_wake_ns"] = totals, woke
        totals = sorted(totals)
        r["whole_kick_p50_ns"], r["whole_kick_max_ns"], r["whole_kick_stuck"] = totals[len(totals) // 2], totals[-1], stuck
        if watch == "adaptive" and targets > 1 and not loaded:
            # The same whole kick with the CPUs asleep a while after the reset (the kicks above
            # follow it at once, and move with the host much more): a steadier reading of the target.
            r["whole_kick_paused_ns"], _, r["whole_kick_paused_stuck"] = whole_kicks(m, WHOLE_PAUSED, PAUSE_S)
            from smpd.tools import hwfloor

            for key, rounds_, pause_us, _asleep, pinned in SEQUENCE_FLOORS:
                floor = hwfloor.measure(rounds_, sequence=targets, pause_us=pause_us, pinned=pinned)
                r[key] = floor["rtt_ns"] if floor["available"] else None
        return r
    finally:
        for b in burners:
            b.kill()
            b.join()
        smpd("down")


class Planned(NamedTuple):
    """A row to measure: its machine (watch strategy, targets, pinned to one core or not), its host
    (loaded or idle) and its rounds (times --quick's 1 or the full run's 4)."""
    watch: str
    targets: int
    loaded: bool
    rounds: int
    pin_one: bool = False  # the machine's every process on one host core (smpd up --pin one)

    @property
    def label(self) -> str:
        """Its name in the table and the record: the watch strategy, `@one` when pinned to one core."""
        return self.watch + ("@one" if self.pin_one else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--record", default=None, help="where the JSON record goes [bench/records/...]")
    args = ap.parse_args()
    check_record(args.record)  # before the run, not at its end
    scale = 1 if args.quick else 4
    from smpd.machine import hotpath

    hots = ["c", "python"] if hotpath.WHY_NOT is None else ["python"]
    if hotpath.WHY_NOT is not None:
        print(f"no compiled rows: {hotpath.WHY_NOT}", file=sys.stderr)
    plan = [Planned("spin", 1, False, 2000), Planned("adaptive", 1, False, 2000), Planned("adaptive", 7, False, 400),
            Planned("adaptive", 63, False, 40), Planned("spin", 7, False, 100), Planned("spin", 1, True, 1000),
            Planned("adaptive", 1, True, 1000), Planned("adaptive", 63, True, 20),
            Planned("adaptive", 63, False, 40, pin_one=True)]
    python_plan = [Planned("spin", 1, False, 2000), Planned("adaptive", 63, False, 40)]  # the comparison's two
    rows = []
    rec = Record("bench_kick")
    for hot in hots:
        for p in plan if hot == "c" else python_plan:
            watch, targets, loaded = p.label, p.targets, p.loaded
            r = row(hot, p.watch, targets, loaded, p.rounds * scale, pin_one=p.pin_one)
            if watch == "adaptive" and targets > 1 and not loaded:
                r["first_kick_ns"] = first_kicks(hot, watch, targets, FIRST)
            rows.append((hot, watch, targets, loaded, r))
            label = f"{hot} {watch} x{targets} {'loaded' if loaded else 'idle'}"
            rec.add(f"{label}: kick round trip p50 (smpd bench kick)", "ns", [r["rtt_ns"]["p50"]])
            rec.add(f"{label}: cache-line floor p50 (hwfloor.c)", "ns", [r["hw_rtt_ns"] or 0])
            if r.get("hw_line1_ns"):
                rec.add(f"{label}: cache-line floor on one line's two words p50 (hwfloor.c)", "ns", [r["hw_line1_ns"]])
            for key, layout in (("ratio_paired_p50", "two lines"), ("ratio_line1_paired_p50", "one line")):
                if (r.get("paired") or {}).get(key):
                    rec.add(f"{label}: round trip p50 / the floor ({layout}) beside each stretch of kicks, median "
                            "over the stretches (smpd bench kick)", "x", [r["paired"][key]])
            if r.get("wake_rtt_ns"):
                rec.add(f"{label}: wake-up floor p50 (hwfloor.c wake)", "ns", [r["wake_rtt_ns"]])
            for key, _rounds, _pause_us, asleep, pinned in SEQUENCE_FLOORS:
                if r.get(key):
                    rec.add(f"{label}: whole-kick floor, {targets} sleepers (asleep {asleep}) woken in turn "
                            f"{'on one core' if pinned else 'unpinned'} p50 (hwfloor.c wakeseq)", "ns", [r[key]])
            rec.add(f"{label}: whole kick of every target (smpd kick)", "ns", r["whole_kick_ns"])
            if r.get("first_kick_ns"):
                rec.add(f"{label}: the first kick of every target, {FIRST_ASLEEP_S:g} s after parking, on a fresh "
                        "machine (smpd kick)", "ns", r["first_kick_ns"])
            if r.get("whole_kick_paused_ns"):
                rec.add(f"{label}: whole kick of every target, {PAUSE_S:g} s after the reset (smpd kick)", "ns",
                        r["whole_kick_paused_ns"])
            if r["host_wake_ns"].get("count"):
                rec.add(f"{label}: kicks whose CPU its doorbell woke (smpd bench kick)", "kicks",
                        [r["host_wake_ns"]["count"]])
                rec.add(f"{label}: those kicks, write -> the CPU's process running again p50", "ns",
                        [r["host_wake_ns"]["p50"]])
                rec.add(f"{label}: those kicks, running again -> ack seen p50", "ns", [r["after_wake_ns"]["p50"]])
            if any(r["whole_kick_host_wake_ns"]):
                rec.add(f"{label}: whole kick, write -> running again summed over its woken CPUs (smpd kick)", "ns",
                        r["whole_kick_host_wake_ns"])
            print(f"  done: {hot} {watch} x{targets} {'loaded' if loaded else 'idle'}", file=sys.stderr, flush=True)
    print("floor = the C cache-line ping-pong of the same row, before and after its kicks: the lower "
          "(* where the two differ by more than 1.5x: the host placed the cores anew mid-row), on two lines / on one "
          "line's two words (struct mwait_cpu_dead's layout), and p50/floor against each; >5ms = share of kicks over the kernel's "
          f"budget; whole kick = `smpd kick` of every target, {WHOLE} times: median / worst, CPUs stuck in all")
    print("beside = the floor measured again between stretches of 50 ms or more of kicks: each stretch's round trip "
          "p50 over the lower floor on its two sides, median over the stretches, two lines / one line (steady where "
          "the host moves the floor mid-row)")
    print("wake = the wake-up floor (a cold round trip to a process asleep in sigwaitinfo, on the other core; a "
          "reference, not a bound), adaptive rows only")
    print("seq floor = the whole-kick floor (as many C processes asleep in sigwaitinfo as targets, woken one after the "
          "other: hwfloor.c wakeseq) p50: all on one core, its sleepers asleep 2 ms / 200 ms before each round (the "
          "placement of --pin one), and unpinned, 2 ms (where the host puts them, as for the default --pin none: a "
          "reference, not a bound); "
          f"whole/seq = like for like: the whole kick's median over the 2 ms ones, and that of the kicks {PAUSE_S:g} s "
          "after a reset (below the table) over the 200 ms one")
    print("to running = in each whole kick, the sum over the CPUs their doorbell woke of write -> their process "
          "running again (woke_ns; mostly the host's wake-up): its median, and that against the whole kick's median")
    print_rows(rows)
    for hot, watch, targets, loaded, r in rows:
        if r.get("whole_kick_paused_ns"):
            p = sorted(r["whole_kick_paused_ns"])
            print(f"{hot} {watch} x{targets}: whole kick {PAUSE_S:g} s after each reset, {len(p)} times: "
                  f"median {p[len(p) // 2] / 1e6:.2f} ms, worst {p[-1] / 1e6:.2f} ms, "
                  f"CPUs stuck in all {r['whole_kick_paused_stuck']}")
        if r.get("first_kick_ns"):
            p = sorted(r["first_kick_ns"])
            print(f"{hot} {watch} x{targets}: the first kick, {FIRST_ASLEEP_S:g} s after parking, on {len(p)} fresh "
                  f"machines: median {p[len(p) // 2] / 1e6:.2f} ms, worst {p[-1] / 1e6:.2f} ms")
    rec.finish(args.record)


def print_rows(rows: list) -> None:
    """The table: one line per row of the plan."""
    head = (f"{'hot':<7}{'watch':<13}{'targets':>7}  {'host':<7}{'kicks':>6}  {'rtt p50':>9} {'p99':>9} {'max':>9}"
            f"  {'floor':>11}  {'p50/floor':>11}  {'beside':>11}  {'wake':>8}  {'p50/wake':>8}  {'>5ms':>6}  {'whole kick':>16}"
            f"  {'seq floor':>20}  {'whole/seq':>17}  {'to running':>16}  stuck")
    print(head)
    for hot, watch, targets, loaded, r in rows:
        s = r["rtt_ns"]
        ratio = " / ".join(f"{r[k]:.2f}" for k in ("ratio_p50", "ratio_line1_p50") if r.get(k)) + "x" \
            if r.get("ratio_p50") else "-"
        floor = (" / ".join(str(r[k]) for k in ("hw_rtt_ns", "hw_line1_ns") if r.get(k))
                 + f"ns{'*' if r.get('floor_moved') else ''}") if r.get("hw_rtt_ns") else "-"
        paired = r.get("paired") or {}
        beside = (" / ".join(f"{paired[k]:.2f}" for k in ("ratio_paired_p50", "ratio_line1_paired_p50")
                             if paired.get(k)) + "x") if paired.get("ratio_paired_p50") else "-"
        share = f"{100 * r['budget_exceeded']['share']:.2f}%"
        whole = f"{r['whole_kick_p50_ns'] / 1e6:.2f} / {r['whole_kick_max_ns'] / 1e6:.2f}ms"
        wake = r.get("wake_rtt_ns")
        wake_col = f"{wake / 1e3:.1f}us" if wake else "-"
        wake_ratio = f"{r['ratio_wake_p50']:.2f}x" if r.get("ratio_wake_p50") else "-"
        seqs = [r.get(key) for key, *_ in SEQUENCE_FLOORS]
        # each in its place ("-": that one unavailable), one core 2 ms / 200 ms, unpinned 2 ms
        seq_col = " / ".join(f"{f / 1e6:.2f}" if f else "-" for f in seqs) + "ms" if any(seqs) else "-"
        # like for like: the whole kicks right after a reset over the 2 ms floors, those 0.5 s after one
        # (WHOLE_PAUSED, where measured) over the 200 ms floor
        paused = sorted(r.get("whole_kick_paused_ns") or [])
        wholes = [r["whole_kick_p50_ns"], paused[len(paused) // 2] if paused else None, r["whole_kick_p50_ns"]]
        seq_ratio = " / ".join(f"{w / f:.1f}x" if f and w else "-" for w, f in zip(wholes, seqs)) if any(seqs) else "-"
        parts = sorted(r["whole_kick_host_wake_ns"])
        host = (f"{parts[len(parts) // 2] / 1e6:.2f}ms ({100 * parts[len(parts) // 2] / r['whole_kick_p50_ns']:.0f}%)"
                if any(parts) else "-")
        print(f"{hot:<7}{watch:<13}{targets:>7}  {'loaded' if loaded else 'idle':<7}{r['kicks']:>6}  "
              f"{_us(s['p50'])} {_us(s['p99'])} {_us(s['max'])}  {floor:>11}  {ratio:>11}  {beside:>11}  {wake_col:>8}  "
              f"{wake_ratio:>8}  {share:>6}  {whole:>16}  {seq_col:>20}  {seq_ratio:>17}  {host:>16}  {r['whole_kick_stuck']}")


def _us(ns: float) -> str:
    if ns < 1e3:  # a spin kick's: in ns, as its floor is
        return f"{ns:>7.0f}ns"
    return f"{ns / 1e3:>7.1f}us" if ns < 1e7 else f"{ns / 1e6:>7.1f}ms"


if __name__ == "__main__":
    from smpd.errors import Interrupted
    from smpd.tools.entry import stop_signals_interrupt

    with stop_signals_interrupt():  # SIGTERM and SIGHUP unwind too: the row's machine and the floor's build go
        try:
            main()
        except Interrupted as err:
            sys.exit(f"bench_kick: stopped by signal {err.signum}; its machine and files are gone")
