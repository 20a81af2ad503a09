"""`smpd status`: everything it shows, read from the observation plane (and /proc for cores)."""

from __future__ import annotations

import time
from typing import Any

from smpd.host.proc import last_core
from smpd.kernel import image
from smpd.kernel.generations import Generations
from smpd.machine import layout as L
from smpd.machine.segment import Segment


def _words(addr: int, control: int, status: int, overwritten: bool) -> dict:
    """struct mwait_cpu_dead: numbers, and the same as hex strings (as a kernel engineer reads them).
    ``overwritten``: its page no longer holds its kernel's per-CPU area (a later kernel's writes
    went there): the words are whatever those left, not the struct."""
    return {"addr": addr, "control": control, "status": status, "overwritten": overwritten,
            "addr_hex": f"{addr:#x}", "control_hex": f"{control:#010x}", "status_hex": f"{status:#010x}"}


def _brief_all(seg: Segment, gens: Generations) -> list[dict]:
    """What the many-CPU view shows of each CPU (smpd.tools.render.cpu_grid): no host facts, no
    maps. Its control block's words are read by index, not by name: a 4096-CPU status read
    ~50,000 fields one lookup each, most of its ~0.2 s."""
    u32, step = seg.u32, L.CB_SIZE // 4
    at = {f: seg.cb_index(0, f) for f in ("state", "hotplug", "cpu_gen")}
    irq = [(k, [seg.cb_index(0, f"{k}_{what}") for what in ("taken", "pending", "held")]) for k in L.IRQ_CODE]
    state_name = {s.value: s.name for s in L.ExecState}
    hotplug_name = {h.value: h.name.lower() for h in L.Hotplug}
    current = seg.hdr("generation")
    gen_of: dict[int, int] = {}  # a CPU's cpu_gen -> the generation it runs (0: none yet -> the current)
    out = []
    for cpu in range(seg.geo.ncpus):
        base = cpu * step
        g = u32[base + at["cpu_gen"]] if cpu else 0
        if g not in gen_of:
            gen_of[g] = gens.map(g or current).gen
        out.append({"cpu": cpu, "state": state_name[u32[base + at["state"]]],
                    "hotplug": hotplug_name[u32[base + at["hotplug"]]],
                    "interrupts": {k: {"taken": u32[base + t], "pending": u32[base + p], "held": u32[base + h]}
                                   for k, (t, p, h) in irq},
                    "generation": gen_of[g]})  # the kernel it runs, or sits parked in
    return out


def _full(seg: Segment, gens: Generations, cpu: int, brief: dict) -> dict:
    """The brief view, and its process, wake-ups, struct mwait_cpu_dead and monitor."""
    geo = seg.geo
    cb = lambda f: seg.cb(cpu, f)  # noqa: E731
    pid = cb("pid")
    core = cb("core")
    if core < 0 and pid:
        core = last_core(pid)
    m = gens.of_cpu(cpu)
    md = m.mwait_cpu_dead_addr(cpu)
    return {
        **brief, "pid": pid, "core": core,
        "wakeups": {"write": cb("wake_write"), "interrupt": cb("wake_irq"),
                    "ipi": cb("wake_ipi"), "spurious": cb("wake_spurious")},
        "mwait_entries": cb("mwait_entries"), "init": cb("init_count"), "sipi": cb("sipi_count"),
        # a pre-fix kernel has no struct mwait_cpu_dead: None, not a word read from elsewhere
        "mwait_cpu_dead": None if m.boot.monitors_thread_info else
        _words(md, seg.mem_u32(md), seg.mem_u32(md + 4), not image.is_own_page(seg, m, (md - L.PHYS_BASE) // L.PAGE)),
        "monitor": {"armed": bool(cb("mon_armed")),
                    "addr": geo.line_addr(cb("mon_line")) if cb("mon_armed") else None,
                    "symbol": m.symbol(geo.line_addr(cb("mon_line"))) if cb("mon_armed") else None},
    }


def status_snapshot(seg: Segment, procs: dict[int, Any] | None = None, brief: bool = False) -> dict:
    """Everything `smpd status` shows, read from the observation plane (and /proc for cores).

    ``brief``: per CPU only its number, state, hotplug state and interrupt counts (what the view
    of a machine with many CPUs shows): a host process lookup per CPU (its core) and the memory
    map's symbols made a 4096-CPU status take seconds."""
    geo = seg.geo
    now = time.monotonic_ns()
    gens = Generations(seg)
    current = gens.current()
    cpus = _brief_all(seg, gens)
    if not brief:
        cpus = [_full(seg, gens, c["cpu"], c) for c in cpus]
    states: dict[str, int] = {}
    for c in cpus:
        states[c["state"]] = states.get(c["state"], 0) + 1
    machine = {
        "name": seg.hdr_str("name"), "pid": seg.hdr("coordinator_pid"), "cpus": geo.ncpus,
        "watch": "spin" if seg.hdr("watch") == L.Watch.SPIN else "adaptive",
        "watch_reason": seg.hdr_str("watch_reason"), "pin": seg.hdr_str("pin"),
        "hot_path": "c" if seg.hdr("hot_path") == L.HotPath.C else "python",
        "hot_path_reason": seg.hdr_str("hot_path_reason"), "spin_yields": bool(seg.hdr("spin_yields")),
        "spin_budget_us": seg.hdr("spin_budget_ns") // 1000,
        "seed": seg.hdr("seed"), "generation": current.gen, "kernel": current.boot.text(),
        "flavour": current.boot.flavour, "memory": current.summary(),
        "nosmt_siblings": [c for c in range(1, geo.ncpus) if current.boot.smt_sibling(c)], "ram_pages": geo.ram_pages,
        "state": L.MachineState(seg.hdr("state")).name, "uptime_s": (now - seg.hdr("boot_ns")) / 1e9,
        "bringup_ms": seg.hdr("bringup_ns") / 1e6, "segment": seg.name,
        "segment_bytes": geo.size, "layout_version": L.LAYOUT_VERSION,
        "janitor_pid": seg.hdr("janitor_pid"), "respawns": seg.hdr("respawns"),
        "kexecs": seg.hdr("kexec_count"),
        "online": sum(1 for c in cpus if c["hotplug"] == "online"), "states": states,
    }
    return {"machine": machine, "cpus": cpus}
