"""A CPU process: the emulated kernel code for whatever state the CPU is in, and nothing else.

Each state is a method that runs until the CPU leaves that state and returns the
next state's method (or None when the process powers off):

    wait_for_sipi --SIPI--> start_secondary/smp_callin --> running
    running --CPU_DOWN--> play_dead --> mwait_play_dead --(control == KEXEC_HLT)--> hlt
    any state --INIT--> wait_for_sipi

How a CPU waits (``wait``). Every waker raises one byte of the CPU's wake word
(smpd.layout: write, interrupt, IPI, timer). The watch loop is the hot path and is
kept to one load and one compare (``while u32[i] == 0: pass``); everything else
(timers, counters, signals) happens outside it:

* ``spin``: busy-watch the wake word. Lowest latency; needs a host core per CPU.
* ``adaptive``: spin for the budget, then sleep in sigwaitinfo until the bus rings
  the doorbell signal (or an interrupt signal arrives). The spin budget is an
  ITIMER_REAL whose SIGALRM raises the timer byte, so the spin loop needs no
  clock read.
* Spurious MWAIT wake-ups (``spurious_per_s``) use the same timer byte.

Interrupts (NMI, SMI, MCE) are POSIX signals. A handler only records the pending
interrupt and raises the interrupt byte; the state code takes it at its next
"instruction boundary", i.e. when it looks at the wake mask. Signals of one kind
that arrive before the CPU takes the first may be merged into one: that is the
hardware's NMI (and SMI) latch, and it is also what CPython does, which runs a
Python-level handler once for several deliveries of the same signal.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import time

from smpd.host.proc import die_with_parent, set_process_name
from smpd.kernel import resume as resume_mod
from smpd.kernel.generations import Generations
from smpd.kernel.memmap import TEXT_MCE, TEXT_NMI, TEXT_PLAY_DEAD, MemoryMap
from smpd.machine import events, hotpath, layout as L
from smpd.machine.bus import DOORBELL_SIGNAL, Bus
from smpd.machine.sync import fence


KINDS = L.IRQ_KINDS
M_WRITE = 0xFF << (8 * L.WAKE_WRITE)
M_IRQ = 0xFF << (8 * L.WAKE_IRQ)
M_IPI = 0xFF << (8 * L.WAKE_IPI)
M_TIMER = 0xFF << (8 * L.WAKE_TIMER)
_MD = struct.Struct("<II")  # struct mwait_cpu_dead { u32 control; u32 status; }
_KEXEC_HLT = struct.pack("<I", L.CPUDEAD_MWAIT_KEXEC_HLT)

# Mailbox results the CPU writes back (0 = done).
IPI_DONE = 0
IPI_IGNORED = 1  # e.g. a SIPI to a CPU that is not waiting for one: real parts ignore it


class Cpu:
    def __init__(self, seg, bus: Bus, cpu: int, signals: dict[str, int]):
        geo = seg.geo
        self.seg, self.bus, self.cpu = seg, bus, cpu
        self.u32, self.buf, self.u16 = seg.u32, seg.buf, seg.u16
        self.wake_idx = seg.cb_index32(cpu, "wake")
        self.wake_off = self.wake_idx * 4
        self.sleeping_idx = seg.cb_index32(cpu, "sleeping")
        self.dir_base = geo.dir_off // L.DIR_ENTRY
        self.gens = Generations(seg)
        self.gen = 0  # the kernel generation this CPU runs (set by smp_callin)
        self.map: MemoryMap | None = None  # that generation's memory map
        self.spin = seg.hdr("watch") == L.Watch.SPIN
        self.budget_ns = seg.hdr("spin_budget_ns")  # the compiled path's unit; the Python one's below
        self.budget_s = self.budget_ns / 1e9
        self.spurious_per_s = seg.hdr("spurious_per_s")
        self.rng = random.Random(seg.hdr("seed") * 4099 + cpu)
        self.signals = signals
        self.sig_kind = {sig: kind for kind, sig in signals.items()}
        self.irq_sigs = set(signals.values())
        self.sleep_sigs = self.irq_sigs | {DOORBELL_SIGNAL}
        self.pending = {k: 0 for k in KINDS}  # written by signal handlers, read by take_*
        self.timer_reason: str | None = None  # "budget" or "spurious" while the timer runs
        self.armed_line = -1
        self.pending_ack: int | None = None  # mailbox seq to acknowledge when done
        # Direct word indices of the fields the wake-up path touches (a struct call each
        # would cost more than the rest of that path).
        self.u64 = seg.u64
        ix = lambda f: seg.cb_index(cpu, f)  # noqa: E731
        self.i_busy, self.i_activity = ix("busy"), ix("activity")
        self.i_kick_seen = ix("kick_seen_ns")
        self.i_mon_armed, self.i_mon_line = ix("mon_armed"), ix("mon_line")
        self.i_wake_count = [(M_WRITE, ix("wake_write")), (M_IRQ, ix("wake_irq")),
                             (M_IPI, ix("wake_ipi")), (M_TIMER, ix("wake_spurious"))]
        self.plans: dict[tuple, resume_mod.ResumePlan] = {}  # by (map, text page)
        # The compiled watch loop (smpd.hotpath), or None for the Python loops below.
        self.spin_yields = bool(seg.hdr("spin_yields"))
        self.waiter = hotpath.waiter(seg, cpu, self.irq_sigs, DOORBELL_SIGNAL)
        self.kick_acks: dict[MemoryMap, object] = {}  # hotpath.Ack by memory map
        self.acked_ns = 0  # set when the compiled path acknowledged a kick inside wait()

    # -- process entry -------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a foreground Ctrl-C is the coordinator's
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, self._on_timer)
        for sig in self.signals.values():
            signal.signal(sig, self._on_interrupt)
        # The doorbell stays blocked for life: it is only ever taken by sigwaitinfo in
        # _sleep, and one that arrives while we are awake just ends the next sleep early.
        signal.pthread_sigmask(signal.SIG_SETMASK, {DOORBELL_SIGNAL})

    def run(self) -> None:
        state = self.wait_for_sipi
        while state is not None:
            state = state()
            self._repost_ipi()

    def _repost_ipi(self) -> None:
        """A state may leave with an IPI it consumed the byte of but did not handle (an MCE
        and an INIT in one wake-up): raise the byte again for the next state to see."""
        if self.pending_ack is None and self.take_ipi() is not None:
            self.buf[self.wake_off + L.WAKE_IPI] = 1

    # -- signal handlers: record and raise a byte, nothing else ---------------

    def _on_interrupt(self, signum, _frame) -> None:
        self.pending[self.sig_kind[signum]] += 1
        self.buf[self.wake_off + L.WAKE_IRQ] = 1

    def _on_timer(self, _signum, _frame) -> None:
        if self.timer_reason is not None:  # a late SIGALRM from a cancelled timer is dropped
            self.buf[self.wake_off + L.WAKE_TIMER] = 1

    # -- waiting ----------------------------------------------------------------

    def _set_timer(self, reason: str, seconds: float) -> None:
        self.timer_reason = reason
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-6))

    def _cancel_timer(self) -> None:
        if self.timer_reason is not None:
            self.timer_reason = None
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _spurious_in(self) -> float | None:
        return self.rng.expovariate(self.spurious_per_s) if self.spurious_per_s > 0 else None

    def wait(self, may_spin: bool = True, ack=None) -> int:
        """Wait until a waker raises a byte; return the wake mask and clear what it names.

        The TIMER byte comes back to the caller only as a spurious wake-up; a
        spin-budget expiry just moves the CPU from spinning to sleeping.
        ``may_spin=False`` (HLT) skips the adaptive spin budget and sleeps at once.
        ``ack`` (compiled path only, from mwait_play_dead()): when the wake-up is a
        kick this CPU can acknowledge, the compiled code does so, records the way
        into HLT and halts; ``acked_ns`` is then when it saw the kick, and the mask
        returned is what ended HLT.
        """
        u32 = self.u32
        u32[self.i_busy] = 0
        spurious = self._spurious_in()
        if self.waiter is not None:
            mask = self._wait_compiled(spurious, may_spin, ack)
        else:
            mask = self._wait_python(spurious, may_spin)
        u32[self.i_busy] = 1
        u32[self.i_activity] = (u32[self.i_activity] + 1) & 0xFFFFFFFF
        return mask

    def _wait_compiled(self, spurious: float | None, may_spin: bool, ack) -> int:
        spin_ns = -1 if self.spin else self.budget_ns if may_spin else 0
        deadline_ns = 0 if spurious is None else time.monotonic_ns() + max(1, int(spurious * 1e9))
        while True:
            code, arg, acked_ns = self.waiter.wait(spin_ns, deadline_ns, ack)
            if acked_ns:  # acknowledged and halted: what follows is HLT's wake-up
                self.acked_ns, ack, deadline_ns = acked_ns, None, 0
            if code == hotpath.SIGNAL:  # an interrupt signal, taken while asleep
                self._on_interrupt(arg, None)
            elif code == hotpath.TIMEOUT:  # the spurious wake-up's time has come
                self.buf[self.wake_off + L.WAKE_TIMER] = 1
                deadline_ns = 0
            mask = self._consume()
            if mask:
                return mask

    def _wait_python(self, spurious: float | None, may_spin: bool) -> int:
        u32, i = self.u32, self.wake_idx
        deadline = None if spurious is None else time.monotonic() + spurious
        while True:
            if u32[i] == 0:
                if self.spin:
                    if deadline is not None:
                        self._set_timer("spurious", deadline - time.monotonic())
                    if self.spin_yields:  # spinners outnumber host cores: share them
                        while u32[i] == 0:
                            os.sched_yield()
                    while u32[i] == 0:  # THE HOT LOOP: one load, one compare
                        pass
                elif deadline is not None and deadline - time.monotonic() < self.budget_s:
                    self._set_timer("spurious", deadline - time.monotonic())
                    while u32[i] == 0:  # the same hot loop, ended by the timer byte at worst
                        pass
                elif self.budget_s > 0 and may_spin:
                    self._set_timer("budget", self.budget_s)
                    while u32[i] == 0:
                        pass
                else:
                    self._sleep(deadline)
            mask = self._consume()
            reason = self.timer_reason
            self._cancel_timer()
            timer_hit = mask & M_TIMER
            mask &= ~M_TIMER
            if timer_hit and reason == "spurious":
                mask |= M_TIMER
            if mask:
                return mask
            if timer_hit and reason == "budget":
                self._sleep(deadline)
            # else: a stale SIGALRM of a cancelled timer; look again

    def _sleep(self, deadline: float | None) -> None:
        """Sleep until a byte is raised (or the spurious deadline passes), losing no wake-up.

        Why sigtimedwait and not a futex: a Python signal handler runs some
        bytecodes after its signal arrived. A signal landing between our last look
        at the wake word and a futex syscall would leave the handler's byte unset
        while we sleep: a lost interrupt. So while sleeping the interrupt signals
        are blocked and we wait for them *and* for the bus's doorbell signal in one
        sigtimedwait, which takes a pending signal atomically.
        """
        u32, i = self.u32, self.wake_idx
        self._cancel_timer()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.irq_sigs)
        try:
            # fence() is a Python call: its entry runs the handler of any interrupt
            # that arrived before the block, so its byte is raised before we look.
            u32[self.sleeping_idx] = 1
            fence()  # pairs with the fence in Bus.wake: we see its byte or it sees `sleeping`
            while u32[i] == 0:
                timeout = None
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        self.buf[self.wake_off + L.WAKE_TIMER] = 1
                        self.timer_reason = "spurious"
                        break
                info = signal.sigtimedwait(self.sleep_sigs, timeout) if timeout is not None \
                    else signal.sigwaitinfo(self.sleep_sigs)
                if info is not None and info.si_signo != DOORBELL_SIGNAL:
                    self._on_interrupt(info.si_signo, None)
        finally:
            u32[self.sleeping_idx] = 0
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _consume(self) -> int:
        """Read the wake word, clear the bytes that were raised, fence, return them."""
        v = self.u32[self.wake_idx]
        if v == 1:
            # Only the bus's WRITE byte (byte 0, the low byte): the kick's path. No fence
            # needed: what we read next is memory the writer stored before raising the byte
            # (x86 keeps loads in order), and a write after our clear raises it again.
            self.buf[self.wake_off] = 0
            return v
        for byte in range(4):
            if v >> (8 * byte) & 0xFF:
                self.buf[self.wake_off + byte] = 0
        fence()  # our clears are visible before we read the mailbox or memory below
        return v

    # -- MONITOR / MWAIT -----------------------------------------------------

    def monitor(self, addr: int) -> None:
        """__monitor(): arm the monitor on the line holding ``addr``.

        Only one of the CPU's own lines in its kernel's map may be monitored (the line
        directory has one writer per entry; see smpd.machine.layout).
        """
        line = (addr - L.PHYS_BASE) // L.LINE
        own = (self.map.mwait_cpu_dead_addr(self.cpu), self.map.thread_info_addr(self.cpu))
        assert addr in own, f"CPU{self.cpu} may not monitor {addr:#x}"
        self.buf[self.wake_off + L.WAKE_WRITE] = 0
        self.u16[self.dir_base + line] = self.cpu + 1
        self.armed_line = line
        self.u32[self.i_mon_line] = line
        self.u32[self.i_mon_armed] = 1
        fence()  # the directory entry is visible before we look for a write (see smpd.bus)

    def disarm(self) -> None:
        if self.armed_line >= 0:
            self.u16[self.dir_base + self.armed_line] = 0
            self.armed_line = -1
            self.u32[self.i_mon_armed] = 0

    def mwait(self, ack=None) -> int:
        """__mwait(): wait for a write to the monitored line, an interrupt, an IPI or nothing at all."""
        mask = self.wait(ack=ack)
        if self.acked_ns:  # the compiled path disarmed and counted, and halted since
            self.armed_line = -1
            return mask
        self.disarm()  # MWAIT's exit ends the monitor; the loop re-arms it
        self._count_wake(mask)
        return mask

    def _count_wake(self, mask: int) -> None:
        u64 = self.u64
        for bit, idx in self.i_wake_count:
            if mask & bit:
                u64[idx] += 1

    # -- executing in the old kernel -----------------------------------------

    def _plan(self, text_page: int) -> resume_mod.ResumePlan:
        key = (self.map, text_page)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = resume_mod.ResumePlan(self.seg, self.map, self.cpu, text_page)
        return plan

    def _kick_ack(self):
        """The compiled path's acknowledgement of a kick in mwait_play_dead() (None: Python path)."""
        if self.waiter is None:
            return None
        a = self.kick_acks.get(self.map)
        if a is None:
            a = self.kick_acks[self.map] = hotpath.ack(self.seg, self.cpu, self.map.mwait_cpu_dead_addr(self.cpu),
                                                       self._plan(TEXT_PLAY_DEAD).checks)
        return a

    def resume(self, text_page: int, cause: L.Ev, cause_arg: int = 0):
        """The CPU executes again after a wake-up: check the pages that step touches.

        Returns None to go on, or the next state when the CPU faulted or ran off
        into foreign bytes (see smpd.kernel.resume).
        """
        v = resume_mod.resume(self.seg, self.bus, self._plan(text_page))
        if v is resume_mod.OK:
            return None
        events.log(self.seg, self.cpu, L.Ev.BAD_PAGE, v.page)
        for addr, _value in v.stores:
            events.log(self.seg, self.cpu, L.Ev.STRAY_STORE, addr)
        self._add("stray_stores", len(v.stores))
        if self.seg.cb(self.cpu, "fault") == L.Fault.NONE:
            first = v.stores[0] if v.stores else (0, 0)
            for field, value in (("fault_page", v.page), ("fault_addr", first[0]), ("fault_value", first[1]),
                                 ("fault_cause", cause), ("fault_cause_arg", cause_arg),
                                 ("fault_ns", time.monotonic_ns()), ("fault", v.fault)):
                self.seg.set_cb(self.cpu, field, value)
        if v.fault == L.Fault.TRIPLE_FAULT:
            events.log(self.seg, self.cpu, L.Ev.TRIPLE_FAULT, v.page)
            return self.shutdown
        events.log(self.seg, self.cpu, L.Ev.FOREIGN_HALT, v.page)
        return self.foreign_halt

    # -- interrupts ----------------------------------------------------------

    def _drain_pending(self) -> dict[str, int]:
        """Move pending interrupts out of the handlers' hands, with the signals blocked."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.irq_sigs)
        try:
            taken = dict(self.pending)
            for k in KINDS:
                self.pending[k] = 0
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return taken

    def take_interrupts(self, resume_page: int = TEXT_PLAY_DEAD, in_hlt: bool = False):
        """Run the handlers of pending interrupts, MCE first, then return to ``resume_page``.

        NMI and MCE enter their handlers' text; an SMI enters SMM (firmware, never
        overwritten) and RSM resumes the interrupted code. Every step is a resume
        (see ``resume``). Returns None, or the next state if a step faulted.

        ``in_hlt``: the CPU was halted. With the firmware's auto-HALT restart
        ([firmware] smi_auto_halt_restart, which the SDM allows), RSM returns into HLT
        itself: after an SMI alone nothing is fetched. The review assumes it does not.
        """
        got = self._drain_pending()
        for kind in KINDS:
            self.seg.set_cb(self.cpu, f"{kind}_pending", 0)
        took = 0
        for kind in L.IRQ_KINDS:
            if not got[kind]:
                continue
            took = L.IRQ_CODE[kind]
            self._add(f"{kind}_taken", got[kind])
            events.log(self.seg, self.cpu, L.Ev.INTERRUPT, L.IRQ_CODE[kind])
            if kind == "smi":
                events.log(self.seg, self.cpu, L.Ev.SMM)
                continue  # RSM resumes the interrupted code: checked below
            nxt = self.resume(TEXT_NMI if kind == "nmi" else TEXT_MCE, L.Ev.INTERRUPT, L.IRQ_CODE[kind])
            if nxt is not None:
                return nxt
        if took == L.IRQ_CODE["smi"] and in_hlt and not got["nmi"] and not got["mce"] \
                and self.seg.hdr("smi_auto_halt_restart"):
            return None  # RSM into HLT: the CPU halts again without executing an instruction
        if took:  # the return from the (last) handler, or RSM, into the interrupted code
            return self.resume(resume_page, L.Ev.INTERRUPT, took)
        return None

    def hold_interrupts(self) -> bool:
        """In WAIT_FOR_SIPI, NMI and SMI stay pending (counted as held). Returns True on an MCE,
        which a CPU in INIT cannot hold: it takes the machine down (MCE_SHUTDOWN)."""
        got = self._drain_pending()
        for kind in ("nmi", "smi"):
            if got[kind]:
                self._add(f"{kind}_held", got[kind])
                events.log(self.seg, self.cpu, L.Ev.HELD, L.IRQ_CODE[kind])
                pending = self.seg.cb(self.cpu, f"{kind}_pending") + got[kind]
                # NMIs are latched: one pending NMI, however many arrived.
                self.seg.set_cb(self.cpu, f"{kind}_pending", min(pending, 1) if kind == "nmi" else pending)
        if got["mce"]:
            self._add("mce_held", got["mce"])
            return True
        return False

    def _add(self, field: str, n: int) -> None:
        self.seg.set_cb(self.cpu, field, self.seg.cb(self.cpu, field) + n)

    # -- the mailbox (IPIs from the coordinator) -----------------------------

    def take_ipi(self) -> tuple[int, L.Ipi] | None:
        seq = self.seg.cb(self.cpu, "mbox_seq")
        if seq == self.seg.cb(self.cpu, "mbox_ack"):
            return None
        return seq, L.Ipi(self.seg.cb(self.cpu, "mbox_cmd"))

    def ack(self, seq: int, result: int = IPI_DONE) -> None:
        self.seg.set_cb(self.cpu, "mbox_result", result)
        self.seg.set_cb(self.cpu, "mbox_ack", seq)  # last: the coordinator polls this word

    def _ack_pending(self) -> None:
        if self.pending_ack is not None:
            self.ack(self.pending_ack)
            self.pending_ack = None

    def _set_state(self, state: L.ExecState, hotplug: L.Hotplug | None = None) -> None:
        if hotplug is not None:
            self.seg.set_cb(self.cpu, "hotplug", hotplug)
        self.seg.set_cb(self.cpu, "state", state)

    def _ipi(self, mask: int, allowed: tuple[L.Ipi, ...] = ()):
        """Look at the mailbox if the IPI byte was raised.

        INIT and POWER_OFF reach a CPU in any state; a command in ``allowed`` is
        returned for the state to handle (its ack is the state's to send); any
        other is acknowledged as ignored. Returns (next_state or False, ipi or None).
        """
        if not mask & M_IPI:
            return False, None
        ipi = self.take_ipi()
        if ipi is None:
            return False, None
        seq, cmd = ipi
        if cmd == L.Ipi.POWER_OFF:
            self.ack(seq)
            return None, None
        if cmd == L.Ipi.INIT:
            self.pending_ack = seq
            return self.init_reset, None
        if cmd in allowed:
            return False, ipi
        self.ack(seq, IPI_IGNORED)
        return False, None

    def _interrupts_then_ipis(self, mask: int, allowed: tuple[L.Ipi, ...] = (), in_hlt: bool = False):
        """Take interrupts (their handlers may fault), then INIT/POWER_OFF, then a REPARK
        if ``allowed``. Returns the next state, or False to stay."""
        if mask & M_IRQ:
            nxt = self.take_interrupts(in_hlt=in_hlt)
            if nxt is not None:
                return nxt
        nxt, ipi = self._ipi(mask, allowed)
        if ipi is not None and ipi[1] == L.Ipi.REPARK:
            self.pending_ack = ipi[0]
            return self.mwait_play_dead
        return nxt

    # -- states ------------------------------------------------------------------

    def init_reset(self):
        """INIT: the CPU resets and waits for a startup IPI, whatever it was doing."""
        self.disarm()
        self._add("init_count", 1)
        events.log(self.seg, self.cpu, L.Ev.INIT)
        return self.wait_for_sipi

    def wait_for_sipi(self):
        """Wait-for-SIPI: executes nothing; NMI and SMI are held pending, an MCE is fatal."""
        self._set_state(L.ExecState.WAIT_FOR_SIPI, L.Hotplug.OFFLINE)
        self._ack_pending()
        while True:
            mask = self.wait()
            if mask & M_IRQ and self.hold_interrupts():
                # A CPU in INIT cannot take the machine check: the platform shuts the
                # machine down. Loud and diagnosable: "the lesser of two evils".
                events.log(self.seg, self.cpu, L.Ev.MCE_SHUTDOWN)
                self.seg.set_cb(self.cpu, "fault_ns", time.monotonic_ns())
                self.seg.set_cb(self.cpu, "fault", L.Fault.MCE_SHUTDOWN)
                return self.shutdown
            nxt, ipi = self._ipi(mask, (L.Ipi.SIPI, L.Ipi.INIT))
            if nxt is not False:
                return nxt
            if ipi is not None and ipi[1] == L.Ipi.SIPI:
                self.pending_ack = ipi[0]
                return self.start_secondary
            if ipi is not None:  # another INIT: already there
                self._add("init_count", 1)
                self.ack(ipi[0])

    def start_secondary(self):
        self._add("sipi_count", 1)
        events.log(self.seg, self.cpu, L.Ev.SIPI)
        self.smp_callin()
        if self.map.boot.parks_at_boot(self.cpu):
            # nosmt: an SMT sibling is brought up once (so that CR4.MCE is set) and then
            # parked for good in mwait_play_dead(), by every kernel, kexec'd ones included.
            return self.play_dead
        return self.running

    def smp_callin(self) -> None:
        """The AP's first kernel code, in the generation that started it; in the fix's kernels it
        clears mwait_cpu_dead so a stale KEXEC_HLT is never seen."""
        self.gen = self.seg.hdr("generation")
        self.map = self.gens.map(self.gen)
        self.seg.set_cb(self.cpu, "cpu_gen", self.gen)
        if not self.map.boot.monitors_thread_info:  # the pre-fix kernel has no struct mwait_cpu_dead
            self.bus.write(self.map.mwait_cpu_dead_addr(self.cpu), _MD.pack(0, 0))
        self._set_state(L.ExecState.RUNNING, L.Hotplug.ONLINE)
        self._ack_pending()
        # NMI and SMI held in wait-for-SIPI are delivered now that the CPU executes
        # (in the kernel that started it).
        for kind in ("nmi", "smi"):
            n = self.seg.cb(self.cpu, f"{kind}_pending")
            if n:
                self.pending[kind] += n
                self.buf[self.wake_off + L.WAKE_IRQ] = 1

    def running(self):
        """Online: the idle loop, answering interrupts and IPIs."""
        while True:
            mask = self.wait()
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
        """The NMI shootdown: the stop NMI handler (crash_nmi_callback() for kdump) marks this CPU
        offline and halts with NMIs blocked."""
        events.log(self.seg, self.cpu, L.Ev.NMI_STOP)
        self.seg.set_cb(self.cpu, "hotplug", L.Hotplug.OFFLINE)
        return self.hlt

    def play_dead(self):
        """native_play_dead(): report death, then park in mwait_play_dead()."""
        self.seg.set_cb(self.cpu, "hotplug", L.Hotplug.OFFLINE)
        events.log(self.seg, self.cpu, L.Ev.OFFLINE)
        return self.mwait_play_dead

    def mwait_play_dead(self):
        """The kernel's loop: MONITOR, MWAIT, and, with the kexec() fix, leave for HLT once
        control says CPUDEAD_MWAIT_KEXEC_HLT.

        Which line MONITOR arms is the running kernel's flavour (smpd.kernel.memmap): the
        dedicated mwait_cpu_dead line of the fix, or, before it, the idle task's
        thread_info->flags, which is ordinary memory a kexec may overwrite. Both live in
        this CPU's generation's own allocations (per-CPU area; idle task_struct).
        """
        self.map = self.gens.map(self.gen)  # the running kernel's flavour (`kexec --kernel` may change it)
        md = self.map.mwait_cpu_dead_addr(self.cpu)
        if not self.map.boot.monitors_thread_info:
            # Set up state for the kexec() hack: status first, then control, as the kernel does.
            self.bus.write(md + 4, struct.pack("<I", L.CPUDEAD_MWAIT_WAIT))
            self.bus.write(md, struct.pack("<I", L.CPUDEAD_MWAIT_WAIT))
        self._add("mwait_entries", 1)
        self._set_state(L.ExecState.MWAIT)
        md_mem = self.seg.mem_off(md)
        while True:
            self.map = self.gens.map(self.gen)
            prefix = self.map.boot.monitors_thread_info
            target = self.map.thread_info_addr(self.cpu) if prefix else md
            self.monitor(target)
            # Parked means MONITOR armed: only now is the offline (or REPARK) acknowledged, so that
            # a kick right after it finds the CPU where a long-parked one would be.
            self._ack_pending()
            line = self.armed_line
            # The fix's kernel only: the pre-fix one has no control word to answer.
            mask = self.mwait(None if prefix else self._kick_ack())
            t_wake = time.monotonic_ns()
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
                mask = self.wait(may_spin=False)
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
            mask = self.wait()
            if mask & M_IRQ:
                for kind, n in self._drain_pending().items():  # nothing executes them
                    if n:
                        self._add(f"{kind}_held", n)
            nxt, _ = self._ipi(mask)
            if nxt is not False:
                return nxt


def cpu_main(seg, bus: Bus, cpu: int, signals: dict[str, int], parent_pid: int,
             core: int | None, close_fds: list[int]) -> None:
    """Entry point of a CPU process (forked by the coordinator through multiprocess)."""
    die_with_parent(parent_pid)
    set_process_name(f"smpd-cpu{cpu}")
    # A CPU needs no file descriptor: its memory is the inherited mapping. Close all
    # that fork handed down (the coordinator's socket, ready and janitor pipes, and
    # every earlier sibling's multiprocess pipes, which would otherwise grow as N^2).
    # The mmap object's own fd goes too; a CPU never resizes or closes its mapping.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    del close_fds
    if core is not None:
        os.sched_setaffinity(0, {core})
    me = Cpu(seg, bus, cpu, signals)
    me.install_signal_handlers()
    seg.set_cb(cpu, "core", -1 if core is None else core)
    seg.set_cb(cpu, "ctime_ms", _own_ctime_ms())
    seg.set_cb(cpu, "pid", os.getpid())
    try:
        me.run()
    except Exception:  # an emulator fault: report it, die, and let the coordinator mark GONE
        import traceback

        traceback.print_exc(file=sys.stderr)
        os._exit(70)
    os._exit(0)


def _own_ctime_ms() -> int:
    import psutil

    return int(psutil.Process().create_time() * 1000)
