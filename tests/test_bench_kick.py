"""`smpd bench kick`: real kicks, real histograms, the hardware floor, and bad input."""

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adversary import needs_root, unused_uid
from conftest import HOT_PATHS, gone, run_smpd, start_smpd, wait_until
from smpd.host.proc import die_with_parent
from smpd.machine import layout as L

KEYS = ("p50", "p90", "p99", "p999", "max")


@pytest.fixture
def parked4(machine):
    m = machine(4, "--watch", "adaptive")
    m.request("offline", cpus="1-3")
    return m


def test_bench_kick_records_every_kick_and_reparks_the_cpus(parked4, tmp_path):
    out = tmp_path / "kick.json"
    png = tmp_path / "kick.png"
    r = run_smpd("bench", "kick", "--rounds", "40", "--json", str(out), "--plot", str(png), name=parked4.name)
    assert "round trip" in r.stdout and "hardware floor" in r.stdout
    d = json.loads(out.read_text())
    assert d["kicks"] == 40 * 3 and d["rounds"] == 40 and d["targets"] == "1-3" and d["watch"] == "adaptive"
    assert d["hot_path"] == parked4.status()["machine"]["hot_path"]
    for key in ("one_way_ns", "rtt_ns"):
        s = d[key]
        assert s["count"] + d["budget_exceeded"]["count"] >= 40 * 3 - d["budget_exceeded"]["count"]
        assert [s[k] for k in ("min", *KEYS)] == sorted(s[k] for k in ("min", *KEYS))
    assert d["one_way_ns"]["p50"] <= d["rtt_ns"]["p99"]
    assert set(d["per_cpu"]) == {"1", "2", "3"}
    for cpu in d["per_cpu"].values():
        assert cpu["rtt_ns"]["count"] >= 1 and cpu["involuntary_ctx_switches"] >= 0
    assert 0 <= d["budget_exceeded"]["share"] <= 1
    assert 0 <= d["budget_exceeded"]["stuck"] <= d["budget_exceeded"]["count"]
    assert "stuck, every one of the kernel's 1000 rounds spent" in " ".join(r.stdout.split())
    floor = d["hw_floor"]
    if floor["available"]:  # measured before and after the kicks; the ratios are to the lower
        assert d["hw_rtt_ns"] == min(floor["rtt_ns"], d["hw_floor_after"]["rtt_ns"]) > 0
        assert d["ratio_p50"] == pytest.approx(d["rtt_ns"]["p50"] / d["hw_rtt_ns"], rel=0.01)
        # and on one line's two words, the kick's layout, in the same runs
        assert d["hw_line1_ns"] == min(floor["line1_ns"], d["hw_floor_after"]["line1_ns"]) > 0
        assert d["ratio_line1_p50"] == pytest.approx(d["rtt_ns"]["p50"] / d["hw_line1_ns"], rel=0.01)
        assert "struct mwait_cpu_dead's layout" in " ".join(r.stdout.split())
        # and beside the kicks, between stretches of them: every stretch met a floor on each side
        p = d["paired"]
        assert p["stretches"] >= 1 and p["ratio_line1_paired_p50"] > 0, p
        assert d["floors_beside_s"] >= 0  # apart from the kicks' own seconds
        lo, hi = p["ratio_line1_paired_range"]
        assert lo <= p["ratio_line1_paired_p50"] <= hi
        assert f"median of {p['stretches']}: two lines" in " ".join(r.stdout.split())
    else:
        assert d["hw_rtt_ns"] is None and floor["why"]
    # An adaptive machine: the round trip is also read against the host's wake-up floor.
    wake = d["wake_floor"]
    if wake["available"]:
        assert "wake-up floor" in r.stdout and wake["rtt_min_ns"] <= wake["rtt_ns"] <= wake["rtt_p99_ns"]
        assert d["ratio_wake_p50"] == pytest.approx(d["rtt_ns"]["p50"] / d["wake_rtt_ns"], rel=0.01)
    else:
        assert d["wake_rtt_ns"] is None and wake["why"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every target is parked again, through mwait_play_dead(), once per round.
    s = parked4.status()
    assert {c["state"] for c in s["cpus"][1:]} == {"MWAIT"}
    assert all(c["mwait_entries"] == 41 for c in s["cpus"][1:])
    # A REPARK reaches a CPU in HLT, and HLT is not MWAIT: no IPI wakes MWAIT (but for a
    # kick that blew the budget, whose CPU may meet its REPARK still parked).
    assert all(c["wakeups"]["ipi"] <= d["per_cpu"][str(c["cpu"])]["budget_exceeded"] for c in s["cpus"][1:]), \
        [c["wakeups"] for c in s["cpus"][1:]]


def test_bench_kick_one_target(parked4):
    r = run_smpd("bench", "kick", "--targets", "2", "--rounds", "30", name=parked4.name)
    assert "CPU 2, 30 rounds, 30 kicks" in r.stdout
    s = parked4.status()
    assert s["cpus"][2]["mwait_entries"] == 31 and s["cpus"][1]["mwait_entries"] == 1


def test_a_kick_that_blows_the_budget_does_not_spoil_the_next_round(parked4, tmp_path):
    """CPU 2 is frozen through the first kick (budget exceeded) and wakes with the kick's
    write and the REPARK both pending: it starts mwait_play_dead() over, so round two
    kicks a parked CPU again instead of finding a late acknowledgement."""
    out = tmp_path / "k.json"
    pid = parked4.cpu(2)["pid"]
    with parked4.segment() as seg:
        posted = seg.cb(2, "mbox_seq")
        os.kill(pid, signal.SIGSTOP)
        try:
            bench = subprocess.Popen([sys.executable, "-m", "smpd", "bench", "kick", "--targets", "2", "--rounds",
                                      "3", "--json", str(out), "--name", parked4.name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            # The first kick gives up after its 5 ms; then the REPARK is posted and waits for the CPU.
            wait_until(lambda: seg.cb(2, "mbox_seq") != posted and seg.cb(2, "mbox_cmd") == L.Ipi.REPARK,
                       timeout=60, what="the first round's REPARK")
        finally:
            os.kill(pid, signal.SIGCONT)
    assert bench.wait(timeout=60) == 0, bench.stderr.read()
    d = json.loads(out.read_text())
    assert d["kicks"] == 3 and d["budget_exceeded"]["count"] >= 1  # the first; a loaded host may add more
    assert d["budget_exceeded"]["stuck"] >= 1  # the first: every round spent, not merely over 5 ms of wall time
    assert parked4.cpu(2)["mwait_entries"] == 1 + 3  # every round re-parked it, the spoiled one too


def test_bench_kick_duration_runs_for_that_long(parked4, tmp_path):
    out = tmp_path / "d.json"
    run_smpd("bench", "kick", "--duration", "1s", "--json", str(out), name=parked4.name)
    d = json.loads(out.read_text())
    assert d["seconds"] >= 1.0 and d["kicks"] > 0


@pytest.mark.parametrize("args, says", [
    (("--targets", "0"), "CPU 0 is not parked"),
    (("--targets", "9"), "names CPU 9"),
    (("--rounds", "0"), "0 is not in the range"),
    (("--duration", "soon"), "is not a duration"),
    (("--json", "/nonexistent-dir/k.json"), "does not exist"),
    (("--json", "/"), "names a directory"),
    (("--plot", "/proc/k.png"), "is on /proc, /sys, /dev or /dev/shm"),
    (("--plot", "k.jpeg"), "name the file .png, .svg or .pdf"),
    (("--json", ""), "--json needs a file name; '' is none"),
    (("--plot", ""), "--plot needs a file name; '' is none"),
])
def test_bench_kick_bad_input_is_refused_before_the_run(parked4, args, says):
    r = run_smpd("bench", "kick", *args, name=parked4.name, check=False)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert all(c["mwait_entries"] == 1 for c in parked4.status()["cpus"][1:])  # nothing was kicked


@needs_root
def test_a_json_file_another_user_puts_at_its_name_during_the_run_loses_nothing(parked4, tmp_path):
    """The --json name is checked before the run and is in our command line: another user may put a
    file of theirs there meanwhile. It is refused at the end as before, but the report is printed and
    its JSON kept in a new file of ours in $TMPDIR, named in the error (exit status 2); theirs is untouched."""
    import re

    out = tmp_path / "k.json"
    bench = start_smpd("bench", "kick", "--duration", "3s", "--json", str(out), name=parked4.name)
    time.sleep(1.0)
    out.write_text("theirs\n")
    uid = unused_uid()
    os.chown(out, uid, uid)
    stdout, stderr = bench.communicate(timeout=300)
    assert bench.returncode == 2, stderr
    assert f"belongs to uid {uid}" in stderr or "not to you" in stderr, stderr
    kept = re.search(r"the report's JSON is in (\S+) instead", " ".join(stderr.split()))
    assert kept, stderr
    try:
        st = os.stat(kept.group(1))
        assert st.st_uid == os.geteuid() and st.st_mode & 0o022 == 0  # ours, nobody else's to change
        with open(kept.group(1)) as f:
            assert json.load(f)["rounds"] > 0
    finally:
        os.unlink(kept.group(1))
    assert "round trip" in stdout and f"wrote {kept.group(1)}" in " ".join(stdout.split())
    assert out.read_text() == "theirs\n"


def test_bench_kick_plot_writes_svg_by_its_extension(parked4, tmp_path):
    svg = tmp_path / "kick.svg"
    run_smpd("bench", "kick", "--rounds", "10", "--plot", str(svg), name=parked4.name)
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "kernel budget" in text


def test_bench_kick_refuses_cpus_that_are_not_parked(machine):
    m = machine(4, "--watch", "adaptive")
    m.request("offline", cpus="1")
    r = run_smpd("bench", "kick", "--targets", "1-3", name=m.name, check=False)
    assert r.returncode == 2 and "CPU 2-3 are not parked" in r.stderr and "parked now: CPU 1" in r.stderr


def test_bench_kick_without_a_machine(machine_name):
    r = run_smpd("bench", "kick", name=machine_name, check=False)
    assert r.returncode == 2 and "no machine named" in r.stderr


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_spinning_cpus_that_outnumber_the_host_cores_still_take_every_round(machine, hot_path, tmp_path):
    """The issue's own first example, scaled: spin with more processes than host cores.
    The machine says the spin loops and the kick's udelay yield their cores; every round
    kicks and re-parks every target (how fast is bench/bench_kick.py's business)."""
    ncpus = len(os.sched_getaffinity(0)) + 2
    m = machine(ncpus, "--watch", "spin", "--pin", "spread", "--hot-path", hot_path)
    assert m.status()["machine"]["spin_yields"] is True
    m.request("offline", cpus=f"1-{ncpus - 1}")
    out = tmp_path / "k.json"
    run_smpd("bench", "kick", "--rounds", "50", "--json", str(out), name=m.name)
    d = json.loads(out.read_text())
    assert d["kicks"] == 50 * (ncpus - 1) and d["rounds"] == 50
    assert all(c["mwait_entries"] == 51 and c["state"] == "MWAIT" for c in m.status()["cpus"][1:])


def test_spinning_cpus_that_fit_the_host_cores_do_not_yield(machine):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two host cores for a CPU and the coordinator")
    m = machine(2, "--watch", "spin")
    assert m.status()["machine"]["spin_yields"] is False


def test_a_floor_that_moved_during_the_run_is_said_and_the_ratios_take_the_lower():
    """The host may place the two cores anew mid-run (a VM's vCPUs): the report says so."""
    from smpd.tools import benchkick, render

    run = benchkick.Run(targets=[1])
    run.fold({"budget_ns": 5_000_000, "delay_ns": 5000, "watch": "spin", "hot_path": "c", "pids": {"1": 1},
              "samples": {"1": [[100, 300, 1, 1, -1], [120, 330, 1, 1, -1], [110, 320, 1, 1, -1]]}})
    floor = lambda ns: {"available": True, "rtt_ns": ns, "rtt_p99_ns": ns, "rtt_min_ns": ns, "cores": [0, 1]}  # noqa: E731
    moved = run.report(floor(550), None, floor(150))
    assert moved["hw_rtt_ns"] == 150 and moved["floor_moved"] and moved["ratio_p50"] == pytest.approx(320 / 150, 0.01)
    text = render.bench_kick(moved, None, None).renderables[0].plain
    assert "the floor moved during the run (550 -> 150 ns" in text
    steady = run.report(floor(150), None, floor(160))
    assert steady["hw_rtt_ns"] == 150 and not steady["floor_moved"]
    assert moved["hw_line1_ns"] is None and "one line" not in text  # no such figure: no such line
    one_line = run.report({**floor(550), "line1_ns": 500}, None, {**floor(150), "line1_ns": 130})
    assert one_line["hw_line1_ns"] == 130 and one_line["ratio_line1_p50"] == pytest.approx(320 / 130, 0.01)
    assert "is 2.46x that" in " ".join(render.bench_kick(one_line, None, None).renderables[0].plain.split())


def test_a_stop_inside_a_fold_still_renders_the_report():
    """A stop signal lands between the two parts of a woken CPU's kick in Run.fold(): the first
    part has a sample the second has not. The report still renders (it raised KeyError: 'min')."""
    from smpd.tools import benchkick, render

    run = benchkick.Run(targets=[1])
    run.host_wake.record_value(20_000)  # the first part recorded, then the stop
    run.fold({"budget_ns": 5_000_000, "delay_ns": 5000, "watch": "adaptive", "hot_path": "c", "pids": {"1": 1},
              "samples": {"1": [[100, 300, 1, 1, -1]]}})
    r = run.report({"available": False, "why": "no compiler"}, None, None)
    assert r["host_wake_ns"]["count"] == 1 and r["after_wake_ns"] == {"count": 0}
    text = render.bench_kick(r, None, None).renderables
    assert any("to running" in getattr(x, "plain", "") or hasattr(x, "columns") for x in text)


def test_each_stretch_of_kicks_meets_the_floor_measured_beside_it():
    """The host moved the floor from ~150 to ~550 ns for the middle stretch of kicks, whose round
    trips moved with it: the whole run's one floor makes that stretch look 4x slow, while each
    stretch against the floor on its own two sides (the lower) shows the kick's own cost."""
    from smpd.tools import benchkick, render

    def floor(ns: int, line1: int) -> dict:
        return {"available": True, "rtt_ns": ns, "rtt_p99_ns": ns, "rtt_min_ns": ns, "line1_ns": line1,
                "cores": [0, 1]}

    run = benchkick.Run(targets=[1], pairing=True)
    for rtts, before, after in (([300, 310, 320], floor(150, 130), floor(160, 140)),
                                ([600, 620, 640], floor(560, 500), floor(550, 520)),
                                ([], floor(550, 520), floor(150, 130)),  # no kick answered: no stretch
                                ([330, 330, 340], floor(150, 130), floor(150, 130))):
        run.fold({"budget_ns": 5_000_000, "delay_ns": 5000, "watch": "spin", "hot_path": "c", "pids": {"1": 1},
                  "samples": {"1": [[100, rtt, 1, 1, -1] for rtt in rtts]}})
        run.stretch(before, after)
    r = run.report(floor(150, 130), None, floor(150, 130))
    p = r["paired"]
    assert p["stretches"] == 3
    assert p["ratio_paired_p50"] == pytest.approx(310 / 150, 0.001)  # of 310/150, 620/550, 330/150
    assert p["ratio_paired_range"] == [pytest.approx(620 / 550, 0.001), pytest.approx(330 / 150, 0.001)]
    assert p["ratio_line1_paired_p50"] == pytest.approx(310 / 130, 0.001)  # of 310/130, 620/500, 330/130
    assert r["ratio_line1_p50"] == pytest.approx(330 / 130, 0.001)  # the run's p50 against its one floor
    text = " ".join(render.bench_kick(r, None, None).renderables[0].plain.split())
    assert "median of 3: two lines 2.07x (1.13-2.20); one line 2.38x (1.24-2.54)" in text
    assert p["each"][1] == {"rtt_p50_ns": 620, "before_rtt_ns": 560, "before_line1_ns": 500, "after_rtt_ns": 550,
                            "after_line1_ns": 520}
    # A floor that could not be measured ends the pairing: the kicks after it are kept nowhere but the histograms.
    gone = {"available": False, "why": "no compiler"}
    unavailable = benchkick.Run(targets=[1], pairing=True)
    unavailable.fold({"budget_ns": 5_000_000, "delay_ns": 5000, "watch": "spin", "hot_path": "c", "pids": {"1": 1},
                      "samples": {"1": [[100, 300, 1, 1, -1]]}})
    unavailable.stretch(gone, gone)
    assert not unavailable.pairing
    unavailable.fold({"budget_ns": 5_000_000, "delay_ns": 5000, "watch": "spin", "hot_path": "c", "pids": {"1": 1},
                      "samples": {"1": [[100, 300, 1, 1, -1]] * 1000}})
    assert unavailable.since_floor == [] and unavailable.rtt.get_total_count() == 1001
    assert unavailable.report({"available": False, "why": "no compiler"}, None, None)["paired"] == {
        "stretches": 1, "every_ms": 50, "ratio_paired_p50": None, "ratio_paired_range": None,
        "ratio_line1_paired_p50": None, "ratio_line1_paired_range": None,
        "each": [{"rtt_p50_ns": 300, "before_rtt_ns": None, "before_line1_ns": None, "after_rtt_ns": None,
                  "after_line1_ns": None}]}


def test_the_cache_line_floor_plays_two_lines_and_one_line_in_full():
    """hwfloor.c's ping-pong on two lines and on one line's two words (struct mwait_cpu_dead's layout),
    alternated in batches: each layout's own percentiles, over whole batches of each."""
    from smpd.tools import hwfloor

    _compiler()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two host cores")
    for rounds in (7, 2000):  # 7: one round per batch
        f = hwfloor.measure(rounds)
        assert f["available"] and f["iterations"] == f["requested"] == rounds and not f["budget_cut"], f
        assert 0 < f["rtt_min_ns"] <= f["rtt_ns"] <= f["rtt_p99_ns"], f
        assert 0 < f["line1_min_ns"] <= f["line1_ns"] <= f["line1_p99_ns"], f


def test_a_cache_line_floor_past_its_budget_stops_at_a_pair_of_batches_and_says_so():
    """hwfloor's BUDGET_MS: 10 million round trips of each layout (seconds even on an idle host) with
    a 1 ms budget stop after a whole pair of batches (1000 of each), both layouts measured alike, the
    responder thread ended with it (the process exits: measure() returns); said in the result and
    in the report."""
    from smpd.tools import benchkick, hwfloor, render

    _compiler()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two host cores")
    f = hwfloor.measure(10_000_000, budget_s=0.001)
    assert f["available"] and f["budget_cut"] and f["requested"] == 10_000_000, f
    assert f["iterations"] >= 1000 and f["iterations"] % 1000 == 0 and f["iterations"] < 10_000_000, f
    assert 0 < f["rtt_min_ns"] <= f["rtt_ns"] and 0 < f["line1_min_ns"] <= f["line1_ns"], f
    run = benchkick.Run(targets=[1])
    run.fold({"budget_ns": 5_000_000, "delay_ns": 5000, "watch": "spin", "hot_path": "c", "pids": {"1": 1},
              "samples": {"1": [[100, 300, 1, 1, -1], [120, 330, 1, 1, -1]]}})
    text = " ".join(render.bench_kick(run.report(f, None, None), None, None).renderables[0].plain.split())
    assert "cut short by its time budget" in text and f"before the kicks {f['iterations']:,} of 10,000,000" in text


def test_a_floor_that_cannot_be_built_is_unavailable_and_costs_nothing(monkeypatch):
    """A full or missing $TMPDIR at the floor's second measurement, after every kick, once lost
    the whole run's report: the floor is unavailable instead, with why."""
    import shutil
    import tempfile

    from smpd.tools import hwfloor

    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler: the floor is unavailable before any temporary directory")
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/smpd-hwfloor-test")
    f = hwfloor.measure(1000)
    assert f["available"] is False and "could not build or run hwfloor" in f["why"], f


def test_the_floor_is_not_built_where_another_user_could_swap_its_directory(monkeypatch, tmp_path):
    """Our 0700 build directory is only as private as the $TMPDIR it is made in: one that others
    may write without the sticky bit lets them rename it away and put theirs, with a binary of
    their own, in its place. There the floor is unavailable, with why; /tmp's 1777 is fine."""
    import tempfile

    from smpd.tools import hwfloor

    _compiler()
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    tmp.chmod(0o777)
    f = hwfloor.measure(1000)
    assert f["available"] is False and f"{tmp}, on the way to {tmp}, is writable by others without the sticky bit" in f["why"], f
    assert list(tmp.iterdir()) == []  # nothing made there
    tmp.chmod(0o1777)
    f = hwfloor.measure(1000)
    assert f["available"] is True and f["rtt_ns"] > 0, f


def _compiler():
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler: no floor to measure")


@pytest.mark.parametrize("pinned", [True, False])
def test_the_whole_kick_floor_wakes_each_sleeper_in_turn_and_leaves_none(pinned):
    """hwfloor.c wakeseq: N sleeping processes woken one after the other on one core (or, not
    pinned, wherever the host puts them), each round; every round's time is a whole sequence's,
    and the sleepers are gone when it is done."""
    import psutil

    from smpd.tools import hwfloor

    _compiler()
    f = hwfloor.measure(5, sequence=3, pinned=pinned)
    assert f["available"] and f["sequence"] == 3 and f["pinned"] is pinned, f
    assert f["cores"] == ([min(os.sched_getaffinity(0))] if pinned else sorted(os.sched_getaffinity(0))), f
    assert 0 < f["rtt_min_ns"] <= f["rtt_ns"] <= f["rtt_p99_ns"], f
    assert [c for c in psutil.Process().children(recursive=True) if c.name() == "hwfloor"] == []


@pytest.mark.parametrize("where", ["core", "any"])
def test_the_whole_kick_floor_pins_its_sleepers_to_the_core_named_and_no_core_for_any(tmp_path, where):
    """wakeseq CORE puts the waker and every sleeper on CORE; `any` leaves them all where this
    process may run (the placement of a machine brought up with --pin none)."""
    import psutil

    from smpd.tools import hwfloor

    _compiler()
    exe, why = hwfloor.build(str(tmp_path))
    assert exe, why
    allowed = sorted(os.sched_getaffinity(0))
    arg = str(allowed[-1]) if where == "core" else "any"
    p = subprocess.Popen([exe, "wakeseq", arg, "3", "20000"],
                         preexec_fn=functools.partial(die_with_parent, os.getpid()))
    try:
        sleepers = wait_until(lambda: len(psutil.Process(p.pid).children()) == 3 and psutil.Process(p.pid).children(),
                              30, "three sleepers")
        want = [allowed[-1]] if where == "core" else allowed  # the waker pins itself before it forks
        assert [sorted(q.cpu_affinity()) for q in (psutil.Process(p.pid), *sleepers)] == [want] * 4
    finally:
        p.kill()
        p.wait()
    wait_until(lambda: all(gone(s.pid) for s in sleepers), 30, "the sleepers gone with their parent")


def test_a_floor_killed_mid_run_leaves_no_sleeper(tmp_path):
    """The measurement runs with the bench (die_with_parent): its own sleeping children die with it,
    not left asleep in sigwaitinfo() for ever."""
    import psutil

    from smpd.tools import hwfloor

    _compiler()
    exe, why = hwfloor.build(str(tmp_path))
    assert exe, why
    p = subprocess.Popen([exe, "wakeseq", str(min(os.sched_getaffinity(0))), "4", "20000"],
                         preexec_fn=functools.partial(die_with_parent, os.getpid()))  # 40 s at most, and not without us
    try:
        sleepers = wait_until(lambda: len(psutil.Process(p.pid).children()) == 4 and psutil.Process(p.pid).children(),
                              30, "four sleepers")
    finally:
        p.kill()
        p.wait()

    wait_until(lambda: all(gone(s.pid) for s in sleepers), 30, "the sleepers gone with their parent")


@pytest.mark.parametrize("kind", ["wake", "wakeseq"])
def test_a_floor_whose_sleeper_is_killed_fails_with_why_and_leaves_no_process(tmp_path, kind):
    """A sleeper killed by someone else (or the OOM killer) mid-run: the floor does not poll for
    its answer until the caller's 120 s timeout; it fails (status 2), says which sleeper ended,
    and leaves none of its processes."""
    import psutil

    from smpd.tools import hwfloor

    _compiler()
    exe, why = hwfloor.build(str(tmp_path))
    assert exe, why
    core = str(min(os.sched_getaffinity(0)))
    argv = [exe, "wake", core, core, "1000000"] if kind == "wake" else [exe, "wakeseq", core, "3", "1000000"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=functools.partial(die_with_parent, os.getpid()))
    try:
        n = 1 if kind == "wake" else 3
        sleepers = wait_until(lambda: len(psutil.Process(p.pid).children()) == n and psutil.Process(p.pid).children(),
                              30, f"{n} sleeper(s)")
        sleepers[-1].kill()
        out, err = p.communicate(timeout=60)  # ~5 min of rounds left: only the death ends it sooner
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 2 and f"sleeper {sleepers[-1].pid} ended before it answered" in err, (p.returncode, err)
    assert not out
    for s in sleepers:
        assert not s.is_running() or s.status() == psutil.STATUS_ZOMBIE, s


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a directory of another uid (chown)")
def test_a_tmpdir_reached_through_a_link_into_another_user_s_directory_is_refused(tmp_path, monkeypatch):
    """A symbolic link in the middle of $TMPDIR's path (ours) that leads into a directory another
    user owns (sticky or not, they may rename what is in it): the walk of the path as written never
    sees that directory; the real path's is walked too, and the floor is not built there."""
    import tempfile

    from smpd.tools import hwfloor

    _compiler()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    theirs.chmod(0o1777)
    (theirs / "mine").mkdir(mode=0o700)
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    (ours / "via").symlink_to(theirs)
    monkeypatch.setattr(tempfile, "tempdir", str(ours / "via" / "mine"))
    f = hwfloor.measure(1000)
    assert f["available"] is False and f"{theirs}, on the way to {ours / 'via' / 'mine'}, belongs to uid 65534" in f["why"], f
    assert list((theirs / "mine").iterdir()) == []


def _names_of_children(pid: int) -> list[str]:
    """The names of process ``pid``'s children that still exist once asked (the compiler's, which
    come and go while the floor is built, may end between the listing and the look)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(child.name())
    return found


def test_a_build_directory_left_by_a_killed_measurement_goes_at_the_next_and_nothing_else_does(tmp_path, monkeypatch):
    """SIGKILL of the process that measures leaves its private directory (the compiler's temporary
    files in it too). The next measurement removes it, its maker gone, and leaves what is not such a
    leftover of ours: the directory of a live maker, one that is not 0700, a symbolic link, and
    another user's."""
    import tempfile

    import psutil

    from smpd.host import trust
    from smpd.tools import hwfloor

    _compiler()
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(mode=0o700)
    code = "from smpd.tools import hwfloor; hwfloor.measure(200_000_000)"  # minutes of ping-pong
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp)},
                         preexec_fn=functools.partial(die_with_parent, os.getpid()))
    try:
        left = wait_until(lambda: [d for d in tmp.iterdir() if (d / "hwfloor").exists()], 60, "the floor built")[0]
        wait_until(lambda: "hwfloor" in _names_of_children(p.pid), 30, "the floor running")
    finally:
        p.kill()
        p.wait()
    assert left.name.startswith(f"smpd-hwfloor-{p.pid}-") and left.is_dir()  # left behind, named for its maker
    wait_until(lambda: not [q for q in psutil.process_iter(["exe"]) if (q.info["exe"] or "").startswith(str(left))],
               30, "the floor's process gone with its maker")
    me = os.getpid()
    live = tmp / f"smpd-hwfloor-{me}-{trust.start_ticks(me)}-live"
    loose = tmp / f"smpd-hwfloor-{p.pid}-{trust.start_ticks(me)}-loose"
    link = tmp / f"smpd-hwfloor-{p.pid}-1-link"
    for d in (live, loose):
        d.mkdir(mode=0o700)
    loose.chmod(0o755)
    link.symlink_to(live)
    others = []
    if os.geteuid() == 0:  # another user's leftover: never ours to remove
        other = tmp / f"smpd-hwfloor-{p.pid}-1-other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        others.append(other)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert hwfloor.measure(1000)["available"]
    assert not left.exists()
    assert sorted(tmp.iterdir()) == sorted([live, loose, link, *others])


def test_the_floor_builds_with_the_system_s_compiler_not_one_planted_on_path(tmp_path, monkeypatch):
    """smpd often runs as root with a PATH that may name a directory another user can write: the
    floor's compiler, and the assembler and linker it runs, come from the system's directories,
    with a clean environment. A `cc` and an `as` planted first on PATH never run."""
    from smpd.tools import hwfloor

    _compiler()
    planted = tmp_path / "bin"
    planted.mkdir()
    marker = tmp_path / "ran"
    for tool in ("cc", "gcc", "clang", "as", "ld"):
        (planted / tool).write_text(f"#!/bin/sh\necho {tool} >> {marker}\nexit 1\n")
        (planted / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{planted}:{os.environ['PATH']}")
    f = hwfloor.measure(5, sequence=2)
    assert not marker.exists(), marker.read_text()
    assert f["available"] and not f["compiler"].startswith(str(planted)), f


def test_a_cpu_s_own_percentiles_are_exact_while_few_and_within_one_percent_after():
    """benchkick.PerCpu: a CPU's samples kept as they are up to RAW_MAX (exact, with HdrHistogram's
    rank rule), then a 2-digit histogram (~30 KB, not 3 digits' ~216 KB: 8190 of them at 4096 CPUs
    had taken 1.8 GB)."""
    import random

    from smpd.tools import benchkick

    rng = random.Random(7)
    values = [rng.randint(100, 5_000_000) for _ in range(benchkick.PerCpu.RAW_MAX * 3)]
    few, many = benchkick.PerCpu(), benchkick.PerCpu()
    for v in values[:101]:
        few.record_value(v)
    for v in values:
        many.record_value(v)

    def exact(vals, p):
        ranked = sorted(vals)
        return ranked[max(1, int(p / 100 * len(ranked) + 0.5)) - 1]

    assert few.hist is None and many.raw is None
    assert benchkick.summary(few) == {"count": 101, "min": min(values[:101]), "max": max(values[:101]),
                                      **{k: exact(values[:101], p) for k, p in benchkick.PERCENTILES}}
    s = benchkick.summary(many)
    assert s["count"] == len(values)
    for k, p in benchkick.PERCENTILES:
        assert abs(s[k] - exact(values, p)) <= 0.01 * exact(values, p), (k, s[k], exact(values, p))
    assert benchkick.summary(benchkick.PerCpu()) == {"count": 0}
    beyond = benchkick.PerCpu()  # a sample past the range is kept at its end, before the fold and after
    for v in [benchkick.MAX_NS * 2] + values:
        beyond.record_value(v)
    assert benchkick.summary(beyond)["count"] == len(values) + 1
    assert benchkick.summary(beyond)["max"] >= benchkick.MAX_NS * 0.99


def test_a_build_killed_mid_compile_leaves_none_of_the_compiler_s_processes(tmp_path):
    """The compiler driver dies with the process that builds hwfloor, and so do the processes it
    started (cc1, as, ld): they run in a process group its shell kills when we die, even by SIGKILL
    (hostile review: cc1 and as outlived a killed `bench kick`). A stand-in compiler whose child
    sleeps a minute, so that only that kill can end it in time."""
    import shutil

    import psutil

    tools = tmp_path / "tools"
    tools.mkdir(mode=0o700)
    (tools / "cc").write_text("#!/bin/sh\n/bin/sleep 60 &\nwait\n")
    (tools / "cc").chmod(0o755)
    os.symlink(shutil.which("sh"), tools / "sh")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code = ("from smpd.tools import hwfloor\n"
            f"hwfloor.TOOL_PATH = {str(tools)!r}\n"
            "hwfloor._untrusted = lambda path, sticky_ok=False: None  # its trust is tested apart\n"
            f"hwfloor.build({str(private)!r})\n")
    builder = subprocess.Popen([sys.executable, "-c", code])
    try:
        sleeper = wait_until(lambda: next((c for c in psutil.Process(builder.pid).children(recursive=True)
                                           if c.name() == "sleep"), None), 30, "the stand-in compiler's child")
    finally:
        builder.kill()
        builder.wait()
    wait_until(lambda: gone(sleeper.pid), 10, "the compiler's child gone with the build")


def test_an_output_that_cannot_be_written_whole_is_an_error_and_leaves_nothing(parked4, tmp_path):
    """A file-size limit (or a nearly full filesystem) lets one write() take only part of the JSON:
    it used to be left cut short, with exit 0 and "wrote". Now the report is still printed, the
    error names the file, nothing of it is left, nor of the copy it could not keep either (the same
    limit), and the exit status is 1 (not bad input: the host's limit)."""
    import glob
    import resource
    import tempfile

    out = tmp_path / "k.json"
    kept_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "smpd-bench-kick-*.json")))

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    r = run_smpd("bench", "kick", "--rounds", "20", "--json", str(out), name=parked4.name, check=False,
                 preexec_fn=small_files)
    said = " ".join(r.stderr.split())
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"--json {out} could not be written" in said and "nothing of it is left" in said, said
    assert "could not be kept elsewhere either" in said and "round trip" in r.stdout, said
    assert not out.exists()
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "smpd-bench-kick-*.json"))) == kept_before
