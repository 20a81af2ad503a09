"""smp_kick_mwait_play_dead(), as the kernel writes it, with every instant timed.

For each present-but-offline CPU that sits in mwait_play_dead() (status ==
CPUDEAD_MWAIT_WAIT): write control = CPUDEAD_MWAIT_KEXEC_HLT, udelay(5), again,
at most 1000 times ("Wait up to 5ms"), until the CPU answers in status; report
a CPU that never does once (pr_err_once). A kick has three instants (DESIGN.md
§6), all CLOCK_MONOTONIC ns: the coordinator's first control write, the CPU
seeing it (it stamps kick_seen_ns), and the coordinator seeing status change.

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
    if acked:
        t_ack = t_ack or time.monotonic_ns()
        entry["rtt_ns"] = t_ack - t_first
        seen = seg.cb(cpu, "kick_seen_ns")
        # The compiled CPU stamps it right after its answer (a clock it keeps warm while it spins;
        # the Python CPU, just before): when the kicker saw that answer first (the stamp's clock
        # read raced the kicker's look, or the CPU's process lost its core between the two), the
        # CPU had seen the kick by then.
        if seen != seen_before and seen >= t_first:
            entry["one_way_ns"] = min(seen, t_ack) - t_first
    return entry


def smp_kick_mwait_play_dead(seg, bus, m, cpus: list[int], delay_ns: int, rounds: int,
                             during: Callable[[], None] = lambda: None,
                             log: Callable[[str], None] = lambda _msg: None) -> dict:
    """Kick every CPU of ``cpus`` (the present-but-offline ones) that waits in mwait_play_dead(),
    through the per-CPU mwait_cpu_dead of the running kernel's map ``m`` (per_cpu_ptr()).

    ``during`` runs once, halfway through the CPUs that get kicked.
    """
    waiting = [c for c in cpus if seg.mem_u32(m.mwait_cpu_dead_addr(c) + 4) == L.CPUDEAD_MWAIT_WAIT]
    half = waiting[len(waiting) // 2] if waiting else None
    per: dict[int, dict] = {}
    stuck: list[int] = []
    message = None
    t_start = time.monotonic_ns()
    if not waiting:
        during()
    for cpu in cpus:
        # Does it sit in mwait_play_dead() ?
        md = m.mwait_cpu_dead_addr(cpu)
        if seg.mem_u32(md + 4) != L.CPUDEAD_MWAIT_WAIT:
            continue
        if cpu == half:
            during()
        per[cpu] = entry = kick_one(seg, bus, cpu, md, delay_ns, rounds)
        if not entry["acknowledged"]:
            stuck.append(cpu)
            if message is None:  # pr_err_once(): one line per kexec, however many are stuck
                message = f"CPU{cpu} is stuck in mwait_play_dead()"
                log(f"pr_err_once: {message}")
    total = time.monotonic_ns() - t_start
    rtts = sorted(e["rtt_ns"] for e in per.values() if "rtt_ns" in e)
    return {"cpus": per, "stuck": stuck, "message": message, "total_ns": total,
            "budget_ns": delay_ns * rounds, "delay_ns": delay_ns, "rounds": rounds,
            "rtt_p50_ns": rtts[len(rtts) // 2] if rtts else None, "rtt_max_ns": rtts[-1] if rtts else None}


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
    samples per CPU: [one way ns, round trip ns (-1: none), kernel rounds, acknowledged]."""
    samples: dict[str, list] = {str(c): [] for c in cpus}
    for _ in range(rounds):
        for cpu in cpus:
            e = kick_one(seg, bus, cpu, m.mwait_cpu_dead_addr(cpu), delay_ns, budget)
            samples[str(cpu)].append([e.get("one_way_ns", -1), e.get("rtt_ns", -1), e["rounds"],
                                      int(e["acknowledged"])])
        missing = repark(cpus)
        if missing:
            raise TimeoutError(missing)
    return samples
