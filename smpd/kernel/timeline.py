"""The timeline of a kexec, a kick or an injection: the coordinator's events and the CPUs'.

A CPU's ring (smpd.machine.events) holds codes and arguments; what they mean, which
symbol an address is, which page of which region, is told here, in the memory map
of the generation that CPU runs (smpd.kernel.generations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from smpd.kernel.generations import Generations
from smpd.machine import layout as L
from smpd.machine.events import read_since

_KIND = {1: "nmi", 2: "smi", 3: "mce"}


def describe(gens: Generations, cpu: int, code: L.Ev, arg: int) -> str:
    m = gens.of_cpu(cpu)
    if code == L.Ev.WAKE_WRITE:
        return f"MWAIT woken by a write to {m.symbol(L.Geometry.line_addr(arg))}"
    if code in (L.Ev.INTERRUPT, L.Ev.HELD):
        return f"{_KIND.get(arg, '?').upper()} " + ("taken" if code == L.Ev.INTERRUPT else "held pending (wait-for-SIPI)")
    if code in (L.Ev.BAD_PAGE, L.Ev.TRIPLE_FAULT, L.Ev.FOREIGN_HALT):
        what = m.describe_page(arg)
        return {L.Ev.BAD_PAGE: f"touches {what}: not its kernel's",
                L.Ev.TRIPLE_FAULT: f"TRIPLE FAULT ({what})",
                L.Ev.FOREIGN_HALT: f"executes foreign bytes in {what} into a halt"}[code]
    if code == L.Ev.STRAY_STORE:
        return f"stray store to {m.symbol(arg)} ({arg:#x})"
    return {
        L.Ev.KICK_SEEN: "sees control == CPUDEAD_MWAIT_KEXEC_HLT, acknowledges in status",
        L.Ev.HLT: "enters HLT", L.Ev.INIT: "INIT: wait-for-SIPI", L.Ev.SIPI: "SIPI: smp_callin()",
        L.Ev.REBOOT: "stop_this_cpu()", L.Ev.MCE_SHUTDOWN: "MCE in wait-for-SIPI: machine shutdown",
        L.Ev.SPURIOUS: "spurious MWAIT wake-up", L.Ev.OFFLINE: "play_dead() into mwait_play_dead()",
        L.Ev.SMM: "SMI: SMM entry, RSM",
        L.Ev.NMI_STOP: "NMI shootdown: halts with NMIs blocked (crash_nmi_callback())",
    }.get(code, code.name)


@dataclass
class Timeline:
    """The coordinator's events plus the CPUs', ordered by time."""

    start_ns: int = field(default_factory=time.monotonic_ns)
    events: list[dict] = field(default_factory=list)

    def add(self, cpu: int, what: str, ns: int | None = None) -> None:
        self.events.append({"t_ns": time.monotonic_ns() if ns is None else ns, "cpu": cpu, "event": what})

    def merge_cpus(self, seg, marks: dict[int, int], gens: Generations | None = None) -> None:
        gens = gens or Generations(seg)
        for cpu, mark in marks.items():
            entries, lost = read_since(seg, cpu, mark)
            if lost:
                self.add(cpu, f"({lost} earlier events of CPU{cpu} were overwritten in its ring)",
                         entries[0][0] if entries else None)
            for ns, code, arg in entries:
                self.events.append({"t_ns": ns, "cpu": cpu, "event": describe(gens, cpu, code, arg)})

    def ordered(self) -> list[dict]:
        out = sorted(self.events, key=lambda e: e["t_ns"])
        for e in out:
            e["t_rel_us"] = round((e["t_ns"] - self.start_ns) / 1000, 1)
        return out
