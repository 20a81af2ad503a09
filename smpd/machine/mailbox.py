"""The IPI mailbox, the coordinator's half: post a command to CPUs and wait for their answers.

Each CPU's control block holds a mailbox (smpd.machine.layout: mbox_seq, mbox_cmd,
mbox_arg, mbox_ack, mbox_result). The coordinator writes cmd and arg, then bumps seq,
and raises the CPU's IPI wake byte through the bus; the CPU (smpd.machine.core) reads
seq then cmd, handles it, writes result, then sets ack = seq. Every wait here is
bounded, and a CPU whose process died is reported, never waited for.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from smpd.machine import layout as L


# What follows a message's first IPI: the same for every CPU, or each CPU's own.
Then = tuple[L.Ipi, ...] | dict[int, tuple[L.Ipi, ...]]


def following(then: Then, cpu: int) -> tuple[L.Ipi, ...]:
    """The IPIs that follow the first in ``cpu``'s message."""
    return then.get(cpu, ()) if isinstance(then, dict) else then


# Between two looks at the answers a wait sleeps at most PAUSE_S (a message to 63 sleeping CPUs
# takes 5-20 ms to answer here, and the last answer is seen at most that late), then SLOW_PAUSE_S
# once it has waited SLOW_AFTER_S (a CPU stopped, or starved: no need to look 4000 times a
# second). `smpd soak --trials 200` at 64 CPUs (adaptive, CPUs 1-63 offline), alternated with 1 ms
# from the start: 0.25 ms throughout was ahead in 6 pairs of 6 (medians 16.3 / 15.65 trials/s);
# this, in 4 pairs of 5 (17.0 / 16.2).
PAUSE_S, SLOW_PAUSE_S, SLOW_AFTER_S = 0.00025, 0.001, 0.05
SPIN_S = 0.002  # a ``spin`` mailbox polls without sleeping this long, then as any other: a CPU that
# does not answer (stopped, or not scheduled) must not hold the coordinator's core for the whole wait


class Mailbox:
    """Send IPIs over ``seg``'s mailboxes. ``alive(cpus)`` says which of some CPUs' processes
    live (asked once a look, of the CPUs not answered yet); ``gone(cpu)`` is called once for
    each CPU found dead while waiting; ``poll()`` runs between looks (the coordinator's check
    for a stop request).

    ``spin``: the coordinator has a host core of its own (the machine fits the host), and polls
    its answers without sleeping for SPIN_S, then sleeps between looks as any other. A host-side
    policy, not the kernel's: native_stop_other_cpus() does busy-wait (udelay(1)) for its REBOOT
    and NMI answers, but cpu hotplug's waits (cpuhp_wait_for_sync_state()) sleep after 1 ms, and
    REPARK (bench kick's) has no kernel counterpart. It is for the kick that follows: a
    coordinator that slept between two IPIs ran the next kick on a host core gone idle
    (bench_kick: a spin kick's round trip twice as long)."""

    def __init__(self, seg, bus, alive: Callable[[Iterable[int]], set[int]], gone: Callable[[int], None],
                 poll: Callable[[], None] = lambda: None, spin: bool = False):
        self.seg, self.bus = seg, bus
        self.alive, self.gone, self.poll = alive, gone, poll
        self.spin = spin

    def send(self, cpu: int, cmd: L.Ipi, then: tuple[L.Ipi, ...] = ()) -> int:
        """Post ``cmd``, and the IPIs ``then`` that follow it in the same message (MBOX_FOLLOWERS
        at most), to ``cpu``'s mailbox and raise its IPI byte; returns the sequence to await."""
        if len(then) > L.MBOX_FOLLOWERS:
            raise ValueError(f"a mailbox message carries {L.MBOX_FOLLOWERS} IPIs after its first, not {len(then)}")
        seg = self.seg
        seq = (seg.cb(cpu, "mbox_seq") + 1) & 0xFFFFFFFF
        seg.set_cb(cpu, "mbox_cmd", cmd)
        seg.set_cb(cpu, "mbox_arg", L.mbox_arg(then))
        seg.set_cb(cpu, "mbox_seq", seq)  # last: the CPU reads seq, then cmd
        self.bus.wake(cpu, L.WAKE_IPI)
        return seq

    def send_and_wait(self, cpus: list[int], cmd: L.Ipi, timeout_s: float,
                      then: Then = ()) -> tuple[dict[int, int], list[int]]:
        """Send ``cmd`` to every CPU in ``cpus`` at once and wait (bounded) for their acks.

        ``then``: the IPIs that follow ``cmd`` in the same message (INIT, then SIPI, as the BSP
        sends them back to back), or each CPU's: the CPU takes each in the same wake-up once it is
        done with the one before, and acknowledges once, with the answer to the last it took.
        Every CPU gets its message at once: a scheduling choice of the emulator's that no outcome
        depends on (pre-fix kernels bring APs up one by one, 6.5+ kick each in turn, runtime
        cpu_up() is serial).

        Returns ({cpu: result} of those that acknowledged, [cpus that did not]); a CPU whose
        process died is handed to ``gone`` and counted as not acknowledging.
        """
        waiting = {cpu: self.send(cpu, cmd, following(then, cpu)) for cpu in cpus}
        results: dict[int, int] = {}
        dead: list[int] = []
        now = time.monotonic()
        deadline, slow_after = now + timeout_s, now + SLOW_AFTER_S
        spin_until = now + SPIN_S if self.spin else 0.0
        pause = 0.0
        while waiting:
            for cpu, seq in list(waiting.items()):
                if self.seg.cb(cpu, "mbox_ack") == seq:
                    results[cpu] = self.seg.cb(cpu, "mbox_result")
                    del waiting[cpu]
            living = self.alive(list(waiting)) if waiting else set()
            for cpu in [c for c in waiting if c not in living]:
                self.gone(cpu)
                dead.append(cpu)
                del waiting[cpu]
            if not waiting or time.monotonic() > deadline:
                break
            self.poll()
            if time.monotonic() < spin_until:
                os.sched_yield()
                continue
            time.sleep(pause)
            pause = min(PAUSE_S if time.monotonic() < slow_after else SLOW_PAUSE_S, pause * 2 or 0.00002)
        return results, sorted([*waiting, *dead])
