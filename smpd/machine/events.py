"""Per-CPU event rings in the observation plane, and the kexec timeline built from them.

A CPU logs what it did (woke, took an interrupt, saw the kick, faulted, stored
stray bytes) into a ring of EV_SLOTS entries in its own control block: a
timestamp (CLOCK_MONOTONIC ns, the one clock of every process here), a code and
an argument. Only the CPU writes its ring; ``ev_head`` counts entries ever logged
and is written last, so a reader sees whole entries. The coordinator reads the
entries since a mark and merges them with its own into one ordered timeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from smpd.machine import layout as L


def log(seg, cpu: int, code: L.Ev, arg: int = 0, ns: int | None = None) -> None:
    """Append one event to ``cpu``'s ring (called by that CPU only); ``ns`` backdates it
    to when it happened, for events logged late to keep them off a latency path."""
    head = seg.cb(cpu, "ev_head")
    off = seg.geo.cb_off(cpu) + L.EV_OFF + (head % L.EV_SLOTS) * L.EV_ENTRY.size
    L.EV_ENTRY.pack_into(seg.buf, off, time.monotonic_ns() if ns is None else ns, int(code), arg & 0xFFFFFFFF)
    seg.set_cb(cpu, "ev_head", head + 1)


def read_since(seg, cpu: int, mark: int) -> tuple[list[tuple[int, L.Ev, int]], int]:
    """Entries logged since ``mark`` (oldest first), and how many were overwritten."""
    head = seg.cb(cpu, "ev_head")
    first = max(mark, head - L.EV_SLOTS)
    out = []
    for n in range(first, head):
        off = seg.geo.cb_off(cpu) + L.EV_OFF + (n % L.EV_SLOTS) * L.EV_ENTRY.size
        ns, code, arg = L.EV_ENTRY.unpack_from(seg.buf, off)
        try:
            out.append((ns, L.Ev(code), arg))
        except ValueError:
            continue
    return out, first - mark


_KIND = {1: "nmi", 2: "smi", 3: "mce"}


def describe(seg, code: L.Ev, arg: int) -> str:
    geo = seg.geo
    if code == L.Ev.WAKE_WRITE:
        return f"MWAIT woken by a write to {geo.symbol(geo.line_addr(arg))}"
    if code in (L.Ev.INTERRUPT, L.Ev.HELD):
        return f"{_KIND.get(arg, '?').upper()} " + ("taken" if code == L.Ev.INTERRUPT else "held pending (wait-for-SIPI)")
    if code in (L.Ev.BAD_PAGE, L.Ev.TRIPLE_FAULT, L.Ev.FOREIGN_HALT):
        region, index = geo.region_of(arg)
        what = f"{region.name.lower()} page {index}"
        return {L.Ev.BAD_PAGE: f"touches {what}: not its kernel's",
                L.Ev.TRIPLE_FAULT: f"TRIPLE FAULT ({what})",
                L.Ev.FOREIGN_HALT: f"executes foreign bytes in {what} into a halt"}[code]
    if code == L.Ev.STRAY_STORE:
        return f"stray store to {geo.symbol(arg)} ({arg:#x})"
    return {
        L.Ev.KICK_SEEN: "sees control == CPUDEAD_MWAIT_KEXEC_HLT, acknowledges in status",
        L.Ev.HLT: "enters HLT", L.Ev.INIT: "INIT: wait-for-SIPI", L.Ev.SIPI: "SIPI: smp_callin()",
        L.Ev.REBOOT: "stop_this_cpu()", L.Ev.MCE_SHUTDOWN: "MCE in wait-for-SIPI: machine shutdown",
        L.Ev.SPURIOUS: "spurious MWAIT wake-up", L.Ev.OFFLINE: "play_dead() into mwait_play_dead()",
        L.Ev.SMM: "SMI: SMM entry, RSM",
    }.get(code, code.name)


@dataclass
class Timeline:
    """The coordinator's events plus the CPUs', ordered by time."""

    start_ns: int = field(default_factory=time.monotonic_ns)
    events: list[dict] = field(default_factory=list)

    def add(self, cpu: int, what: str, ns: int | None = None) -> None:
        self.events.append({"t_ns": time.monotonic_ns() if ns is None else ns, "cpu": cpu, "event": what})

    def merge_cpus(self, seg, marks: dict[int, int]) -> None:
        for cpu, mark in marks.items():
            entries, lost = read_since(seg, cpu, mark)
            if lost:
                self.add(cpu, f"({lost} earlier events of CPU{cpu} were overwritten in its ring)",
                         entries[0][0] if entries else None)
            for ns, code, arg in entries:
                self.events.append({"t_ns": ns, "cpu": cpu, "event": describe(seg, code, arg)})

    def ordered(self) -> list[dict]:
        out = sorted(self.events, key=lambda e: e["t_ns"])
        for e in out:
            e["t_rel_us"] = round((e["t_ns"] - self.start_ns) / 1000, 1)
        return out
