"""What a CPU executes when it runs again: after a wake-up, an interrupt, an IPI or SMM.

A parked or halted CPU that is woken (a write to its monitored line) or interrupted
(NMI, MCE, SMI) executes instructions again, in memory a kexec may have overwritten:
``resume`` checks the pages that step touches in the map of the kernel the CPU runs
(smpd.kernel.resume) and turns a missing one into a triple fault or foreign bytes.
``take_interrupts`` runs pending handlers in the order the CPU takes them (MCE, NMI,
SMI), with the NMI latch and a CPU halted inside an NMI handler holding later NMIs;
``hold_interrupts`` is wait-for-SIPI's rule (NMI and SMI held, an MCE shuts down).
``_ipi`` looks at the mailbox (IPIs from the coordinator) for what a state takes.

A mixin of smpd.kernel.cpu.Cpu: it uses the CPU's segment, bus, number, memory map
(``map``), resume plans and the states ``shutdown``, ``foreign_halt``, ``init_reset`` and
``mwait_play_dead``.
"""

from __future__ import annotations

import time

from smpd.kernel import resume as resume_mod
from smpd.kernel.memmap import TEXT_MCE, TEXT_NMI, TEXT_PLAY_DEAD, MemoryMap
from smpd.machine import events, layout as L
from smpd.machine.core import IPI_IGNORED, KINDS, M_IPI, M_IRQ


class Executes:
    """Running again after a wake-up or an interrupt (see the module's docstring)."""

    # -- executing in the old kernel -----------------------------------------

    def _plan(self, text_page: int, m: MemoryMap | None = None) -> resume_mod.ResumePlan:
        """The resume plan of ``text_page`` in map ``m`` (the running map unless given)."""
        key = (self.map if m is None else m, text_page)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = resume_mod.ResumePlan(self.seg, key[0], self.cpu, text_page)
        return plan

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
                                 ("fault_ns", time.monotonic_ns()),
                                 ("fault_gen", self.seg.cb(self.cpu, "cpu_gen")), ("fault", v.fault)):
                self.seg.set_cb(self.cpu, field, value)
        if v.fault == L.Fault.TRIPLE_FAULT:
            events.log(self.seg, self.cpu, L.Ev.TRIPLE_FAULT, v.page)
            return self.shutdown
        events.log(self.seg, self.cpu, L.Ev.FOREIGN_HALT, v.page)
        return self.foreign_halt

    # -- interrupts ----------------------------------------------------------


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
        if self.nmi_blocked and got["nmi"]:
            # latched (one, however many arrived), before the count: whoever sees it held sees it pending
            self.seg.set_cb(self.cpu, "nmi_pending", 1)
            self._add("nmi_held", got["nmi"])
            events.log(self.seg, self.cpu, L.Ev.HELD, L.IRQ_CODE["nmi"])
            got["nmi"] = 0
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
        for kind in L.HELD_IN_INIT:
            if got[kind]:
                self._add(f"{kind}_held", got[kind])
                events.log(self.seg, self.cpu, L.Ev.HELD, L.IRQ_CODE[kind])
                # One latch each: the processor holds one pending NMI and one pending SMI, however
                # many arrived (SDM vol. 3, "Pending SMIs" and the NMI latch); the rest are lost.
                self.seg.set_cb(self.cpu, f"{kind}_pending", 1)
        if got["mce"]:
            self._add("mce_held", got["mce"])
            return True
        return False

    # -- the mailbox (IPIs from the coordinator) -----------------------------

    def _ipi(self, mask: int, allowed: tuple[L.Ipi, ...] = ()):
        """Look at the mailbox if the IPI byte was raised.

        INIT reaches a CPU in any state; a command in ``allowed`` is
        returned for the state to handle (its ack is the state's to send); any
        other is acknowledged as ignored. Returns (next_state or False, ipi or None).
        """
        if not mask & M_IPI:
            return False, None
        ipi = self.take_ipi()
        if ipi is None:
            return False, None
        seq, cmd = ipi
        if cmd == L.Ipi.INIT:
            self.pending_ack = seq
            return self.init_reset, None
        if cmd in allowed:
            return False, ipi
        self.ack(seq, IPI_IGNORED)
        return False, None

    def _interrupts_then_ipis(self, mask: int, allowed: tuple[L.Ipi, ...] = (), in_hlt: bool = False):
        """Take interrupts (their handlers may fault), then INIT, then a REPARK
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
