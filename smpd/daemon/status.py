"""`smpd status`: everything it shows, read from the observation plane (and /proc for cores)."""

from __future__ import annotations

import time
from typing import Callable

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


def _reader(seg: Segment, fields) -> Callable[[int], dict]:
    """``read(cpu)``: those unsigned control-block words of ``cpu``, by name. Read by index, not
    each by its name: a 4096-CPU status reads ~100,000 of them (seg.cb's lookup was most of it)."""
    cols = [(f, *seg.cb_column(f)) for f in fields]
    return lambda cpu: {f: a[i0 + cpu * step] for f, a, i0, step in cols}


_IRQ = [(k, [f"{k}_{what}" for what in ("taken", "pending", "held")]) for k in L.IRQ_CODE]
_WAKEUPS = {"write": "wake_write", "interrupt": "wake_irq", "ipi": "wake_ipi", "spurious": "wake_spurious"}


def _brief_all(seg: Segment, gens: Generations, cpus) -> list[dict]:
    """What the many-CPU view shows of each of ``cpus`` (smpd.tools.render.cpu_grid): no host
    facts, no maps."""
    read = _reader(seg, ["state", "hotplug", "cpu_gen", *(f for _k, fs in _IRQ for f in fs)])
    state_name = {s.value: s.name for s in L.ExecState}
    hotplug_name = {h.value: h.name.lower() for h in L.Hotplug}
    current = seg.hdr("generation")
    gen_of: dict[int, int] = {}  # a CPU's cpu_gen -> the generation it runs (0: none yet -> the current)
    out = []
    for cpu in cpus:
        w = read(cpu)
        g = w["cpu_gen"] if cpu else 0
        if g not in gen_of:
            gen_of[g] = gens.map(g or current).gen
        out.append({"cpu": cpu, "state": state_name[w["state"]], "hotplug": hotplug_name[w["hotplug"]],
                    "interrupts": {k: {"taken": w[t], "pending": w[p], "held": w[h]} for k, (t, p, h) in _IRQ},
                    "generation": gen_of[g]})  # the kernel it runs, or sits parked in
    return out


def _full_all(seg: Segment, gens: Generations, briefs: list[dict]) -> list[dict]:
    """The brief views, each with its process, wake-ups, struct mwait_cpu_dead and monitor."""
    read = _reader(seg, ["pid", "mon_armed", "mon_line", "mwait_entries", "init_count", "sipi_count",
                         *_WAKEUPS.values()])
    own: dict[tuple[int, int], bool] = {}  # (generation, page) -> still holds that kernel's per-CPU area
    out = []
    for brief in briefs:
        cpu = brief["cpu"]
        w = read(cpu)
        core = seg.cb(cpu, "core")
        if core < 0 and w["pid"]:
            core = last_core(w["pid"])
        m = gens.of_cpu(cpu)
        md = None
        if not m.boot.monitors_thread_info:  # a pre-fix kernel has no struct mwait_cpu_dead: None
            md = m.mwait_cpu_dead_addr(cpu)
            page = (md - L.PHYS_BASE) // L.PAGE
            if (m.gen, page) not in own:
                own[m.gen, page] = image.is_own_page(seg, m, page)
            md = _words(md, seg.mem_u32(md), seg.mem_u32(md + 4), not own[m.gen, page])
        line = seg.geo.line_addr(w["mon_line"]) if w["mon_armed"] else None
        out.append({
            **brief, "pid": w["pid"], "core": core, "wakeups": {k: w[f] for k, f in _WAKEUPS.items()},
            "mwait_entries": w["mwait_entries"], "init": w["init_count"], "sipi": w["sipi_count"],
            "mwait_cpu_dead": md,
            "monitor": {"armed": bool(w["mon_armed"]), "addr": line,
                        "symbol": m.symbol(line) if line is not None else None},
        })
    return out


def status_snapshot(seg: Segment, brief: bool = False, only: list[int] | None = None) -> dict:
    """Everything `smpd status` shows, read from the observation plane (and /proc for cores).

    ``brief``: per CPU only its number, state, hotplug state and interrupt counts (what the view
    of a machine with many CPUs shows): a host process lookup per CPU (its core) and the memory
    map's symbols made a 4096-CPU status take seconds. ``only``: the CPUs listed, in that order
    (the machine's counts are still of all of them)."""
    geo = seg.geo
    now = time.monotonic_ns()
    gens = Generations(seg)
    current = gens.current()
    every = _brief_all(seg, gens, range(geo.ncpus))
    cpus = every if only is None else [every[c] for c in only]
    if not brief:
        cpus = _full_all(seg, gens, cpus)
    states: dict[str, int] = {}
    for c in every:
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
        "online": sum(1 for c in every if c["hotplug"] == "online"), "states": states,
    }
    return {"machine": machine, "cpus": cpus}
