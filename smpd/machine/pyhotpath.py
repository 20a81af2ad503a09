"""The Python peer of smpd/machine/_hotpath.c: the same Waiter and Kicker, in Python.

A machine runs one of the two (smpd.machine.hotpath chooses); smpd.kernel.cpu
and smpd.kernel.kick call them through the same methods and never ask which:

    Waiter.wait(spin_ns, deadline_ns, ack) -> (code, arg, acked_ns)
    Kicker.kick_one(md_off, kexec_hlt, delay_ns, rounds) -> (acknowledged, rounds, t_first_ns, t_ack_ns)
    Kicker.kick_each(md_offs, kexec_hlt, waiting, delay_ns, rounds) -> [kick_one's tuple, or None]

Two differences are by design. First, ``ack``: the compiled Waiter, given an Ack,
runs the woken path of mwait_play_dead() through the acknowledgement itself, because
the interpreter between the wake-up and the status store was most of the kick's
latency. Here the interpreter *is* that path, so smpd.kernel.cpu runs it, and
this Waiter takes ``ack=None`` only (hotpath.ack() gives None on a Python machine).
Second, the compiled Kicker, when the CPU it kicks is awake, looks at status right
after its store and does the rest of the bus's rule (fences, directory, WRITE byte)
after those looks, off the round trip; here one look costs more than the rule.
tests/test_hotpath.py drives both backends through the same steps.

The spin here cannot read a clock per iteration and stay one load and one
compare, so a spin with an end (the adaptive budget, a spurious wake-up's
deadline) arms ITIMER_REAL, whose SIGALRM raises the wake word's TIMER byte:
that byte ends the loop and is cleared again before anyone else sees it.
"""

from __future__ import annotations

import os
import signal
import struct
import time

from smpd.host.proc import current_core
from smpd.machine import layout as L
from smpd.machine.sync import fence

WOKE, TIMEOUT, SIGNAL = 0, 1, 2  # the same codes as smpd.machine._hotpath's


class Waiter:
    """One CPU's watch loop over its wake words (`wake`, `mon_write`) and its `sleeping` flag in ``seg``."""

    lone = False  # the compiled Waiter's (its process's only thread); this path wakes the interpreter for each

    def __init__(self, seg, cpu: int, irq_signals, doorbell: int, spin_yields: bool = False):
        self.u32, self.buf = seg.u32, seg.buf
        self.i = seg.cb_index32(cpu, "wake")
        self.w = seg.cb_index32(cpu, "mon_write")
        self.timer_byte = self.i * 4 + L.WAKE_TIMER
        self.sleeping = seg.cb_index32(cpu, "sleeping")
        self.sleep_core = seg.cb_index32(cpu, "sleep_core")
        self.u64, self.woke = seg.u64, seg.cb_index(cpu, "woke_ns")
        self.irq = frozenset(irq_signals)
        self.sleep_set = self.irq | {doorbell}
        self.yields = spin_yields
        self.timer_armed = False
        self.alarm_ours = False  # SIGALRM's handler is this Waiter's

    def install_signal_handlers(self) -> None:
        """SIGALRM's handler: this Waiter's timer. Set by the CPU process that runs it (a CPU's
        Waiter is built in the template, before the fork: smpd.daemon.template), or at its first
        timer when no one did."""
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.alarm_ours = True

    def _on_alarm(self, _signum, _frame) -> None:
        if self.timer_armed:  # a late SIGALRM of a cancelled timer is dropped
            self.buf[self.timer_byte] = 1

    def _disarm(self) -> None:
        """Stop the spin's timer and take back its byte if it fired."""
        self.timer_armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.buf[self.timer_byte] = 0

    def wait(self, spin_ns: int, deadline_ns: int, ack=None, init=None) -> tuple[int, int, int]:
        """Spin for ``spin_ns`` (-1: until woken; 0: not at all), then sleep in sigwaitinfo() on
        the doorbell and interrupt signals; ``deadline_ns`` (CLOCK_MONOTONIC, 0 = none) ends the
        wait as TIMEOUT. WOKE leaves the wake words for the caller; SIGNAL's arg is the interrupt
        signal taken while asleep. acked_ns is always 0 (see the module comment)."""
        if ack is not None or init is not None:
            raise TypeError("the Python Waiter neither acknowledges kicks nor takes INITs: smpd.kernel.cpu "
                            "does; pass ack=None, init=None")
        u32, i, w = self.u32, self.i, self.w
        if u32[i] or u32[w]:
            return WOKE, 0, 0
        if spin_ns:
            now = time.monotonic_ns()
            end = 0 if spin_ns < 0 else now + spin_ns
            if deadline_ns and (not end or deadline_ns < end):
                end = deadline_ns
            if end:
                if not self.alarm_ours:
                    self.install_signal_handlers()
                self.timer_armed = True
                signal.setitimer(signal.ITIMER_REAL, max(end - now, 1000) / 1e9)
            if self.yields:  # spinners outnumber host cores: share them
                while u32[i] == 0 == u32[w]:
                    os.sched_yield()
            while u32[i] == 0 == u32[w]:  # THE HOT LOOP: a load and a compare of each word
                pass
            if end:
                self._disarm()
            if u32[i] or u32[w]:
                return WOKE, 0, 0
            if spin_ns < 0 or time.monotonic_ns() >= deadline_ns > 0:
                return TIMEOUT, 0, 0
        return self._sleep(deadline_ns)

    def _sleep(self, deadline_ns: int) -> tuple[int, int, int]:
        """Sleep until a byte is raised, the deadline passes, or an interrupt signal comes.

        Why sigtimedwait and not a futex: a Python signal handler runs some bytecodes
        after its signal arrived. A signal landing between our last look at the wake
        word and a futex syscall would leave the handler's byte unset while we sleep:
        a lost interrupt. So while sleeping the interrupt signals are blocked and we
        wait for them *and* for the bus's doorbell in one sigtimedwait, which takes a
        pending signal atomically.
        """
        u32, i, w = self.u32, self.i, self.w
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.irq)
        try:
            # fence() is a Python call: its entry runs the handler of any interrupt that
            # arrived before the block, so its byte is raised before we look.
            u32[self.sleep_core] = current_core() & 0xFFFFFFFF  # where `smpd status` finds our host core
            u32[self.sleeping] = 1
            fence()  # pairs with the fence in Bus.wake: we see its byte or it sees `sleeping`
            rung = 0
            while u32[i] == 0 == u32[w]:
                if deadline_ns:
                    left = deadline_ns - time.monotonic_ns()
                    if left <= 0:
                        return TIMEOUT, 0, 0
                    info = signal.sigtimedwait(self.sleep_set, left / 1e9)
                else:
                    info = signal.sigwaitinfo(self.sleep_set)
                if info is not None and info.si_signo in self.irq:
                    return SIGNAL, info.si_signo, 0
                # the doorbell (or the timeout): look at the wake words again
                rung = time.monotonic_ns() if info is not None else 0
            if rung:  # woken by the doorbell, running again (smpd.kernel.kick times a kick with it)
                self.u64[self.woke] = rung
            return WOKE, 0, 0
        finally:
            u32[self.sleeping] = 0
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Kicker:
    """The coordinator's kick of one CPU, over the segment, writing through ``bus``."""

    def __init__(self, seg, bus, spin_yields: bool = False):
        self.seg, self.bus = seg, bus
        self.mem_off, self.mem_len = seg.geo.mem_off, seg.geo.npages * L.PAGE
        self.dir_base = seg.geo.dir_off // L.DIR_ENTRY
        self.sleeping = [seg.cb_index32(c, "sleeping") for c in range(seg.geo.ncpus)]
        self.yields = spin_yields

    def kick_one(self, md_off: int, kexec_hlt: int, delay_ns: int, rounds: int) -> tuple[bool, int, int, int]:
        """smp_kick_mwait_play_dead() for one CPU whose mwait_cpu_dead sits at ``md_off`` in
        emulated memory: write control = ``kexec_hlt`` through the bus, udelay(delay), at most
        ``rounds`` times, until status says so. t_ack_ns is 0 when the CPU never answered."""
        if md_off < 0 or md_off % 4 or md_off + 8 > self.mem_len:
            raise ValueError(f"mwait_cpu_dead offset {md_off} is outside emulated memory")
        u32 = self.seg.u32
        status = (self.mem_off + md_off + 4) // 4
        control = struct.pack("<I", kexec_hlt)
        addr = L.PHYS_BASE + md_off
        owner = self.seg.u16[self.dir_base + md_off // L.LINE]  # the monitor's CPU, + 1 (0: none)
        sleeping = self.sleeping[owner - 1] if 0 < owner <= len(self.sleeping) else None
        done = u32[status] == kexec_hlt  # the loop's first test, before the first write (as in C)
        t_first = time.monotonic_ns()  # after the look-ups above: they are not the kick's latency
        t_ack = 0
        i = 0
        give_core = False
        # Wait up to 5ms
        while i < rounds and not done:
            # udelay() counts from the write: the bus's rule, and what the CPU it wakes does on
            # this host core meanwhile, are inside it (as in C)
            end = (time.monotonic_ns() if i else t_first) + delay_ns
            self.bus.write(addr, control)  # Bring it out of mwait
            # A sleeping CPU needs a host core to wake up on, perhaps this one: then the
            # udelay below yields it between looks (on a 2-core host a pure busy-wait
            # here held the woken CPU off until the scheduler's slice ended, ~3-4 ms).
            # So for the rest of its kick too, once its doorbell rang.
            give_core = give_core or self.yields or (sleeping is not None and u32[sleeping])
            while True:  # udelay(delay_us), watching status to time the acknowledgement
                if not t_ack and u32[status] == kexec_hlt:
                    t_ack = time.monotonic_ns()  # read after the load: never before the ack
                if time.monotonic_ns() >= end:
                    break
                if give_core:
                    os.sched_yield()
            i += 1
            done = u32[status] == kexec_hlt
        acked = done
        if acked and not t_ack and i:  # it answered between the udelay's last look and the loop's test
            t_ack = time.monotonic_ns()
        return acked, i, t_first, t_ack

    def kick_each(self, md_offs, kexec_hlt: int, waiting: int, delay_ns: int, rounds: int) -> list:
        """kick_one() of each mwait_cpu_dead in turn whose status is ``waiting`` at its turn (None
        for the others); the list ends after the first CPU that did not answer."""
        out: list = []
        for md_off in md_offs:
            if md_off < 0 or md_off % 4 or md_off + 8 > self.mem_len:
                raise ValueError(f"mwait_cpu_dead offset {md_off} is outside emulated memory")
        for md_off in md_offs:
            if self.seg.u32[(self.mem_off + md_off + 4) // 4] != waiting:
                out.append(None)
                continue
            out.append(self.kick_one(md_off, kexec_hlt, delay_ns, rounds))
            if not out[-1][0]:
                break
        return out
