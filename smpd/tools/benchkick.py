"""`smpd bench kick`: repeated kicks of parked CPUs, folded into HDR histograms.

The coordinator does the kicking (its timings are first-hand) in short batches;
this side (measure) folds each batch's raw samples into hdrhistogram histograms (one-way,
round trip, overall and per CPU), drives the progress bar, samples psutil's
involuntary context switches of the target processes, measures the hardware
floor, and writes the report, the JSON and the plot.
"""

from __future__ import annotations

import array
import io
import json
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil
from hdrh.histogram import HdrHistogram

from smpd.host import files
from smpd.tools import hwfloor
from smpd.cpulist import format_list
from smpd.errors import BadInput, SmpdError

MAX_NS = 60 * 10**9  # histograms cover 1 ns .. 60 s at 3 significant digits
PERCENTILES = (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9))


PLOT_FORMATS = ("png", "svg", "pdf")  # by the file's extension; none: png


def plot_format(path: str) -> str:
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if fmt not in PLOT_FORMATS:
        raise BadInput(f"--plot {path}: '.{fmt}' is not a format it writes; name the file .png, .svg or .pdf")
    return fmt


def check_plot_available(path: str = "") -> None:
    plot_format(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput("--plot needs matplotlib, which is not installed; install it with "
                       "pip install -e '.[plot]' in the smpd checkout, or pip install matplotlib "
                       "(or run without --plot)") from None


def _hist() -> HdrHistogram:
    return HdrHistogram(1, MAX_NS, 3)


class PerCpu:
    """One CPU's samples of one figure, for its own percentiles: kept as they are while they are few
    (exact, 8 bytes each), folded into a 2-significant-digit histogram (~30 KB) past RAW_MAX. The
    run's own figures keep 3 digits; per CPU they had too, ~216 KB each: 1.8 GB and 9 s of report
    for the 8190 of a 4096-CPU machine's one round (hostile review, 2026-11-29). Answers what
    summary() asks of an HdrHistogram, with its rank rule."""

    RAW_MAX = 2048

    def __init__(self):
        self.raw: array.array | None = array.array("q")
        self.hist: HdrHistogram | None = None
        self._ranked: list[int] | None = None  # self.raw sorted, until the next sample

    def record_value(self, v: int) -> None:
        v = min(v, MAX_NS)  # as the histogram keeps it (past its range it would drop it)
        if self.raw is None:
            self.hist.record_value(v)
            return
        self.raw.append(v)
        self._ranked = None
        if len(self.raw) > self.RAW_MAX:
            self.hist = HdrHistogram(1, MAX_NS, 2)
            for x in self.raw:
                self.hist.record_value(x)
            self.raw = None

    def get_total_count(self) -> int:
        return len(self.raw) if self.raw is not None else self.hist.get_total_count()

    def get_min_value(self) -> int:
        return min(self.raw) if self.raw is not None else self.hist.get_min_value()

    def get_max_value(self) -> int:
        return max(self.raw) if self.raw is not None else self.hist.get_max_value()

    def get_value_at_percentile(self, p: float) -> int:
        if self.raw is None:
            return self.hist.get_value_at_percentile(p)
        if self._ranked is None:
            self._ranked = sorted(self.raw)
        # HdrHistogram's rank: the count at p, rounded, at least one
        return self._ranked[max(1, int(p / 100 * len(self._ranked) + 0.5)) - 1]


def summary(h: HdrHistogram) -> dict:
    if h.get_total_count() == 0:
        return {"count": 0}
    d = {"count": h.get_total_count(), "min": h.get_min_value()}
    for key, p in PERCENTILES:
        d[key] = h.get_value_at_percentile(p)
    d["max"] = h.get_max_value()
    return d


@dataclass
class Run:
    targets: list[int]
    budget_ns: int = 0
    delay_ns: int = 0
    watch: str = ""
    hot_path: str = ""
    one_way: HdrHistogram = field(default_factory=_hist)
    rtt: HdrHistogram = field(default_factory=_hist)
    per_one_way: defaultdict[int, PerCpu] = field(default_factory=lambda: defaultdict(PerCpu))
    per_rtt: defaultdict[int, PerCpu] = field(default_factory=lambda: defaultdict(PerCpu))
    host_wake: HdrHistogram = field(default_factory=_hist)  # kicks of a CPU asleep: write -> its process running
    after_wake: HdrHistogram = field(default_factory=_hist)  # the same kicks: its process running -> ack seen
    kernel_rounds: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 10**7, 3))
    kicks: int = 0
    exceeded: int = 0
    stuck: int = 0
    per_exceeded: dict[int, int] = field(default_factory=dict)
    rounds_done: int = 0
    pairing: bool = False  # a floor beside the kicks is measured: their round trips wait for it in since_floor
    since_floor: list[int] = field(default_factory=list)  # acknowledged round trips since the last floor beside them
    # Each stretch of kicks between two floors measured beside them: (its round trips' p50, floor before, after).
    stretches: list[tuple[int, dict, dict]] = field(default_factory=list)
    ctx_before: dict[int, int] = field(default_factory=dict)
    ctx_after: dict[int, int] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    floors_s: float = 0.0  # measuring the floor beside the kicks, apart from ``seconds``

    def fold(self, batch: dict) -> None:
        self.budget_ns, self.delay_ns, self.watch = batch["budget_ns"], batch["delay_ns"], batch["watch"]
        self.hot_path = batch["hot_path"]
        for cpu_s, samples in batch["samples"].items():
            cpu = int(cpu_s)
            ow, rt = self.per_one_way[cpu], self.per_rtt[cpu]
            for one_way, rtt, rounds, acked, wake in samples:
                self.kicks += 1
                if acked and 0 <= wake <= rtt:
                    self.host_wake.record_value(max(wake, 1))
                    self.after_wake.record_value(max(rtt - wake, 1))
                if acked and rtt >= 0:
                    if self.pairing:
                        self.since_floor.append(rtt)
                    self.rtt.record_value(max(rtt, 1))
                    rt.record_value(max(rtt, 1))
                    self.kernel_rounds.record_value(max(rounds, 1))
                if acked and one_way >= 0:
                    self.one_way.record_value(max(one_way, 1))
                    ow.record_value(max(one_way, 1))
                if not acked or rtt > self.budget_ns:
                    self.exceeded += 1
                    self.per_exceeded[cpu] = self.per_exceeded.get(cpu, 0) + 1
                self.stuck += not acked  # every round spent: what the kernel itself reports
        self.rounds_done += len(next(iter(batch["samples"].values()), []))
        self.pids.update({int(c): p for c, p in batch["pids"].items()})

    def stretch(self, before: dict, after: dict) -> None:
        """The kicks since the last floor beside them end a stretch, between ``before`` and ``after``
        (a floor that could not be measured ends the pairing: no list then grows with every kick)."""
        if self.since_floor:
            self.stretches.append((statistics.median_low(self.since_floor), before, after))
        self.since_floor = []
        self.pairing = bool(after.get("available"))

    def sample_ctx(self, into: dict[int, int]) -> None:
        for cpu, pid in self.pids.items():
            try:
                into[cpu] = psutil.Process(pid).num_ctx_switches().involuntary
            except psutil.Error:
                pass

    def live_line(self) -> str:
        if not self.rtt.get_total_count():
            return "no acknowledgement yet"
        return (f"rtt p50 {self.rtt.get_value_at_percentile(50) / 1e3:.1f} us, "
                f"p99 {self.rtt.get_value_at_percentile(99) / 1e3:.1f} us, "
                f"max {self.rtt.get_max_value() / 1e3:.1f} us; over budget {self.exceeded}")

    def report(self, floor: dict, wake_floor: dict | None = None, floor_after: dict | None = None) -> dict:
        """``floor``: the cache-line ping-pong, before the kicks (and ``floor_after``, after them:
        the ratios are to the lower, and a floor that moved by more than FLOOR_MOVED is said);
        ``wake_floor`` (an adaptive machine's): the same round trip to a process asleep in
        sigwaitinfo, which a kick of a sleeping CPU pays."""
        one_way, rtt = summary(self.one_way), summary(self.rtt)
        floors = {**_floor_figures(floor, floor_after, rtt), "paired": _paired_figures(self.stretches)}
        hw = floors["hw_rtt_ns"]
        wake = (wake_floor or {}).get("rtt_ns") if (wake_floor or {}).get("available") else None
        per_cpu = {}
        for cpu in self.targets:
            per_cpu[str(cpu)] = {
                "one_way_ns": summary(self.per_one_way[cpu]),
                "rtt_ns": summary(self.per_rtt[cpu]),
                "budget_exceeded": self.per_exceeded.get(cpu, 0),
                "involuntary_ctx_switches": (self.ctx_after.get(cpu, 0) - self.ctx_before.get(cpu, 0))
                if cpu in self.ctx_before else None,
            }
        return {
            "watch": self.watch, "hot_path": self.hot_path, "targets": format_list(self.targets),
            "rounds": self.rounds_done,
            "kicks": self.kicks, "seconds": round(self.seconds, 3), "floors_beside_s": round(self.floors_s, 3),
            "one_way_ns": one_way, "rtt_ns": rtt,
            "kernel_rounds": summary(self.kernel_rounds),
            **floors,
            "wake_floor": wake_floor, "wake_rtt_ns": wake,
            "ratio_wake_p50": round(rtt["p50"] / wake, 4) if wake and rtt.get("count") else None,
            # Kicks of a CPU that slept: the host's hand-off (write -> its process running again)
            # and the rest of the round trip (smpd's: the CPU's way to its answer, the kicker's look).
            "host_wake_ns": summary(self.host_wake), "after_wake_ns": summary(self.after_wake),
            # One way is one cache-line transfer: compare it with half the round-trip floor.
            "ratio_one_way_p50": round(one_way["p50"] / (hw / 2), 2) if hw and one_way.get("count") else None,
            "budget_ns": self.budget_ns, "delay_ns": self.delay_ns,
            "budget_exceeded": {"count": self.exceeded,
                                "share": round(self.exceeded / self.kicks, 6) if self.kicks else 0.0,
                                "stuck": self.stuck},
            "per_cpu": per_cpu,
        }

    def histograms(self) -> dict[str, list[tuple[int, int]]]:
        return {name: [(i.value_iterated_to, i.count_at_value_iterated_to) for i in h.get_recorded_iterator()]
                for name, h in (("rtt", self.rtt), ("one_way", self.one_way))}


def _floor_figures(floor: dict, floor_after: dict | None, rtt: dict) -> dict:
    """The cache-line floor's figures, on two lines (hw_rtt_ns) and on one line's two words, the
    kick's own layout (struct mwait_cpu_dead; hw_line1_ns): each the lower of its runs before and
    after the kicks, and the round trip's p50 against it."""
    runs = [f for f in (floor, floor_after or {}) if f.get("available")]
    hw, line1 = _lower("rtt_ns", floor, floor_after), _lower("line1_ns", floor, floor_after)

    def ratio(ns: int | None) -> float | None:
        return round(rtt["p50"] / ns, 4) if ns and rtt.get("count") else None

    return {"hw_rtt_ns": hw, "hw_floor": floor, "hw_floor_after": floor_after,
            "floor_moved": len(runs) == 2 and max(f["rtt_ns"] for f in runs) > FLOOR_MOVED * hw,
            "ratio_p50": ratio(hw), "hw_line1_ns": line1, "ratio_line1_p50": ratio(line1)}


def _lower(what: str, *floors: dict | None) -> int | None:
    """The lower of ``floors``' figure ``what`` (rtt_ns, line1_ns), of those measured; None: none has it."""
    return min((f[what] for f in floors if f and f.get("available") and f.get(what)), default=None)


def _paired_figures(stretches: list[tuple[int, dict, dict]]) -> dict:
    """Each stretch of kicks (about BESIDE_EVERY_S of them) against the cache-line floor measured on
    each side of it, the lower of the two: its round trips' p50 over that floor, and the median of
    those ratios over the run, per layout (two lines, one line). A host that places the two cores
    anew mid-run (a VM's vCPUs: ~130 or ~500 ns here, from one minute to the next) moves the run's
    one floor against all of its kicks; each stretch meets the floor of its own minute."""
    out: dict = {"stretches": len(stretches), "every_ms": round(BESIDE_EVERY_S * 1000)}
    for key, what in (("ratio_paired_p50", "rtt_ns"), ("ratio_line1_paired_p50", "line1_ns")):
        ratios = []
        for p50, before, after in stretches:
            floor = _lower(what, before, after)
            if floor:
                ratios.append(p50 / floor)
        out[key] = round(statistics.median(ratios), 4) if ratios else None
        out[key.replace("_p50", "_range")] = [round(min(ratios), 4), round(max(ratios), 4)] if ratios else None
    # each stretch's own figures, to see where the host moved: its p50, and each floor's on its two sides
    out["each"] = [{"rtt_p50_ns": p50, **{f"{side}_{what}": f.get(what) for side, f in (("before", before), ("after", after))
                                          for what in ("rtt_ns", "line1_ns")}} for p50, before, after in stretches]
    return out


# A floor that differs by more than this before and after the kicks: the host moved under the
# run (a VM's vCPUs placed on other physical cores: on the development host the floor is either
# ~150 ns or ~550 ns, from one minute to the next).
FLOOR_MOVED = 1.5


WAKE_ITERATIONS = 2000  # 300 us apart: ~0.7 s
BESIDE_EVERY_S = 0.05  # a stretch of kicks between two floors measured beside them (or one batch, if longer)
BESIDE_ITERATIONS = 20_000  # of each layout: ~10 ms of ping-pong at 150 ns, ~25 ms at 550 ns
# ... and at least this many times as long as the last floor took: on a loaded host a ping-pong between two
# pinned threads waits for both to run at once, and its 40,000 round trips can take seconds; the floors beside
# then stay under a fifth of the run.
BESIDE_SHARE = 4
# What each floor may take at most (hwfloor's BUDGET_MS): it stops at the first end of a pair of batches past it
# (up to 1000 round trips of each layout) and says so. 200,000 round trips take 50-200 ms on an idle host here,
# and took 31 s under a busy loop's load: a report that waits that long for its reference is not worth it.
FLOOR_BUDGET_S = 2.0
BESIDE_BUDGET_S = 0.5


def _json_bytes(report: dict) -> bytes:
    return (json.dumps(report, indent=1) + "\n").encode()


def write_json_or_keep(path: str | None, report: dict) -> tuple[str | None, SmpdError | None]:
    """The report's JSON to ``path`` (None: no --json), or kept in $TMPDIR when that fails now
    (files.write_output_or_keep). Returns where the JSON went (None: nowhere), and the error."""
    if path is None:
        return None, None
    return files.write_output_or_keep(path, "--json", _json_bytes(report), "smpd-bench-kick", "the report's JSON")


def write_plot(path: str, run: Run, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, label in (("one_way", "one way (write -> CPU answered)"), ("rtt", "round trip (write -> ack seen)")):
        pts = run.histograms()[name]
        if pts:
            xs = [v / 1e3 for v, _ in pts]
            ws = [c for _, c in pts]
            lo, hi = max(min(xs), 1e-3), max(xs) * 1.01
            import numpy as np

            bins = np.logspace(np.log10(lo), np.log10(hi), 60)
            ax.hist(xs, bins=bins, weights=ws, histtype="step", linewidth=1.5, label=label)
    if report["hw_rtt_ns"]:
        ax.axvline(report["hw_rtt_ns"] / 1e3, color="k", linestyle=":", label="hardware floor (C ping-pong)")
    ax.axvline(report["budget_ns"] / 1e3, color="r", linestyle="--",
               label=f"kernel budget ({report['budget_ns'] / 1e6:g} ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency (us)")
    ax.set_ylabel("kicks")
    ax.set_title(f"smp_kick_mwait_play_dead() latency, watch={report['watch']}, hot_path={report['hot_path']}, "
                 f"CPU {report['targets']}, {report['kicks']} kicks")
    # Beside the axes, not over the data: the tails it would cover are the point of the plot.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fmt = plot_format(path)
    try:
        image = io.BytesIO()
        fig.savefig(image, dpi=110, format=fmt)
    finally:
        plt.close(fig)
    files.write_output(path, "--plot", image.getvalue())


def elapsed(t0: float) -> float:
    return time.monotonic() - t0


BATCH_KICKS = 400  # kicks per request: the progress bar moves, and a stop comes, between batches


def measure(machine, targets: str | None, rounds: int, seconds: float | None,
            console) -> tuple[Run, dict, dict | None, dict | None, bool]:
    """The benchmark on ``machine`` (its lock held by the caller): the floors, then ``rounds`` rounds
    (or ``seconds`` of them) in batches, with a progress bar on ``console``, a short cache-line floor
    beside them every BESIDE_EVERY_S or more, then the floor again. Returns the run, the cache-line floor
    before and after (None after a stop), the wake-up floor (an adaptive machine's) and whether
    Ctrl-C cut it short."""
    # A zero-round request validates the targets (parked?) before anything is measured.
    check = machine.request("bench_kick", targets=targets, rounds=0)
    with hwfloor.Session() as hw:
        floor = hw.measure(budget_s=FLOOR_BUDGET_S)
        # An adaptive CPU sleeps until its doorbell: its kick also pays a process wake-up, floored too.
        adaptive = machine.request("status", brief=True)["machine"]["watch"] == "adaptive"
        wake_floor = hw.measure(WAKE_ITERATIONS, wake=True) if adaptive else None
        run, interrupted, beside = _kicks(machine, targets, rounds, seconds, console, check, hw, floor)
        # Did the host move meanwhile? (Not after a stop signal: its report comes at once; nor after
        # one that comes while it is measured: every kick is done, and reported.)
        floor_after = None
        try:
            floor_after = hw.measure(budget_s=FLOOR_BUDGET_S) if floor.get("available") and not interrupted else None
        except KeyboardInterrupt:
            interrupted = True
        if floor_after is not None:  # the last stretch's floor after it
            run.stretch(beside, floor_after)
    return run, floor, floor_after, wake_floor, interrupted


def _kicks(machine, targets: str | None, rounds: int, seconds: float | None, console, check: dict,
           hw: hwfloor.Session, beside: dict) -> tuple[Run, bool, dict]:
    """The kicks, with the floor measured again beside them (``beside``: the last one measured, and
    returned as the last)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cpus = check["targets"]
    since, took = time.monotonic(), 0.0
    run = Run(targets=cpus, pairing=bool(beside.get("available")))
    run.pids = {int(c): p for c, p in check["pids"].items()}
    run.sample_ctx(run.ctx_before)
    batch = max(1, BATCH_KICKS // len(cpus))
    t0 = time.monotonic()
    floors_s, interrupted = 0.0, False
    with Progress(TextColumn("[bold]kick[/bold]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=seconds if seconds else rounds)
        try:
            while True:
                left = rounds - run.rounds_done
                kicking = elapsed(t0) - floors_s  # --duration is the kicks' own time, as run.seconds
                if seconds is None and left <= 0 or seconds is not None and kicking >= seconds:
                    break
                n = batch if seconds is not None else min(batch, left)
                run.fold(machine.request("bench_kick", targets=targets, rounds=n))
                if run.pairing and time.monotonic() - since >= max(BESIDE_EVERY_S, BESIDE_SHARE * took):
                    t_floor = time.monotonic()
                    after = hw.measure(BESIDE_ITERATIONS, budget_s=BESIDE_BUDGET_S)
                    run.stretch(beside, after)
                    beside, since = after, time.monotonic()
                    took = since - t_floor
                    floors_s += took
                bar.update(task, completed=elapsed(t0) - floors_s if seconds else run.rounds_done,
                           description=run.live_line())
        except KeyboardInterrupt:
            interrupted = True
    run.seconds = elapsed(t0) - floors_s  # the kicks' own time, not the floors' beside them
    run.floors_s = floors_s
    run.sample_ctx(run.ctx_after)
    return run, interrupted, beside
