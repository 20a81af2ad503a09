"""A kernel coming up: power-on and cold boot of generation 1, and any kernel starting its APs.

Shared by `smpd up` and `smpd reset` (a power cycle: RAM holds firmware's bytes, then
generation 1 is loaded and boots) and by the kexec (a new generation starts the CPUs
its boot parameters keep).
"""

from __future__ import annotations

import time

from smpd import cpulist
from smpd.errors import SmpdError
from smpd.kernel import generations, image
from smpd.kernel.generations import Generations
from smpd.kernel.memmap import Boot, MemoryMap, cold_boot
from smpd.machine import layout as L
from smpd.machine.core import IPI_DONE

PARK_S = 2.0  # how long a sibling a kernel parks at boot (nosmt) gets to reach mwait_play_dead()


def power_on(seg, bus, boot: Boot) -> MemoryMap:
    """RAM after a power cycle with generation 1 booted into it (its own writes done; APs not started)."""
    m = load_first(seg, boot)
    write_ram(seg, bus, m)
    return m


def load_first(seg, boot: Boot) -> MemoryMap:
    """Power-on's first half: generation 1's memory map, recorded (what a CPU process needs to be
    forked: smpd.daemon.template), its RAM not yet written (``write_ram``)."""
    m = cold_boot(generations.sizes_of(seg), boot)
    generations.record(seg, m)
    return m


def write_ram(seg, bus, m: MemoryMap) -> None:
    """Power-on's second half: RAM as firmware and generation 1 ``m`` leave it. Before any SIPI."""
    seed = seg.hdr("seed")
    seg.reserve_ram()  # a /dev/shm filled since the segment was made refuses here, not by SIGBUS
    # No CPU executes until generation 1 has written its pages (the APs wait for SIPI), so their
    # firmware bytes could only be seen by a monitor they woke. With none armed (always: APs are in
    # wait-for-SIPI from power-on, or after the reset's INIT), RAM is written as it ends up, at
    # once; else page by page, in order.
    if bus.any_monitor():
        image.power_on(bus, seg.geo, seed)
        seg.set_hdr("generation", 1)
        image.boot_kernel(bus, seed, m)
    else:
        image.booted_ram(bus, seg.geo, seed, m)
        seg.set_hdr("generation", 1)


def start_aps(port, m: MemoryMap, cpus: list[int], timeout_s: float, offline: list[int] = ()) -> dict:
    """INIT, then SIPI, to each CPU of ``cpus`` that kernel ``m`` starts; its nosmt siblings then
    park themselves in mwait_play_dead(), in m's memory (waited for, bounded). Each of ``offline``
    it starts (a sibling aside) goes offline again once up, as `smpd offline` would take it: a
    CPU_DOWN in the same message as its INIT and SIPI, which it acknowledges once parked.

    Returns {"started", "missing" (no answer), "sipi_ignored" (answered, but did not take its SIPI:
    ``sipi_ignored``), "left_behind" (not started), "parked", "messages" (what followed each CPU's
    INIT in its message)}."""
    seg = port.seg
    seg.set_hdr("generation", m.gen)
    targets = [c for c in cpus if m.boot.started(c)]
    left = [c for c in cpus if not m.boot.started(c)]
    down = set(offline)
    messages = {c: (L.Ipi.SIPI, L.Ipi.CPU_DOWN) if c in down and not m.boot.parks_at_boot(c) else (L.Ipi.SIPI,)
                for c in targets}
    results, missing = port.ipi_wait(targets, L.Ipi.INIT, timeout_s, then=messages)
    ignored = sipi_ignored(seg, results)
    up = [c for c in targets if c in results and c not in ignored]
    parks = [c for c in up if m.boot.parks_at_boot(c)]
    wait_parked(port, parks)
    return {"started": up, "missing": missing, "sipi_ignored": ignored, "left_behind": left, "parked": parks,
            "messages": messages}


def sipi_ignored(seg, results: dict[int, int]) -> dict[int, str]:
    """Of the answers to INIT-then-SIPI messages ({cpu: mailbox result}), the CPUs that did not take
    their SIPI, each with what it is now: a CPU no longer in wait-for-SIPI ignores it (IPI_IGNORED),
    as after an MCE between INIT and SIPI (INIT cleared CR4.MCE: SHUTDOWN, fault MCE_SHUTDOWN). A
    real BSP would see it never report in (do_boot_cpu(); cpuhp_bp_sync_alive() from 6.5). One that
    took its SIPI and ignored what followed (a CPU_DOWN) is up, and not named here."""
    out = {}
    for c, r in sorted(results.items()):
        state = seg.cb(c, "state")
        if r != IPI_DONE and state in (L.ExecState.WAIT_FOR_SIPI, L.ExecState.SHUTDOWN):
            fault = seg.cb(c, "fault")
            out[c] = L.ExecState(state).name + (f", fault {_name(L.Fault, fault)}" if fault else "")
    return out


def _name(enum, value: int) -> str:
    """An enum's name for a word read from the segment, whatever its value."""
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def describe_ignored(ignored: dict[int, str]) -> str:
    """``sipi_ignored``'s CPUs, grouped by what they are now: 'CPU 2,5 (SHUTDOWN, fault MCE_SHUTDOWN)'."""
    by: dict[str, list[int]] = {}
    for c, what in ignored.items():
        by.setdefault(what, []).append(c)
    return "; ".join(f"CPU {cpulist.format_list(cs, grouped=True)} ({what})" for what, cs in by.items())


def did_not_take(ignored: dict[int, str]) -> str:
    """'CPU 2 (SHUTDOWN, fault MCE_SHUTDOWN) did not take its SIPI', for ``sipi_ignored``'s CPUs."""
    return f"{describe_ignored(ignored)} did not take {'its' if len(ignored) == 1 else 'their'} SIPI"


def require_sipi_taken(r: dict, what: str) -> None:
    """Raise, for ``start_aps``'s answer ``r``, when a CPU did not take its SIPI."""
    if ignored := r["sipi_ignored"]:
        raise SmpdError(f"{what}: {did_not_take(ignored)}: a CPU no longer in wait-for-SIPI ignores "
                        f"it, and never reports in (an MCE between INIT and SIPI shuts the machine down)")


def wait_parked(port, cpus: list[int]) -> None:
    """Wait (PARK_S at most) until each of ``cpus``, SMT siblings on their way, is parked in
    mwait_play_dead(). Parked means MONITOR armed, not just the state word set on the way in: a
    kexec right after this boot (a chain) must find them as a real machine would, long parked."""
    seg = port.seg
    waiting = list(cpus)
    deadline = time.monotonic() + PARK_S
    while waiting and time.monotonic() < deadline:
        waiting = [c for c in waiting if not (seg.cb(c, "state") == L.ExecState.MWAIT and seg.cb(c, "mon_armed"))]
        alive = port.cpus_alive(waiting)
        waiting = [c for c in waiting if c in alive]
        if waiting:
            time.sleep(0.0005)


def current(seg) -> MemoryMap:
    return Generations(seg).current()
