"""What the kexec reads back about each CPU: alive or not, what the host did to it, and the
facts the outcome is classified from (smpd.kernel.outcome.CpuFacts) and reported with.

Everything here is read from the segment (each CPU's control block, written by the CPU
itself), from the coordinator's view of its processes (``Port.cpu_alive``,
``Port.cpu_process``) and, for host faults, from psutil. Nothing is written.
"""

from __future__ import annotations

from typing import Iterable

import psutil

from smpd.host.proc import asleep_in_sigwait, signal_queued
from smpd.kernel.generations import Generations
from smpd.kernel.memmap import MemoryMap, page_addr
from smpd.kernel.outcome import CpuFacts
from smpd.kernel.timeline import describe
from smpd.machine import layout as L


class Observer:
    """Reads the CPUs of a machine for a kexec; ``new`` is the kernel kexec'd into, once known."""

    def __init__(self, port, gens: Generations):
        self.c, self.seg, self.gens = port, port.seg, gens
        self.new: MemoryMap | None = None

    def alive(self, cpu: int) -> bool:
        return bool(self.alive_of((cpu,)))

    def alive_of(self, cpus: Iterable[int]) -> set[int]:
        """Those of ``cpus`` whose process lives (Port.cpus_alive, asked together) and that are not GONE."""
        return {c for c in self.c.cpus_alive(cpus) if self.seg.cb(c, "state") != L.ExecState.GONE}

    def irq_seen(self, cpu: int) -> int:
        return sum(self.seg.cb(cpu, f"{k}_taken") + self.seg.cb(cpu, f"{k}_held") for k in L.IRQ_KINDS)

    def irq_queued(self, cpu: int, kind: str) -> bool:
        """Is an interrupt of ``kind`` sent to ``cpu`` still on its way: its signal queued by the
        host, not yet delivered to the CPU's process?"""
        p = self.c.cpu_process(cpu)
        return p is not None and self.c.cpu_alive(cpu) and signal_queued(p.pid, self.c.signals[kind])

    def irq_settled(self, cpu: int, kind: str) -> bool:
        """Has ``cpu`` handled every interrupt of ``kind`` it will ever get of those sent so far?
        None is queued by the host and, looked at after that, its process is asleep in its wait
        (sigwaitinfo: smpd.machine.hotpath): it took any it dequeued before it slept again. Never
        true of a spinning CPU, which does not sleep."""
        p = self.c.cpu_process(cpu)
        return not self.irq_queued(cpu, kind) and p is not None and asleep_in_sigwait(p.pid)

    def host_note(self, cpu: int) -> str:
        """What the host did to this CPU's process, when that explains a missed deadline."""
        p = self.c.cpu_process(cpu)
        if p is None or not p.is_alive():
            return ""
        try:
            st = psutil.Process(p.pid).status()
        except psutil.Error:
            return ""
        if st == "stopped":
            return "its process is stopped (SIGSTOP): a host fault, not the machine's"
        if self.seg.wake_raised(cpu):
            return ("a wake-up was posted to it and its process has not run since: a host scheduling gap, "
                    "not the machine's")
        return ""

    def cpu_facts(self, cpu: int, suspect: bool = False, alive: bool | None = None) -> CpuFacts:
        """``suspect``: the CPU missed a deadline (an injection not taken, a kick not answered): say what
        the host did to it. ``alive``: what ``alive`` says of it, when asked already (``alive_of``
        of every CPU)."""
        seg = self.seg
        fault = L.Fault(seg.cb(cpu, "fault"))
        gen = seg.cb(cpu, "cpu_gen")
        m = self.gens.of_cpu(cpu)
        cause, arg = seg.cb(cpu, "fault_cause"), seg.cb(cpu, "fault_cause_arg")
        paged = fault not in (L.Fault.NONE, L.Fault.MCE_SHUTDOWN)
        # Only a fault or its cause is described (a soak trial asks this of every CPU).
        fm, where = self._fault_page(cpu, gen, m) if paged or cause else (m, "")
        store = None
        if fault == L.Fault.STRAY_STORE or seg.cb(cpu, "stray_stores"):
            addr = seg.cb(cpu, "fault_addr")
            store = (addr, (self.new or m).symbol(addr), seg.cb(cpu, "fault_value"))
        p = self.c.cpu_process(cpu)
        if alive is None:
            alive = self.alive(cpu)
        return CpuFacts(
            cpu=cpu, state="GONE" if not alive else L.ExecState(seg.cb(cpu, "state")).name, fault=fault.name,
            fault_ns=seg.cb(cpu, "fault_ns"),
            fault_page=where if paged else "",
            fault_cause=describe(fm, L.Ev(cause), arg) if cause else "",
            stray_stores=seg.cb(cpu, "stray_stores"), first_store=store, alive=alive,
            exit_code=None if p is None or alive else p.exitcode, pid=0 if p is None else p.pid,
            held=any(seg.cb(cpu, f"{k}_held") for k in L.HELD_IN_INIT),
            host_note=self.host_note(cpu) if suspect else "", generation=gen,
            monitor=m.symbol(seg.geo.line_addr(seg.cb(cpu, "mon_line"))) if seg.cb(cpu, "mon_armed") else "")

    def _fault_page(self, cpu: int, gen: int, m: MemoryMap) -> tuple[MemoryMap, str]:
        """The map of the kernel ``cpu`` ran when it faulted, and its fault page described in it: the
        new kernel may have restarted the CPU since (a CPU that stored stray bytes and halted)."""
        page = self.seg.cb(cpu, "fault_page")
        fault_gen = self.seg.cb(cpu, "fault_gen") or gen
        try:
            fm = self.gens.map(fault_gen)
        except LookupError:  # older than the generation table keeps
            fm, fault_gen = m, gen
        was = fm.describe_page(page)
        where = f"{was} of generation {fault_gen} at {page_addr(page):#x}"
        if self.new is not None and self.new.gen != fault_gen and self.new.region_of(page):
            now = self.new.describe_page(page)
            where += f" (now generation {self.new.gen}'s {now}" + (
                ", the same part at the same address but another build's: smpd takes no two generations for "
                "byte-identical, README: Page identity" if now == was else "") + ")"
        return fm, where

    def cpu_report(self, cpu: int) -> dict:
        f = self.cpu_facts(cpu)
        seg = self.seg
        d = {"cpu": cpu, "pid": seg.cb(cpu, "pid"), "state": f.state,
             "hotplug": L.Hotplug(seg.cb(cpu, "hotplug")).name.lower(), "generation": f.generation,
             "fault": f.fault, "stray_stores": f.stray_stores}
        if f.fault_page:
            d["fault_page"] = f.fault_page
            d["fault_cause"] = f.fault_cause or None
        if f.first_store:
            addr, symbol, value = f.first_store
            d["first_store"] = {"addr": addr, "value": value, "symbol": symbol}
        return d
