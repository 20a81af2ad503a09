"""A CPU process: the emulated kernel code for whatever state the CPU is in, and nothing else.

Each state is a method that runs until the CPU leaves that state and returns the
next state's method; the process runs until the coordinator cuts the power (SIGKILL):

    wait_for_sipi --SIPI--> start_secondary/smp_callin --> running
    running --CPU_DOWN--> play_dead --> mwait_play_dead --(control == KEXEC_HLT)--> hlt
    running --REBOOT--> stop_this_cpu --> hlt;  running --NMI_STOP--> nmi_stop --> hlt
    any state --INIT--> wait_for_sipi

The hardware it runs on (waiting, MONITOR/MWAIT, interrupt signals, the IPI
mailbox) is smpd.machine.core.CpuCore; this class adds the kernel: the
smpboot routines with the kernel's names, the generation and memory map the CPU
runs in; what happens when it executes again after a wake-up or an interrupt is
smpd.kernel.execute.Executes; where the compiled hot path takes it on its own, and how
a state goes on from there (``woken_with``), smpd.kernel.handoff.Handoff.
"""

from __future__ import annotations

import os
import struct
import sys
import time

from smpd.kernel import resume as resume_mod
from smpd.kernel.execute import Executes
from smpd.kernel.generations import Generations
from smpd.kernel.handoff import Handoff, Woken
from smpd.kernel.memmap import TEXT_PLAY_DEAD, MemoryMap
from smpd.machine import events, layout as L
from smpd.machine.bus import Bus
from smpd.machine.core import IPI_DONE, IPI_IGNORED, M_IPI, M_IRQ, M_TIMER, M_WRITE, CpuCore

__all__ = ["Cpu", "cpu_main", "IPI_DONE", "IPI_IGNORED"]

_MD = struct.Struct("<II")  # struct mwait_cpu_dead { u32 control; u32 status; }
_KEXEC_HLT = struct.pack("<I", L.CPUDEAD_MWAIT_KEXEC_HLT)
_MWAIT_WAIT = struct.pack("<I", L.CPUDEAD_MWAIT_WAIT)


class Cpu(Executes, Handoff, CpuCore):
    def __init__(self, seg, bus: Bus, cpu: int, signals: dict[str, int], gens: Generations | None = None):
        super().__init__(seg, bus, cpu, signals)
        self.gens = gens or Generations(seg)  # given: maps built before the fork (smpd.daemon.template)
        self.gen = 0  # the kernel generation this CPU runs (set by smp_callin)
        self.map: MemoryMap | None = None  # that generation's memory map
        self.started_in = b""  # its entry in the header's table when smp_callin() read it
        self.plans: dict[tuple, resume_mod.ResumePlan] = {}  # by (map, text page)
        self.kick_acks: dict[MemoryMap, object] = {}  # hotpath.Ack by memory map (compiled path)
        # Halted inside an NMI handler (the NMI stop): no IRET ever unblocks NMIs, so a later NMI
        # stays latched, never taken. Only INIT clears it.
        self.nmi_blocked = False

    def run(self, came=None) -> None:
        """From power-on: in wait-for-SIPI, offline, which the coordinator stored before it had this
        process forked (smpd.daemon.template's Template.fork), as power-on leaves an AP. ``came``:
        its first wait made already, by the fork loop (CpuCore.first_wait_calls), and what it
        returned."""
        state = lambda: self.wait_for_sipi(stored=True, came=came)  # noqa: E731
        while state is not None:
            state = state()
            if not isinstance(state, Woken):
                self._repost_ipi()

    def _repost_ipi(self) -> None:
        """A state may leave with an IPI it consumed the byte of but did not handle (an MCE
        and an INIT in one wake-up): raise the byte again for the next state to see."""
        if self.pending_ack is None and self.take_ipi() is not None:
            self.buf[self.wake_off + L.WAKE_IPI] = 1

    def monitor(self, addr: int) -> None:
        """__monitor() on one of this CPU's own lines in its kernel's map, and no other."""
        own = (self.map.mwait_cpu_dead_addr(self.cpu), self.map.thread_info_addr(self.cpu))
        assert addr in own, f"CPU{self.cpu} may not monitor {addr:#x}"
        super().monitor(addr)

    # -- states ------------------------------------------------------------------

    def init_reset(self):
        """INIT: the CPU resets and waits for a startup IPI, whatever it was doing."""
        self.disarm()
        self.nmi_blocked = False
        self._add("init_count", 1)
        events.log(self.seg, self.cpu, L.Ev.INIT)
        return self.wait_for_sipi

    def wait_for_sipi(self, woken_with: int | None = None, stored: bool = False, came=None):
        """Wait-for-SIPI: executes nothing; NMI and SMI are held pending, an MCE is fatal.

        ``woken_with``: the compiled path took the INIT and made this state's stores already
        (``_init_taken``); this is the wake-up that came next. ``stored``: power-on made them
        (``run``), and no IPI is taken yet; ``came``, with it: the first wait's return (``run``)."""
        if woken_with is None and not stored:
            self._set_state(L.ExecState.WAIT_FOR_SIPI, L.Hotplug.OFFLINE)
            self._ack_pending()
        while True:
            mask = woken_with if woken_with is not None else self.wait(init=True, came=came)
            woken_with = came = None
            if self.init_ns:  # INIT again (and maybe SIPI): taken by the compiled path
                return self._init_taken(mask)
            if mask & M_IRQ and self.hold_interrupts():
                # A CPU in INIT cannot take the machine check: the platform shuts the
                # machine down. Loud and diagnosable: "the lesser of two evils".
                events.log(self.seg, self.cpu, L.Ev.MCE_SHUTDOWN)
                self.seg.set_cb(self.cpu, "fault_ns", time.monotonic_ns())
                self.seg.set_cb(self.cpu, "fault", L.Fault.MCE_SHUTDOWN)
                return self.shutdown
            nxt, ipi = self._ipi(mask, (L.Ipi.SIPI,))  # another INIT resets it again
            if nxt is not False:
                return nxt
            if ipi is not None:
                self.pending_ack = ipi[0]
                return self.start_secondary

    def start_secondary(self):
        self._add("sipi_count", 1)
        events.log(self.seg, self.cpu, L.Ev.SIPI)
        self.smp_callin()
        if self.map.boot.smt_sibling(self.cpu):
            # nosmt: an SMT sibling is brought up once (so that CR4.MCE is set) and then
            # parked for good in mwait_play_dead(), by every kernel, kexec'd ones included;
            # so is one a kernel did not start at boot (maxcpus), by its first cpu_up().
            return self.play_dead
        self._learn_start()
        return self.running

    def smp_callin(self) -> None:
        """The AP's first kernel code, in the generation that started it; in the fix's kernels it
        clears mwait_cpu_dead so a stale KEXEC_HLT is never seen."""
        self.gen = self.seg.hdr("generation")
        # Its entry, once: the map is what it says, whatever the table holds later (Kexec.become)
        self.started_in = self.gens.entry(self.gen)
        self.map = self.gens.map_of(self.started_in)
        self.seg.set_cb(self.cpu, "cpu_gen", self.gen)
        if not self.map.boot.monitors_thread_info:  # the pre-fix kernel has no struct mwait_cpu_dead
            self.bus.write(self.map.mwait_cpu_dead_addr(self.cpu), _MD.pack(0, 0))
        self._set_state(L.ExecState.RUNNING, L.Hotplug.ONLINE)
        self._ack_pending()
        # NMI and SMI held in wait-for-SIPI are delivered now that the CPU executes
        # (in the kernel that started it).
        for kind in L.HELD_IN_INIT:
            n = self.seg.cb(self.cpu, f"{kind}_pending")
            if n:
                self.pending[kind] += n
                self.buf[self.wake_off + L.WAKE_IRQ] = 1

    def running(self, woken_with: int | None = None):
        """Online: the idle loop, answering interrupts and IPIs. ``woken_with``: the compiled
        path started this CPU (``_init_taken``); this is the wake-up that came next."""
        while True:
            mask = woken_with if woken_with is not None else self.wait(init=True)
            woken_with = None
            if self.init_ns:
                return self._init_taken(mask)
            if mask & M_IRQ:
                nxt = self.take_interrupts()
                if nxt is not None:
                    return nxt
            nxt, ipi = self._ipi(mask, (L.Ipi.CPU_DOWN, L.Ipi.REBOOT, L.Ipi.NMI_STOP))
            if nxt is not False:
                return nxt
            if ipi is not None:
                self.pending_ack = ipi[0]
                return {L.Ipi.CPU_DOWN: self.play_dead, L.Ipi.REBOOT: self.stop_this_cpu,
                        L.Ipi.NMI_STOP: self.nmi_stop}[ipi[1]]

    def stop_this_cpu(self):
        """stop_other_cpus()'s REBOOT vector: mark this CPU offline and halt forever."""
        events.log(self.seg, self.cpu, L.Ev.REBOOT)
        self.seg.set_cb(self.cpu, "hotplug", L.Hotplug.OFFLINE)
        return self.hlt

    def nmi_stop(self):
        """Stopped by NMI: the handler (crash_nmi_callback() for kdump, smp_stop_nmi_callback()
        for the reboot's NMI fallback) marks this CPU offline and halts inside the handler, NMIs
        blocked: a later NMI is held, never taken (an MCE or an SMI still is)."""
        events.log(self.seg, self.cpu, L.Ev.NMI_STOP)
        self.seg.set_cb(self.cpu, "hotplug", L.Hotplug.OFFLINE)
        self.nmi_blocked = True
        return self.hlt

    def play_dead(self):
        """native_play_dead(): report death, then park in mwait_play_dead()."""
        self.seg.set_cb(self.cpu, "hotplug", L.Hotplug.OFFLINE)
        events.log(self.seg, self.cpu, L.Ev.OFFLINE)
        return self.mwait_play_dead

    def mwait_play_dead(self, woken_with: int | None = None):
        """The kernel's loop: MONITOR, MWAIT, and, with the kexec() fix, leave for HLT once
        control says CPUDEAD_MWAIT_KEXEC_HLT.

        Which line MONITOR arms is the running kernel's flavour (smpd.kernel.memmap): the
        dedicated mwait_cpu_dead line of the fix, or, before it, the idle task's
        thread_info->flags, which is ordinary memory a kexec may overwrite. Both live in
        this CPU's generation's own allocations (per-CPU area; idle task_struct).

        ``woken_with``: the compiled path entered this loop (the fix's entry, MONITOR, the
        acknowledgement: ``_init_taken``) and waited in its first MWAIT; this is that wake-up.
        """
        self.map = self.gens.map(self.gen)  # the running kernel's flavour (`kexec --kernel` may change it)
        md = self.map.mwait_cpu_dead_addr(self.cpu)
        if woken_with is None:
            if not self.map.boot.monitors_thread_info:
                # Set up state for the kexec() hack: status first, then control, as the kernel does.
                self.bus.write(md + 4, _MWAIT_WAIT)
                self.bus.write(md, _MWAIT_WAIT)
            self._add("mwait_entries", 1)
            self._set_state(L.ExecState.MWAIT)
        md_mem = self.seg.mem_off(md)
        while True:
            self.map = self.gens.map(self.gen)
            prefix = self.map.boot.monitors_thread_info
            target = self.map.thread_info_addr(self.cpu) if prefix else md
            if woken_with is None:
                self.monitor(target)
                # Parked means MONITOR armed: only now is the offline (or REPARK) acknowledged, so that
                # a kick right after it finds the CPU where a long-parked one would be.
                self._ack_pending()
            line = self.armed_line
            # The fix's kernel only: the pre-fix one has no control word to answer.
            mask = self.mwait(None if prefix else self._kick_ack()) if woken_with is None else self.mwait_exit(woken_with)
            woken_with = None
            t_wake = time.monotonic_ns()
            if self.init_ns:  # acknowledged, halted, then INIT (and what followed it) in the compiled path
                return self._init_taken(mask)
            if self.acked_ns:
                # The compiled path did what the branch below does (resume checks,
                # control == KEXEC_HLT, the status store, the events) and entered
                # HLT; ``mask`` is what has ended HLT since.
                # Run HLT from here, not through run(): its _repost_ipi would raise the
                # IPI byte again for the IPI in ``mask``, and re-park into a stale wake.
                self.acked_ns = 0
                return self.hlt(halted_with=mask)
            if mask & (M_IRQ | M_IPI):
                # NMI/SMI/MCE end MWAIT; the handler runs and returns to the
                # instruction after MWAIT, in this loop's text.
                nxt = self._interrupts_then_ipis(mask, (L.Ipi.REPARK,))  # see L.Ipi.REPARK
                if nxt is not False:
                    return nxt
            cause = 0
            if mask & (M_WRITE | M_TIMER):
                cause = L.Ev.WAKE_WRITE if mask & M_WRITE else L.Ev.SPURIOUS
                nxt = self.resume(TEXT_PLAY_DEAD, cause, line)
                if nxt is not None:
                    events.log(self.seg, self.cpu, cause, line, ns=t_wake)
                    return nxt
            if prefix:
                if cause:
                    events.log(self.seg, self.cpu, cause, line, ns=t_wake)
                continue  # the pre-fix kernel has no control word: back into MWAIT
            control = _MD.unpack_from(self.buf, md_mem)[0]
            if control == L.CPUDEAD_MWAIT_KEXEC_HLT:
                # Kexec is about to happen. Don't go back into mwait(): the kexec
                # kernel may overwrite text, page tables and stack, and a write to
                # the monitored line would resume us in overwritten memory.
                # Note: this does _NOT_ protect against a stray MCE, NMI or SMI;
                # each ends HLT and resumes in the old kernel.
                seen = time.monotonic_ns()
                self.u64[self.i_kick_seen] = seen
                self.bus.write(md + 4, _KEXEC_HLT)
                # The bookkeeping comes after the acknowledgement: off the kick's latency path.
                if cause:
                    events.log(self.seg, self.cpu, cause, line, ns=t_wake)
                events.log(self.seg, self.cpu, L.Ev.KICK_SEEN, ns=seen)
                return self.hlt
            if cause:
                events.log(self.seg, self.cpu, cause, line, ns=t_wake)
            # Spurious or foreign wake-up: loop back into MWAIT, as the kernel does.

    def hlt(self, halted_with: int | None = None):
        """while (1) native_halt(): only an interrupt or an IPI ends HLT; writes do not.

        ``halted_with``: the compiled path entered HLT already (state, event) and
        this is the wake mask that ended it.
        """
        mask = halted_with
        if mask is None:
            self._set_state(L.ExecState.HLT)
            events.log(self.seg, self.cpu, L.Ev.HLT)
            self._ack_pending()
        while True:
            # An interrupt handler runs, then HLT's successor: the loop halts again.
            # Under adaptive, a halted CPU sleeps at once: no write ends HLT, so a spin
            # would only hold the host core that the next kicked CPU needs to wake on.
            if mask is None:
                mask = self.wait(may_spin=False, init=True)
                if self.init_ns:
                    return self._init_taken(mask)
            nxt = self._interrupts_then_ipis(mask, (L.Ipi.REPARK,), in_hlt=True)
            if nxt is not False:
                return nxt
            mask = None

    def foreign_halt(self):
        """Halted (or looping) in foreign bytes: only INIT gets the CPU out."""
        self._set_state(L.ExecState.HLT)
        return self._dead_end()

    def shutdown(self):
        """SHUTDOWN after a triple fault or an MCE in wait-for-SIPI: nothing runs until INIT."""
        self._set_state(L.ExecState.SHUTDOWN)
        return self._dead_end()

    def _dead_end(self):
        while True:
            # (the compiled path holds the interrupts that come while it sleeps, as below)
            mask = self.wait(init=True, dead=True)
            if self.init_ns:  # INIT (and what followed it) taken by the compiled path
                return self._init_taken(mask)
            if mask & M_IRQ:
                for kind, n in self._drain_pending().items():  # nothing executes them
                    if n:
                        self._add(f"{kind}_held", n)
            nxt, _ = self._ipi(mask)
            if nxt is not False:
                return nxt


def cpu_main(me: Cpu, core: int | None, came=None) -> None:
    """Entry point of a CPU process, forked by smpd.daemon.template, which named it, made it die
    with the coordinator (its parent), closed every descriptor it inherited but 0-2 (a CPU needs
    none: its memory is the inherited mapping), and, before the fork, built ``me`` and installed the
    process's interrupt handlers (smpd.machine.core.install_interrupt_handlers), which ``me`` takes.
    ``came``: the compiled fork loop made ``me.first_wait_calls``, its host core, its signals and its
    first wait included, and this is what that wait returned."""
    if came is None:
        if core is not None:
            os.sched_setaffinity(0, {core})
        me.own_interrupt_signals()
    # Its pid and core are in its control block already: the coordinator wrote them as it adopted
    # this process (smpd.daemon.supervisor). That it is its process's only thread, which a compiled
    # Waiter needs to answer a kick inside its sleep, the Waiter asks the kernel at its first wait.
    try:
        me.run(came)
    except Exception:  # an emulator fault: report it, die, and let the coordinator mark GONE
        import traceback

        traceback.print_exc(file=sys.stderr)
        os._exit(70)
    os._exit(0)
