"""MONITOR/MWAIT as mwait_play_dead() sees it: what wakes a parked CPU, and what it does then.

Each test parks CPUs with `smpd offline`, then acts on the machine the way
hardware would: a bus write, a signal standing for an NMI, the kernel's
control word. Counters in the observation plane say what the CPU saw.
"""

import os
import signal
import time

import psutil
import pytest

from conftest import HOT_PATHS, hot_paths, patient_config, wait_until
from smpd.host.proc import asleep_in_sigwait, stat_fields
from smpd.machine import events, layout as L

NMI = signal.SIGRTMIN + 1  # config/default.toml [signals]


def parked(c):
    return c["state"] == "MWAIT" and c["monitor"]["armed"]


@pytest.fixture(params=hot_paths("adaptive", "spin"))
def parked_machine(request, machine):
    """Three CPUs, two of them parked; under both watch strategies and both hot paths."""
    watch, hot_path = request.param
    m = machine(3, "--watch", watch, "--hot-path", hot_path)
    assert m.status()["machine"]["hot_path"] == hot_path
    m.request("offline", cpus="1-2")
    # `offline` returns once the CPUs report MWAIT; MONITOR is armed just after. A
    # single poke before that would be lost, as on hardware (the kick repeats its write).
    for cpu in (1, 2):
        m.wait_cpu(cpu, parked, "monitor armed")
    return m


def test_same_value_write_to_the_monitored_line_wakes_the_cpu_which_loops_back(parked_machine):
    m = parked_machine
    r = m.request("poke", target="mwait_cpu_dead[1]")  # rewrite control with its own value
    assert r["old"] == r["new"] == L.CPUDEAD_MWAIT_WAIT
    assert r["woken_cpus"] == [1]
    c = m.wait_cpu(1, lambda c: c["wakeups"]["write"] == 1 and parked(c), "wake on write, re-park")
    assert c["mwait_cpu_dead"]["control"] == L.CPUDEAD_MWAIT_WAIT  # loops back: not a kick
    assert m.cpu(2)["wakeups"]["write"] == 0


def test_write_to_any_byte_of_the_line_wakes_the_monitor(parked_machine):
    m = parked_machine
    status = m.cpu(1)["mwait_cpu_dead"]["addr"] + 4
    assert m.request("poke", target=hex(status))["woken_cpus"] == [1]
    # MWAIT ended with that write; wait until the loop has armed MONITOR again.
    m.wait_cpu(1, lambda c: c["wakeups"]["write"] == 1 and parked(c), "wake on write, re-armed")
    last_word = m.cpu(1)["mwait_cpu_dead"]["addr"] + L.LINE - 4
    assert m.request("poke", target=hex(last_word))["woken_cpus"] == [1]
    m.wait_cpu(1, lambda c: c["wakeups"]["write"] == 2 and parked(c), "second wake on write")


def test_writes_to_other_lines_wake_nobody(parked_machine):
    m = parked_machine
    md = m.cpu(1)["mwait_cpu_dead"]["addr"]
    # thread_info lines (the fix's kernel does not monitor them), CPU 0's line (no monitor), a page away.
    for target in ("thread_info[1]", "thread_info[2]", hex(md - 4), hex(md + L.PAGE), hex(L.PHYS_BASE + 0x40)):
        assert m.request("poke", target=target)["woken"] == 0, target
    # A write that does wake CPU 1 now; its count then says the writes above never did.
    m.request("poke", target="mwait_cpu_dead[1]")
    c = m.wait_cpu(1, lambda c: c["wakeups"]["write"] >= 1 and parked(c), "wake on write")
    assert c["wakeups"]["write"] == 1
    assert m.cpu(2)["wakeups"]["write"] == 0


def test_an_nmi_signal_wakes_the_parked_cpu_which_runs_the_handler_and_parks_again(parked_machine):
    m = parked_machine
    os.kill(m.cpu(2)["pid"], NMI)
    c = m.wait_cpu(2, lambda c: c["interrupts"]["nmi"]["taken"] == 1 and parked(c), "NMI taken, re-park")
    assert c["wakeups"]["interrupt"] == 1 and c["wakeups"]["write"] == 0
    assert c["mwait_cpu_dead"]["control"] == L.CPUDEAD_MWAIT_WAIT


def test_control_kexec_hlt_moves_the_cpu_to_hlt_and_it_acknowledges_in_status(parked_machine):
    m = parked_machine
    r = m.request("poke", target="mwait_cpu_dead[1].control", value=L.CPUDEAD_MWAIT_KEXEC_HLT)
    assert r["woken_cpus"] == [1]
    c = m.wait_cpu(1, lambda c: c["state"] == "HLT", "HLT")
    assert c["mwait_cpu_dead"]["status"] == L.CPUDEAD_MWAIT_KEXEC_HLT
    assert not c["monitor"]["armed"]
    # In HLT a write to the old line wakes nothing; an NMI does end HLT (the
    # residual hazard the patch names) and the CPU halts again.
    assert m.request("poke", target="mwait_cpu_dead[1]")["woken"] == 0
    os.kill(c["pid"], NMI)
    c = m.wait_cpu(1, lambda c: c["interrupts"]["nmi"]["taken"] == 1, "NMI ends HLT")
    assert c["state"] == "HLT"
    assert m.cpu(2)["state"] == "MWAIT"


@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_a_kick_is_acknowledged_and_recorded_alike_by_either_hot_path(machine, case, tmp_path):
    """The compiled path acknowledges and enters HLT itself (smpd/_hotpath.c); what it
    leaves behind must be what the Python path leaves: same events, state, counters.
    (One parked CPU: with the coordinator, two spinning processes fit two host cores.)"""
    watch, hot_path = case
    cfg = patient_config(tmp_path, rounds=1_000_000)
    m = machine(2, "--watch", watch, "--hot-path", hot_path, "--config", str(cfg))
    m.request("offline", cpus="1")
    m.wait_cpu(1, parked, "monitor armed")
    for round_ in (1, 2):
        r = m.request("kick")
        assert r["kick"]["stuck"] == [] and len(r["kick"]["cpus"]) == 1, r["kick"]
        assert all(e["acknowledged"] and e["rounds"] >= 1 and e["rtt_ns"] > 0 for e in r["kick"]["cpus"].values())
        mine = [e["event"] for e in r["timeline"] if e["cpu"] == 1]
        assert mine == ["MWAIT woken by a write to mwait_cpu_dead[1].control",
                        "sees control == CPUDEAD_MWAIT_KEXEC_HLT, acknowledges in status", "enters HLT"]
        c = m.cpu(1)
        assert c["state"] == "HLT" and not c["monitor"]["armed"], c
        assert c["mwait_cpu_dead"]["status"] == L.CPUDEAD_MWAIT_KEXEC_HLT
        assert c["wakeups"]["write"] == round_ and c["mwait_entries"] == round_
        m.request("reset")  # back into mwait_play_dead(), through Python's HLT loop
        m.wait_cpu(1, parked, "re-parked")
    # The compiled HLT hands over to Python at the next interrupt: it runs, and halts again.
    m.request("kick")
    os.kill(m.cpu(1)["pid"], NMI)
    c = m.wait_cpu(1, lambda c: c["interrupts"]["nmi"]["taken"] == 1, "NMI ends HLT")
    assert c["state"] == "HLT"


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_kick_of_a_sleeping_cpu_is_timed_in_two_parts(machine, hot_path, tmp_path):
    """A CPU its doorbell wakes stamps when its process runs again (woke_ns): the round trip splits
    into the wake-up (write -> running) and what follows. A CPU that spins has no such part."""
    cfg = patient_config(tmp_path, "[watch]\nspin_budget_us = 0\n")
    m = machine(2, "--watch", "adaptive", "--hot-path", hot_path, "--config", cfg)
    m.request("offline", cpus="1")
    pid = m.wait_cpu(1, parked, "monitor armed")["pid"]
    wait_until(lambda: asleep_in_sigwait(pid), what="CPU 1 asleep in sigwaitinfo()")
    e = m.request("kick")["kick"]["cpus"]["1"]
    assert e["acknowledged"] and 0 < e["wake_ns"] <= e["rtt_ns"], e
    m.request("reset")
    m.wait_cpu(1, parked, "re-parked")
    samples = m.request("bench_kick", targets="1", rounds=3)["samples"]["1"]
    # (-1: re-parked, the CPU was kicked again before it had gone back to sleep)
    assert all(len(s) == 5 and s[3] == 1 and (s[4] == -1 or 0 < s[4] <= s[1]) for s in samples), samples
    s = machine(2, "--watch", "spin", "--hot-path", hot_path, "--config", patient_config(tmp_path))
    s.request("offline", cpus="1")
    s.wait_cpu(1, parked, "monitor armed")
    e = s.request("kick")["kick"]["cpus"]["1"]
    assert e["acknowledged"] and "wake_ns" not in e, e


@pytest.mark.parametrize("case", [p for p in hot_paths("adaptive", "spin") if p.values[0][1] == "c"])
def test_the_first_kick_of_a_parked_cpu_takes_no_page_fault(machine, tmp_path, case):
    """The compiled wait reads the pages its resume checks will read (the old kernel's page tables,
    text and stack) before it waits: the segment is mapped shared, each page mapped at a forked
    process's first touch, so the first kick of a parked CPU found a page fault per tag on its
    way to the answer. Now its process takes none from the kick until it is in HLT."""
    cfg = patient_config(tmp_path, "[watch]\nspin_budget_us = 0\n")
    watch, hot_path = case
    m = machine(3, "--watch", watch, "--hot-path", hot_path, "--config", cfg)
    m.request("offline", cpus="1-2")
    pids = [m.wait_cpu(cpu, parked, "monitor armed")["pid"] for cpu in (1, 2)]
    if watch == "adaptive":
        wait_until(lambda: all(asleep_in_sigwait(p) for p in pids), what="CPUs 1-2 asleep in sigwaitinfo()")

    def minflt(pid):
        return int(stat_fields(pid)[7])  # field 10

    def settled():  # past map_tags, into the wait (spin: the monitor is armed just before it)
        first = [minflt(p) for p in pids]
        time.sleep(0.05)
        return [minflt(p) for p in pids] == first

    wait_until(settled, what="CPUs 1-2 taking no page faults while parked")
    before = [minflt(p) for p in pids]
    r = m.request("kick")["kick"]["cpus"]
    assert all(r[str(cpu)]["acknowledged"] for cpu in (1, 2)), r
    for cpu in (1, 2):
        m.wait_cpu(cpu, lambda c: c["state"] == "HLT", "HLT")
    assert [minflt(p) - b for p, b in zip(pids, before)] == [0, 0]


def test_online_from_hlt_resets_through_init(parked_machine):
    m = parked_machine
    m.request("poke", target="mwait_cpu_dead[2].control", value=L.CPUDEAD_MWAIT_KEXEC_HLT)
    m.wait_cpu(2, lambda c: c["state"] == "HLT", "HLT")
    m.request("online", cpus="2")
    c = m.cpu(2)
    assert c["state"] == "RUNNING" and c["mwait_cpu_dead"]["status"] == 0


@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_spurious_wakeups_loop_back_into_mwait(machine, tmp_path, case):
    watch, hot_path = case
    cfg = tmp_path / "spurious.toml"
    cfg.write_text("[watch]\nspurious_per_s = 200.0\n")
    m = machine(2, "--watch", watch, "--hot-path", hot_path, "--config", str(cfg))
    m.request("offline", cpus="1")
    c = m.wait_cpu(1, lambda c: c["wakeups"]["spurious"] >= 5 and parked(c), "spurious wake-ups")
    assert c["wakeups"]["write"] == 0 and c["mwait_cpu_dead"]["control"] == L.CPUDEAD_MWAIT_WAIT
    assert c["mwait_entries"] == 1  # it looped inside mwait_play_dead(), never left it


def test_interrupts_reach_online_cpus_too(machine):
    m = machine(2, "--watch", "adaptive")
    os.kill(m.cpu(1)["pid"], signal.SIGRTMIN + 3)  # MCE
    c = m.wait_cpu(1, lambda c: c["interrupts"]["mce"]["taken"] == 1, "MCE taken")
    assert c["state"] == "RUNNING"


@pytest.mark.parametrize("hot_path", HOT_PATHS)
@pytest.mark.parametrize("budget_us", [0, 50])
def test_no_burst_of_interrupts_goes_unnoticed_by_a_sleeping_cpu(machine, tmp_path, budget_us, hot_path):
    """Every burst of NMI signals wakes the CPU, whether it lands while the CPU spins,
    sleeps, or is in between. Signals of one kind that arrive before the CPU takes
    the first are merged (the NMI latch), so a burst counts at least once."""
    cfg = tmp_path / "budget.toml"
    cfg.write_text(f"[watch]\nspin_budget_us = {budget_us}\nhot_path = \"{hot_path}\"\n")
    m = machine(2, "--watch", "adaptive", "--config", str(cfg))
    assert m.status()["machine"]["hot_path"] == hot_path
    m.request("offline", cpus="1")
    pid = m.cpu(1)["pid"]
    sent = taken = 0
    for burst in range(40):
        for _ in range(burst % 3 + 1):
            os.kill(pid, NMI)
            sent += 1
        c = m.wait_cpu(1, lambda c: c["interrupts"]["nmi"]["taken"] > taken and parked(c),
                       f"burst {burst} taken, back in MWAIT")
        taken = c["interrupts"]["nmi"]["taken"]
    assert 40 <= taken <= sent
    assert c["wakeups"]["interrupt"] >= 40


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_an_nmi_that_arrives_with_the_kick_is_taken_first_in_mwait(machine, hot_path):
    """The NMI's signal is pending when the kick's write wakes the CPU: the CPU takes the
    NMI in MWAIT (the handler returns into the loop), then sees control and acknowledges,
    on either hot path (the compiled one runs pending handlers before it acknowledges)."""
    m = machine(2, "--watch", "adaptive", "--hot-path", hot_path)
    m.request("offline", cpus="1")
    c = m.wait_cpu(1, parked, "monitor armed")
    proc = psutil.Process(c["pid"])
    os.kill(c["pid"], signal.SIGSTOP)
    try:
        wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, what="CPU 1 stopped")
        os.kill(c["pid"], NMI)
        m.request("poke", target="mwait_cpu_dead[1].control", value=L.CPUDEAD_MWAIT_KEXEC_HLT)
    finally:
        os.kill(c["pid"], signal.SIGCONT)
    c = m.wait_cpu(1, lambda c: c["state"] == "HLT", "HLT")
    assert c["interrupts"]["nmi"]["taken"] == 1 and c["wakeups"]["interrupt"] == 1
    with m.segment() as seg:
        evs, _lost = events.read_since(seg, 1, 0)
    codes = [code for _ns, code, _arg in evs if code != L.Ev.SIPI]
    kick = codes.index(L.Ev.KICK_SEEN)
    assert L.Ev.INTERRUPT in codes[:kick] and codes[kick:] == [L.Ev.KICK_SEEN, L.Ev.HLT], codes


def _asleep(seg, cpus) -> bool:
    """Each of ``cpus`` sleeps in its waiter (its `sleeping` word)."""
    return all(seg.cb(c, "sleeping") == 1 for c in cpus)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_every_cpu_ends_its_own_spin_budget_and_sleeps(machine, tmp_path, hot_path):
    """Under adaptive, an idle CPU spins for its budget, then sleeps: on the Python hot path its
    own timer (SIGALRM) ends the spin. The template builds each CPU's Waiter before it forks the
    CPU's process (smpd.daemon.template), so the handler a Waiter installed when built would be
    the last one built, in every CPU process: the others' timers would go unheard, and they would
    spin for ever."""
    cfg = tmp_path / "budget.toml"
    cfg.write_text(f"[watch]\nspin_budget_us = 2000\nhot_path = \"{hot_path}\"\n")
    m = machine(4, "--watch", "adaptive", "--config", str(cfg))
    with m.segment() as seg:
        wait_until(lambda: _asleep(seg, range(1, 4)), timeout=30, what="CPUs 1-3 asleep once their spin budget ran out")


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_status_has_a_sleeping_cpus_host_core_from_the_cpu_itself(machine, hot_path):
    """An unpinned CPU's host core: a sleeping CPU stores the core it goes to sleep on (its
    `sleep_core` word, before `sleeping`), which `smpd status` takes instead of a /proc read
    (~37 us a CPU: 0.15 s of a 4096-CPU `status --json`). A word planted in each, then an NMI that
    wakes each CPU and lets it sleep again: status shows where the host says it sleeps."""
    m = machine(4, "--watch", "adaptive", "--hot-path", hot_path)
    cpus = range(1, 4)
    with m.segment() as seg:
        wait_until(lambda: _asleep(seg, cpus), what="CPUs 1-3 asleep")
        woke = {c: seg.cb(c, "activity") for c in cpus}
        for c in cpus:
            seg.set_cb(c, "sleep_core", 12345)
            os.kill(seg.cb(c, "pid"), NMI)
        wait_until(lambda: _asleep(seg, cpus) and all(seg.cb(c, "activity") != woke[c] for c in cpus),
                   what="CPUs 1-3 woken by their NMI, and asleep again")
        s = m.status()
        for c in cpus:
            cpu = s["cpus"][c]
            assert cpu["core"] == psutil.Process(cpu["pid"]).cpu_num() == seg.cb(c, "sleep_core"), cpu
