"""The CPU core: what a CPU process does that is hardware, not kernel.

How a CPU waits (``wait``). Every waker raises one byte of the CPU's wake words
(smpd.machine.layout: write in `mon_write`; interrupt, IPI, timer in `wake`). The
watch loop is the hot path (smpd.machine.hotpath: compiled, or its Python peer),
kept to a load and a compare of each word (and, in the compiled loop of a CPU in
mwait_play_dead(), of the control word it monitors); everything else (timers,
counters, signals) happens outside it:

* ``spin``: busy-watch the wake words. Lowest latency; needs a host core per CPU.
* ``adaptive``: spin for the budget, then sleep in sigwaitinfo until the bus rings
  the doorbell signal (or an interrupt signal arrives).
* Spurious MWAIT wake-ups (``spurious_per_s``) end a wait at a random deadline.

MONITOR arms one line in the line directory; MWAIT is a wait whose exit disarms
it. Interrupts (NMI, SMI, MCE) are POSIX signals: a handler only records the
pending interrupt and raises the interrupt byte; the kernel code takes it at its
next "instruction boundary", when it looks at the wake mask. Signals of one kind
that arrive before the CPU takes the first may be merged into one: that is the
hardware's NMI (and SMI) latch, and it is also what CPython does. IPIs arrive in
a one-slot mailbox per CPU (the coordinator's APIC), acknowledged by sequence. One
message may carry several IPIs that follow each other (INIT, then SIPI, as the BSP
sends them back to back): the CPU takes each when it is done with the one before, in
the same wake-up, and acknowledges the message once, when it is done with the last.

What runs on this core is smpd.kernel.cpu.Cpu, a subclass: this class knows no
kernel, no memory map and no state machine.
"""

from __future__ import annotations

import _signal
import functools
import os
import signal
import sys
import time

from smpd.machine import hotpath, layout as L
from smpd.machine.bus import DOORBELL_SIGNAL, Bus
from smpd.machine.sync import fence

KINDS = L.IRQ_KINDS
M_WRITE = 0xFF << (8 * L.WAKE_WRITE)
M_IRQ = 0xFF << (8 * L.WAKE_IRQ)
M_IPI = 0xFF << (8 * L.WAKE_IPI)
M_TIMER = 0xFF << (8 * L.WAKE_TIMER)

_IPI = {ipi.value: ipi for ipi in L.Ipi}  # a dict look-up, not an Enum call, on the wake-up path

# Mailbox results the CPU writes back (0 = done).
IPI_DONE = 0
IPI_IGNORED = 1  # e.g. a SIPI to a CPU that is not waiting for one: real parts ignore it

_this: CpuCore | None = None  # this process's CPU (CpuCore.own_interrupt_signals): its interrupts are recorded
_CPU_MASK = frozenset({DOORBELL_SIGNAL})  # what a CPU process blocks for life (own_interrupt_signals)


def install_interrupt_handlers(signals: dict[str, int]) -> None:
    """A CPU process's signal dispositions, which are process-wide: set by the template before it
    forks (smpd.daemon.template), so that no CPU process just forked sets them again (~40
    copy-on-write page faults of the interpreter's in each, ~0.2 ms of host CPU). A foreground
    Ctrl-C is the coordinator's; SIGTERM and SIGHUP end the process; each interrupt signal's
    handler records it for the process's CPU. The interrupt signals are blocked here, until the CPU
    takes them (CpuCore.own_interrupt_signals): one that comes first waits for it, pending."""
    # Through _signal, the C module `signal` wraps: the wrapper turns each previous handler into
    # an enum member, which for a Python one is a ValueError raised and caught (~9 us a call).
    _signal.pthread_sigmask(_signal.SIG_BLOCK, signals.values())
    _signal.signal(signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(signal.SIGTERM, _signal.SIG_DFL)
    _signal.signal(signal.SIGHUP, _signal.SIG_DFL)
    for sig in signals.values():
        _signal.signal(sig, _on_interrupt_signal)


def _on_interrupt_signal(signum, frame) -> None:
    _this._on_interrupt(signum, frame)


class CpuCore:
    def __init__(self, seg, bus: Bus, cpu: int, signals: dict[str, int]):
        geo = seg.geo
        self.seg, self.bus, self.cpu = seg, bus, cpu
        self.u32, self.buf, self.u16, self.u64 = seg.u32, seg.buf, seg.u16, seg.u64
        self.wake_idx = seg.cb_index32(cpu, "wake")
        self.wake_off = self.wake_idx * 4
        self.write_idx = seg.cb_index32(cpu, "mon_write")
        self.write_off = self.write_idx * 4
        self.dir_base = geo.dir_off // L.DIR_ENTRY
        self.spin = seg.hdr("watch") == L.Watch.SPIN
        self.budget_ns = seg.hdr("spin_budget_ns")
        self.spurious_per_s = seg.hdr("spurious_per_s")
        self.rng = None  # made at the first spurious wake-up drawn (_spurious_in)
        self.signals = signals
        self.sig_kind = {sig: kind for kind, sig in signals.items()}
        self.irq_sigs = set(signals.values())
        self.pending = {k: 0 for k in KINDS}  # written by signal handlers, read by _drain_pending
        self.armed_line = -1
        self.pending_ack: int | None = None  # mailbox seq to acknowledge when done
        self.part: tuple[int, int] = (-1, 0)  # (mailbox seq, which of its IPIs is the one to take)
        self.midway = False  # a message is taken in part (its next IPI's byte raised), not acknowledged yet
        # Direct word indices of the fields the wake-up path touches (a struct call each
        # would cost more than the rest of that path).
        ix = lambda f: seg.cb_index(cpu, f)  # noqa: E731
        self.i_busy, self.i_activity = ix("busy"), ix("activity")
        self.i_kick_seen = ix("kick_seen_ns")
        self.i_mon_armed, self.i_mon_line = ix("mon_armed"), ix("mon_line")
        self.i_wake_count = [(M_WRITE, ix("wake_write")), (M_IRQ, ix("wake_irq")),
                             (M_IPI, ix("wake_ipi")), (M_TIMER, ix("wake_spurious"))]
        self.waiter = hotpath.waiter(seg, cpu, self.irq_sigs, DOORBELL_SIGNAL)
        self.acked_ns = 0  # set when the compiled path acknowledged a kick inside wait()
        self.init_taker = hotpath.init_taker(seg, cpu, bus, self._spin_ns(True), signals)  # None on Python
        # Set when the compiled path took an INIT (and what followed it) inside wait(): when, and
        # the state it left the CPU in (wait-for-SIPI, running, MWAIT).
        self.init_ns, self.init_state = 0, L.ExecState.WAIT_FOR_SIPI
        self.init_entry = b""  # and, past a SIPI, the generation entry it started the CPU in (Init.learn's)

    def first_wait_calls(self, init: bool, core: int | None) -> tuple | None:
        """What a CPU process just forked does up to its first wait(init=init) returns, as calls into
        C alone, for the fork loop to make (smpd.daemon._forkloop): its host core (``core``), its
        interrupt signals owned (own_interrupt_signals), then the wait's stores and waiter.wait
        itself; wait(came=) takes what the last returned. A process started so runs no Python
        until its first wake-up that needs it: every CPU of a bring-up takes its INIT and SIPI in
        its compiled wait (~40 copy-on-write page faults of the interpreter's fewer a CPU process).
        None where the wait draws spurious wake-ups (its generator is the process's own) or has no
        compiled taker: cpu_main then makes all of it in Python."""
        taker = self._taker(init)
        if self.spurious_per_s > 0 or (init and taker is None):
            return None
        calls = () if core is None else (functools.partial(os.sched_setaffinity, 0, {core}),)
        calls += self._owning_calls() + (functools.partial(self.u32.__setitem__, self.i_busy, 0),)
        if taker is not None:
            calls += (functools.partial(setattr, taker, "dead", False),)
        return calls + (functools.partial(self.waiter.wait, self._spin_ns(True), 0, None, taker),)

    def _spin_ns(self, may_spin: bool) -> int:
        """What a wait spins before it sleeps (Waiter.wait's spin_ns): -1, for ever, on a spin watch;
        the budget; 0 where it may not spin (HLT)."""
        return -1 if self.spin else self.budget_ns if may_spin else 0

    def _taker(self, init: bool):
        """The compiled Init a wait(init=init) takes an INIT with, or None: it takes whole messages
        and acknowledges them, not one this process has begun."""
        return self.init_taker if init and self.pending_ack is None and not self.midway else None

    def own_interrupt_signals(self) -> None:
        """Become the CPU of this process, whose handlers (install_interrupt_handlers, run
        before) record its interrupts, and unblock them."""
        for call in self._owning_calls():
            call()

    def _owning_calls(self) -> tuple:
        """own_interrupt_signals' steps, as calls into C (first_wait_calls makes them so): this CPU
        the one the handlers record for (``_this``); after the handlers, the Python Waiter's timer,
        or the compiled one's notes, in front of each interrupt's handler, that an interrupt came
        (so that its answer to a kick asks the interpreter only then); then the mask. The doorbell
        stays blocked for life: it is only ever taken by sigwaitinfo in the waiter's sleep, and one
        that arrives while we are awake just ends the next sleep early. An interrupt that came
        while blocked is taken at the unblock."""
        return (functools.partial(setattr, sys.modules[__name__], "_this", self), self.waiter.install_signal_handlers,
                functools.partial(_signal.pthread_sigmask, _signal.SIG_SETMASK, _CPU_MASK))

    # -- signal handlers: record and raise a byte, nothing else ---------------

    def _on_interrupt(self, signum, _frame) -> None:
        self.pending[self.sig_kind[signum]] += 1
        self.buf[self.wake_off + L.WAKE_IRQ] = 1

    # -- waiting ----------------------------------------------------------------

    def _spurious_in(self) -> float | None:
        if self.spurious_per_s <= 0:
            return None
        if self.rng is None:
            # Here, in the CPU's own process: the template that builds this object before the fork
            # imports no random, whose at-fork hook would reseed every CPU process it forks.
            import random

            self.rng = random.Random(self.seg.hdr("seed") * 4099 + self.cpu)
        return self.rng.expovariate(self.spurious_per_s)

    def wait(self, may_spin: bool = True, ack=None, init: bool = False, dead: bool = False, came=None) -> int:
        """Wait until a waker raises a byte; return the wake mask and clear what it names.

        The watch loop is the machine's hot path (``self.waiter``: compiled, or its
        Python peer; smpd.machine.hotpath). The TIMER byte comes back to the caller
        only as a spurious wake-up; a spin-budget expiry just moves the CPU from
        spinning to sleeping. ``may_spin=False`` (HLT) skips the adaptive spin budget
        and sleeps at once. ``ack`` (compiled path only, from mwait_play_dead()):
        when the wake-up is a kick this CPU can acknowledge, the compiled code does
        so, records the way into HLT and halts; ``acked_ns`` is then when it saw the
        kick, and the mask returned is what ended HLT. ``init`` (compiled path only, from a
        state whose INIT leads straight to wait-for-SIPI): an INIT, alone or followed by SIPI
        (and CPU_DOWN) into a generation the CPU learnt, is taken on the way (in MWAIT: its
        monitor disarmed and the IPI's wake-up counted first, as mwait_exit() does) and the wait
        starts over in the state it left (smpd/machine/_hotpath.c, take_init); ``init_ns`` is then
        when, ``init_state`` where (HLT: a kick came after it), ``init_entry`` in which generation, and the mask
        returned is the next wake-up's, for that state to take (parked: MWAIT's, a kick
        acknowledged as with ``ack``). So is a CPU_DOWN alone to a CPU running a generation it
        learnt, from `running`: play_dead() into mwait_play_dead(), parked (``init_state`` MWAIT);
        and a REBOOT alone there: stop_this_cpu() into HLT (``init_state`` HLT). ``dead`` (with
        ``init``): a dead CPU's wait (smpd.kernel.cpu's _dead_end), where the compiled path counts
        each interrupt signal taken asleep as held and sleeps on, until a take or another wake-up.
        ``came``: what the first waiter.wait of this call returned, made already, with this call's
        arguments and stores before it (``first_wait_calls``: by the fork loop, in a CPU process just
        forked); the call goes on from there.
        """
        u32 = self.u32
        spin_ns = self._spin_ns(may_spin)
        taker = self._taker(init)
        if came is None:
            u32[self.i_busy] = 0
            spurious = self._spurious_in()
            deadline_ns = 0 if spurious is None else time.monotonic_ns() + max(1, int(spurious * 1e9))
            if taker is not None:
                taker.dead = dead
                if spurious is not None:  # the wait of the state a take leaves draws its own
                    taker.spurious_ns = max(1, int(self._spurious_in() * 1e9))
        else:
            deadline_ns = 0  # first_wait_calls: no spurious wake-ups drawn
        while True:
            if came is None:
                code, arg, acked_ns = self.waiter.wait(spin_ns, deadline_ns, ack, taker)
            else:
                (code, arg, acked_ns), came = came, None
            if acked_ns:  # acknowledged and halted: what follows is HLT's wake-up
                self.acked_ns, ack, deadline_ns = acked_ns, None, 0
                if self.init_ns:  # a take in an earlier call parked it; this one was kicked since
                    self.init_state = L.ExecState.HLT
            if taker is not None and taker.taken_ns:
                # Where the last take left the CPU (after the kick, when one came first): in
                # wait-for-SIPI, running, MWAIT or HLT; parked, a wait again is MWAIT's.
                self.init_ns, self.init_state, ack = taker.taken_ns, taker.taken_state, taker.taken_ack
                self.init_entry = taker.taken_entry
                taker = None
            if code == hotpath.SIGNAL:  # an interrupt signal, taken while asleep
                self._on_interrupt(arg, None)
            elif code == hotpath.TIMEOUT:  # the spurious wake-up's time has come
                self.buf[self.wake_off + L.WAKE_TIMER] = 1
                deadline_ns = 0
            mask = self._consume()
            if mask:
                break
        u32[self.i_busy] = 1
        u32[self.i_activity] = (u32[self.i_activity] + 1) & 0xFFFFFFFF
        return mask

    def _consume(self) -> int:
        """Read the wake words, clear the bytes that were raised, fence, return them as a wake mask
        (one byte per L.WAKE_* kind)."""
        u32 = self.u32
        v = u32[self.wake_idx] & ~M_WRITE  # `wake`'s byte 0 is not a kind: WAKE_WRITE is `mon_write`
        if u32[self.write_idx]:
            self.buf[self.write_off] = 0
            if not v:
                # Only the bus's WRITE byte: the kick's path. No fence needed: what we read
                # next is memory the writer stored before raising the byte (x86 keeps loads
                # in order), and a write after our clear raises it again.
                return 1
            v |= 1
        for byte in (L.WAKE_IRQ, L.WAKE_IPI, L.WAKE_TIMER):
            if v >> (8 * byte) & 0xFF:
                self.buf[self.wake_off + byte] = 0
        fence()  # our clears are visible before we read the mailbox or memory below
        return v

    # -- MONITOR / MWAIT -----------------------------------------------------

    def monitor(self, addr: int) -> None:
        """__monitor(): arm the monitor on the line holding ``addr`` (the line directory has one
        writer per entry: a CPU arms only its own lines; see smpd.machine.layout)."""
        line = (addr - L.PHYS_BASE) // L.LINE
        self.buf[self.write_off] = 0
        self.u16[self.dir_base + line] = self.cpu + 1
        self.armed_line = line
        self.u32[self.i_mon_line] = line
        self.u32[self.i_mon_armed] = 1
        fence()  # the directory entry is visible before we look for a write (see smpd.machine.bus)

    def disarm(self) -> None:
        if self.armed_line >= 0:
            self.u16[self.dir_base + self.armed_line] = 0
            self.armed_line = -1
            self.u32[self.i_mon_armed] = 0

    def mwait(self, ack=None) -> int:
        """__mwait(): wait for a write to the monitored line, an interrupt, an IPI or nothing at all."""
        return self.mwait_exit(self.wait(ack=ack, init=True))

    def mwait_exit(self, mask: int) -> int:
        """MWAIT ended with ``mask``: the monitor disarmed, the wake-up counted."""
        if self.acked_ns or self.init_ns:  # the compiled path disarmed and counted, and halted since
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

    # -- interrupts and the mailbox (IPIs from the coordinator) ----------------

    def _drain_pending(self) -> dict[str, int]:
        """Move pending interrupts out of the handlers' hands: the handlers get a fresh dict in one
        store. A handler runs between two bytecodes of ours, never inside one, so each count it adds
        lands in the dict returned or in the fresh one, never lost (blocking the signals around a
        copy cost two pthread_sigmask calls and their enum conversions, ~7% of a CPU process's time
        in a soak)."""
        taken, self.pending = self.pending, dict.fromkeys(KINDS, 0)
        return taken

    def take_ipi(self) -> tuple[int, L.Ipi] | None:
        """The IPI the mailbox holds for this CPU, if its message is not acknowledged: the
        message's command, or the one of its IPIs that follows the last one done with."""
        seq = self.seg.cb(self.cpu, "mbox_seq")
        if seq == self.seg.cb(self.cpu, "mbox_ack"):
            return None
        at, part = self.part
        if at != seq or part == 0:
            return seq, _IPI[self.seg.cb(self.cpu, "mbox_cmd")]
        return seq, _IPI[L.mbox_follower(self.seg.cb(self.cpu, "mbox_arg"), part)]

    def ack(self, seq: int, result: int = IPI_DONE) -> None:
        self.seg.set_cb(self.cpu, "mbox_result", result)
        self.seg.set_cb(self.cpu, "mbox_ack", seq)  # last: the coordinator polls this word
        self.midway = False

    def _ack_pending(self) -> None:
        """Done with the IPI taken (``pending_ack``): acknowledge its message, or, if another IPI
        follows it there, raise the IPI byte for that one (the state this one led to takes it)."""
        seq = self.pending_ack
        if seq is None:
            return
        self.pending_ack = None
        at, part = self.part
        part = part + 1 if at == seq else 1
        if L.mbox_follower(self.seg.cb(self.cpu, "mbox_arg"), part):
            self.part, self.midway = (seq, part), True
            self.buf[self.wake_off + L.WAKE_IPI] = 1
        else:
            self.ack(seq)

    # -- the observation plane -------------------------------------------------

    def _add(self, field: str, n: int) -> None:
        self.seg.set_cb(self.cpu, field, self.seg.cb(self.cpu, field) + n)

    def _set_state(self, state: L.ExecState, hotplug: L.Hotplug | None = None) -> None:
        if hotplug is not None:
            self.seg.set_cb(self.cpu, "hotplug", hotplug)
        self.seg.set_cb(self.cpu, "state", state)
