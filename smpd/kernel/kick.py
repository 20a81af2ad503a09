"""smp_kick_mwait_play_dead(), as the kernel writes it, with every instant timed.

For each present-but-offline CPU that sits in mwait_play_dead() (status ==
CPUDEAD_MWAIT_WAIT): write control = CPUDEAD_MWAIT_KEXEC_HLT, udelay(5), again,
at most 1000 times ("Wait up to 5ms"), until the CPU answers in status; report
a CPU that never does once (pr_err_once). A kick has three instants (DESIGN.md
§6), all CLOCK_MONOTONIC ns: the coordinator's first control write, the CPU
seeing it (it stamps kick_seen_ns), and the coordinator seeing status change.
A CPU its doorbell woke has one more, between the first two: its process
running again (woke_ns), which splits the round trip into the wake-up (mostly
the host's: the signal, the wake-up, its scheduler) and what follows it.

Cost: a round is one bus write (a monitored line: two fences, and a doorbell
kill() when the CPU sleeps) plus the udelay busy-wait, which polls status so the
acknowledgement is timed to the poll, not to the next round. When the CPU
sleeps (watch adaptive), the poll yields the host core between looks. The loop
itself is the machine's hot path (smpd.machine.hotpath: compiled, or its Python
peer); this module times and reports it.
"""

from __future__ import annotations

import time
from typing import Callable

from smpd.machine import layout as L


def kick_one(seg, bus, cpu: int, md: int, delay_ns: int, rounds: int) -> dict:
    """Kick one CPU (its mwait_cpu_dead at ``md``) out of mwait_play_dead(); returns its timings
    and the kernel's round count."""
    seen_before = seg.cb(cpu, "kick_seen_ns")
    acked, i, t_first, t_ack = bus.kicker.kick_one(md - L.PHYS_BASE, L.CPUDEAD_MWAIT_KEXEC_HLT, delay_ns, rounds)
    return _entry(seg, cpu, acked, i, t_first, t_ack or None, seen_before)


def _entry(seg, cpu: int, acked: bool, rounds: int, t_first: int, t_ack: int | None, seen_before: int) -> dict:
    entry = {"acknowledged": acked, "rounds": rounds, "first_write_ns": t_first}
    if acked and rounds and t_ack:  # (answered before any write: no round trip to time; both
        # kickers stamp every answer they see after a write, and an entry built after the whole
        # kick must not stand in a later clock for a missing stamp)
        entry["rtt_ns"] = t_ack - t_first
        seen = seg.cb(cpu, "kick_seen_ns")
        # One way: the write -> the CPU's answer. A compiled CPU that saw the kick on its control
        # word stamps right after its answer (a clock its spin keeps warm); one woken by the WRITE
        # byte, and the Python CPU, just before: a stamp after the
        # kicker's own sight of that answer (the stamp's clock read raced the kicker's look, or the
        # CPU's process lost its core between the two) gives no one-way sample, not a made-up one.
        if seen != seen_before and t_first <= seen <= t_ack:
            entry["one_way_ns"] = seen - t_first
        # A CPU asleep when kicked: the write -> its process running again (woke_ns, stamped by its
        # Waiter when sigwaitinfo() returned its doorbell and it went on to look at its wake words).
        # Mostly the host's wake-up; the rest of the round trip is the CPU's way to its answer and
        # the kicker's look. None for a CPU its doorbell did not wake between the write and the ack.
        woke = seg.cb(cpu, "woke_ns")
        if t_first <= woke <= t_ack:
            entry["wake_ns"] = woke - t_first
    return entry


def smp_kick_mwait_play_dead(seg, bus, m, cpus: list[int], delay_ns: int, rounds: int,
                             during: Callable[[], None] = lambda: None,
                             log: Callable[[str], None] = lambda _msg: None) -> dict:
    """Kick every CPU of ``cpus`` (the present-but-offline ones) that waits in mwait_play_dead(),
    through the per-CPU mwait_cpu_dead of the running kernel's map ``m`` (per_cpu_ptr()).

    ``during`` runs once, halfway through the CPUs that get kicked; ``total_ns`` leaves out
    the time it took (``during_ns``): the kernel's loop goes on while an NMI lands elsewhere.
    """
    mds = {c: m.mwait_cpu_dead_addr(c) for c in cpus}
    waiting = [c for c in cpus if seg.mem_u32(mds[c] + 4) == L.CPUDEAD_MWAIT_WAIT]
    half = waiting[len(waiting) // 2] if waiting else None
    seen_before = {c: seg.cb(c, "kick_seen_ns") for c in cpus}  # a CPU stamps it only when kicked
    kicked: list[tuple[int, tuple]] = []  # (cpu, the kicker's (acknowledged, rounds, t_first, t_ack)), in turn
    stuck: list[int] = []

    def on_kicked(cpu: int, r: tuple) -> None:
        kicked.append((cpu, r))
        if not r[0]:
            if not stuck:  # pr_err_once(): one line per kexec, however many are stuck
                log(f"pr_err_once: smpboot: CPU{cpu} is stuck in mwait_play_dead()")  # the kernel's pr_fmt
            stuck.append(cpu)

    t_start = time.monotonic_ns()
    during_ns = 0  # what `during` took (an injection waits for its interrupt to be taken): not the kick's

    def during_timed() -> None:
        nonlocal during_ns
        t = time.monotonic_ns()
        during()
        during_ns = time.monotonic_ns() - t

    if not waiting:
        during_timed()
    # The loop over CPUs runs in the machine's hot path (Kicker.kick_each: "Does it sit in
    # mwait_play_dead() ?", then kick_one), in two parts around ``during``.
    # ``during`` runs at the middle CPU's turn whatever it does then; that CPU is kicked if it
    # waited just before (its status is read once, as the kernel's loop reads it).
    at_half = cpus.index(half) if half is not None else len(cpus)
    for k, part in enumerate((cpus[:at_half], cpus[at_half:])):
        if k == 1 and part:
            sits = seg.mem_u32(mds[half] + 4) == L.CPUDEAD_MWAIT_WAIT
            during_timed()
            if sits:
                on_kicked(half, bus.kicker.kick_one(mds[half] - L.PHYS_BASE, L.CPUDEAD_MWAIT_KEXEC_HLT, delay_ns,
                                                    rounds))
            part = part[1:]
        _kick_in_turn(bus, part, mds, delay_ns, rounds, on_kicked)
    total = time.monotonic_ns() - t_start - during_ns
    # Each kicked CPU's timings, off the kick's clock (the kernel's loop has no pause between two
    # CPUs): its stamps are read only now. A CPU in HLT stamps no kick_seen_ns again in this kick,
    # and a woke_ns of a later wake-up falls outside its kick's window: no sample, not a wrong one.
    per = {cpu: _entry(seg, cpu, acked, i, t_first, t_ack or None, seen_before[cpu])
           for cpu, (acked, i, t_first, t_ack) in kicked}
    return {**_summary(per, stuck, delay_ns, rounds), "total_ns": total, "during_ns": during_ns}


def _summary(per: dict[int, dict], stuck: list[int], delay_ns: int, rounds: int) -> dict:
    """A kick's figures over its CPUs' entries: the stuck (pr_err_once's line names the first), the
    late, the budget and the round trip's p50 and max."""
    rtts = sorted(e["rtt_ns"] for e in per.values() if "rtt_ns" in e)
    # Acknowledged within the kernel's rounds, but later than their time on hardware: each round here
    # is a control write and at least udelay(5), longer when the host gives the kicker's core away
    # meanwhile (the woken CPU's process may run there first). The kernel counts rounds too, but
    # its rounds last 5 us: an answer this late would have been pr_err_once's there.
    late = sorted(cpu for cpu, e in per.items() if e["acknowledged"] and e.get("rtt_ns", 0) > delay_ns * rounds)
    return {"cpus": per, "stuck": stuck, "late": late,
            "message": f"CPU{stuck[0]} is stuck in mwait_play_dead()" if stuck else None,
            "budget_ns": delay_ns * rounds, "delay_ns": delay_ns, "rounds": rounds,
            "rtt_p50_ns": rtts[len(rtts) // 2] if rtts else None, "rtt_max_ns": rtts[-1] if rtts else None}


def _kick_in_turn(bus, part: list[int], mds: dict[int, int], delay_ns: int, rounds: int,
                  on_kicked: Callable[[int, tuple], None]) -> None:
    """Kick each CPU of ``part`` that waits in mwait_play_dead() at its turn: ``on_kicked(cpu, the
    kicker's result)`` for each, one that does not answer before the CPUs after it are kicked."""
    while part:
        done = bus.kicker.kick_each([mds[c] - L.PHYS_BASE for c in part], L.CPUDEAD_MWAIT_KEXEC_HLT,
                                    L.CPUDEAD_MWAIT_WAIT, delay_ns, rounds)
        for cpu, r in zip(part, done):
            if r is not None:
                on_kicked(cpu, r)
        part = part[len(done):]


def parked(seg, m, cpu: int) -> bool:
    """Parked in mwait_play_dead() of the running kernel ``m``, status CPUDEAD_MWAIT_WAIT: a CPU
    the fix's kick would visit (a pre-fix kernel has no kick)."""
    return (seg.cb(cpu, "state") == L.ExecState.MWAIT and not m.boot.monitors_thread_info
            and seg.cb(cpu, "cpu_gen") == m.gen
            and seg.mem_u32(m.mwait_cpu_dead_addr(cpu) + 4) == L.CPUDEAD_MWAIT_WAIT)


def bench_rounds(seg, bus, m, cpus: list[int], rounds: int, delay_ns: int, budget: int,
                 repark: Callable[[list[int]], list[int]]) -> dict[str, list]:
    """`smpd bench kick`'s work: ``rounds`` rounds of kick_one() on each of ``cpus``, then
    ``repark`` them all (it returns the CPUs that did not re-park: then TimeoutError). Raw
    samples per CPU: [one way ns, round trip ns (-1: none), kernel rounds, acknowledged, write -> running
    again ns (wake_ns; -1: no doorbell woke the CPU)]."""
    samples: dict[str, list] = {str(c): [] for c in cpus}
    for _ in range(rounds):
        for cpu in cpus:
            e = kick_one(seg, bus, cpu, m.mwait_cpu_dead_addr(cpu), delay_ns, budget)
            samples[str(cpu)].append([e.get("one_way_ns", -1), e.get("rtt_ns", -1), e["rounds"],
                                      int(e["acknowledged"]), e.get("wake_ns", -1)])
        missing = repark(cpus)
        if missing:
            raise TimeoutError(missing)
    return samples
