"""The timeline of a kexec, a kick or an injection: the coordinator's events and the CPUs'.

A CPU's ring (smpd.machine.events) holds codes and arguments; what they mean, which
symbol an address is, which page of which region, is told here, in the memory map
of the generation that CPU runs (smpd.kernel.generations).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from smpd.kernel.generations import Generations
from smpd.machine import layout as L
from smpd.machine.events import read_since

_KIND = {i.value: i.kind for i in L.Irq}
# The coordinator's events: a note on its work, an interrupt it injected, a write of the
# copy or the new kernel's boot that woke a monitor, SMM hanging on CPUs in INIT, INIT
# reaching the boot CPU (a reset).
COORD_KINDS = ("note", "inject", "waking_write", "smm_hang", "machine_reset", "mce_shutdown", "machine_end")
# What ends the machine from the coordinator's side: a hung SMM, INIT to the boot CPU, a broadcast MCE
# that reached CPU 0 with #MC off (smpd.kernel.kexec.mce_reaches_kexec_cpu).
_COORD_ENDS = {"smm_hang": "SMM", "machine_reset": "INIT to the boot CPU", "mce_shutdown": "CPU0"}
MACHINE_ENDS = ("TRIPLE_FAULT", "MCE_SHUTDOWN")  # CPU events after which the platform resets or stops


def describe(m, code: L.Ev, arg: int) -> str:
    """An event in words; addresses and pages named in ``m``, the memory map of the kernel the
    CPU ran when it logged the event."""
    if code == L.Ev.WAKE_WRITE:
        return f"MWAIT woken by a write to {m.symbol(L.Geometry.line_addr(arg))}"
    if code in (L.Ev.INTERRUPT, L.Ev.HELD):
        return f"{_KIND.get(arg, '?').upper()} " + ("taken" if code == L.Ev.INTERRUPT else
                                                    "held pending (in wait-for-SIPI, or NMIs blocked)")
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
        L.Ev.NMI_STOP: "stopped by NMI: halts in the handler, NMIs blocked (crash_nmi_callback() for kdump, "
                       "else smp_stop_nmi_callback())",
    }.get(code, code.name)


@dataclass
class Timeline:
    """The coordinator's events plus the CPUs', ordered by time, and the coordinator's phases.

    Each event is {"t_ns", "cpu", "event" (what happened, in words), "kind"}: for a CPU's
    event its code (smpd.machine.layout.Ev name: "WAKE_WRITE", "HLT", ...), for the
    coordinator's a word of COORD_KINDS. A phase is a span of the coordinator's work,
    named as the kernel names it ("smp_kick_mwait_play_dead()"). ``start_states`` are
    the CPUs' execution states when the timeline began: with the events, each CPU's
    state at every moment (smpd.tools.trace draws them).
    """

    start_ns: int = field(default_factory=time.monotonic_ns)
    events: list[dict] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)
    start_states: dict[int, str] = field(default_factory=dict)
    start_gens: dict[int, int] = field(default_factory=dict)

    def add(self, cpu: int, what: str, ns: int | None = None, kind: str = "note") -> None:
        assert cpu != 0 or kind in COORD_KINDS, kind
        self.events.append({"t_ns": time.monotonic_ns() if ns is None else ns, "cpu": cpu, "event": what,
                            "kind": kind})

    @contextmanager
    def phase(self, name: str, track: str = "kernel"):
        """A span of the coordinator's work, from entering the block to leaving it. ``track``:
        "kernel" for what the kernel does, "smpd" for the emulator's own work (waiting for an
        injection to be taken, for the CPUs to settle, checking memory), which takes no time
        on hardware."""
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self.spans.append({"name": name, "t_ns": start, "end_ns": time.monotonic_ns(), "track": track})

    def mark_machine_end(self) -> None:
        """Where the machine ended (the first triple fault or MCE shutdown of a CPU, SMM hanging,
        INIT to the boot CPU): one coordinator event there. The sequence runs on after it, so that every
        CPU the writes would hit is found; on hardware nothing after it happens."""
        ends = [e for e in self.events if e["kind"] in MACHINE_ENDS or e["kind"] in _COORD_ENDS]
        if ends:
            first = min(ends, key=lambda e: e["t_ns"])
            who = _COORD_ENDS[first["kind"]] if first["cpu"] == 0 else f"CPU{first['cpu']}"
            later = any(e["t_ns"] > first["t_ns"] for e in self.events)
            self.add(0, f"the machine ends here ({who}: {first['kind'].replace('_', ' ').lower()})"
                        + ("; on hardware nothing below happens: the emulation runs on to find every CPU the "
                           "writes would hit" if later else ""),
                     first["t_ns"], "machine_end")

    def mark_start(self, seg, cpus) -> dict[int, int]:
        """Note each CPU's state and generation now and return its event-ring marks, for merge_cpus()."""
        self.start_states = {cpu: L.ExecState(seg.cb(cpu, "state")).name for cpu in cpus}
        self.start_gens = {cpu: seg.cb(cpu, "cpu_gen") for cpu in cpus}
        return {cpu: seg.cb(cpu, "ev_head") for cpu in cpus}

    def merge_cpus(self, seg, marks: dict[int, int], gens: Generations | None = None) -> None:
        """The CPUs' events since ``marks``, each told in the map of the kernel the CPU ran then:
        the one it ran at the start, until a SIPI started it in the current one."""
        gens = gens or Generations(seg)
        for cpu, mark in marks.items():
            entries, lost = read_since(seg, cpu, mark)
            if lost:
                self.events.append({"t_ns": entries[0][0] if entries else time.monotonic_ns(), "cpu": cpu,
                                    "event": f"({lost} earlier events of CPU{cpu} were overwritten in its ring)",
                                    "kind": "LOST"})
            gen = self.start_gens.get(cpu) or 0
            for ns, code, arg in entries:
                if code == L.Ev.SIPI:
                    gen = seg.hdr("generation")
                try:
                    m = gens.map(gen) if gen else gens.of_cpu(cpu)
                except LookupError:  # older than the table keeps
                    m = gens.of_cpu(cpu)
                self.events.append({"t_ns": ns, "cpu": cpu, "event": describe(m, L.Ev(code), arg),
                                    "kind": L.Ev(code).name})

    def ordered(self) -> list[dict]:
        out = sorted(self.events, key=lambda e: e["t_ns"])
        for e in out:
            e["t_rel_us"] = round((e["t_ns"] - self.start_ns) / 1000, 1)
        return out

    def record(self) -> dict:
        """What a report carries: the ordered events, the phases, the CPUs' states at the start."""
        rel = lambda ns: round((ns - self.start_ns) / 1000, 1)  # noqa: E731
        return {"timeline": self.ordered(),
                "phases": [{"name": p["name"], "t_ns": p["t_ns"], "t_rel_us": rel(p["t_ns"]),
                            "dur_us": round((p["end_ns"] - p["t_ns"]) / 1000, 1), "track": p["track"]}
                           for p in sorted(self.spans, key=lambda p: p["t_ns"])],
                "start_states": {str(c): s for c, s in sorted(self.start_states.items())}}
