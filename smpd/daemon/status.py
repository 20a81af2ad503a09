"""`smpd status`: everything it shows, read from the observation plane (and /proc for cores)."""

from __future__ import annotations

import time

from smpd.host.proc import last_core
from smpd.kernel import image
from smpd.kernel.generations import Generations
from smpd.kernel.memmap import MemoryMap
from smpd.machine import layout as L
from smpd.machine.segment import Segment


def _words(addr: int, control: int, status: int, overwritten: bool) -> dict:
    """struct mwait_cpu_dead: numbers, and the same as hex strings (as a kernel engineer reads them).
    ``overwritten``: its page no longer holds its kernel's per-CPU area (a later kernel's writes
    went there): the words are whatever those left, not the struct."""
    return {"addr": addr, "control": control, "status": status, "overwritten": overwritten,
            "addr_hex": f"{addr:#x}", "control_hex": f"{control:#010x}", "status_hex": f"{status:#010x}"}


def _columns(seg: Segment, fields) -> dict[str, list[int]]:
    """Those unsigned control-block words of every CPU, a list each (by CPU number), each read in
    one strided slice: a 4096-CPU status reads ~100,000 words, and one lookup a word by its name
    (seg.cb) was most of its time."""
    n = seg.geo.ncpus
    out = {}
    for f in fields:
        a, i0, step = seg.cb_column(f)
        out[f] = a[i0:i0 + n * step:step].tolist()
    return out


_IRQ = [(k, [f"{k}_{what}" for what in ("taken", "pending", "held")]) for k in L.IRQ_CODE]
_IRQ_FIELDS = [f for _k, fs in _IRQ for f in fs]
_WAKEUPS = {"write": "wake_write", "interrupt": "wake_irq", "ipi": "wake_ipi", "spurious": "wake_spurious"}


class _MapOf:
    """The memory map of the kernel a CPU runs (Generations.of_cpu), each generation's looked up once."""

    def __init__(self, seg: Segment, gens: Generations, current: MemoryMap):
        self.gens, self.current, self.cpu_gen = gens, current.gen, _columns(seg, ["cpu_gen"])["cpu_gen"]
        self.maps: dict[int, MemoryMap] = {current.gen: current}

    def __call__(self, cpu: int) -> MemoryMap:
        g = (self.cpu_gen[cpu] if cpu else 0) or self.current  # 0: not started by any yet: the current
        if g not in self.maps:
            self.maps[g] = self.gens.map(g)
        return self.maps[g]


def _brief_all(seg: Segment, map_of: _MapOf, cpus, quiet_irqs: bool = True) -> list[dict]:
    """What the many-CPU view shows of each of ``cpus`` (smpd.tools.render.cpu_grid): no host
    facts, no maps. ``quiet_irqs=False``: a CPU's interrupt counts only when one is not 0 (the
    brief view of 4096 CPUs was 0.93 MB of JSON, most of it counts of 0)."""
    w = _columns(seg, ["state", "hotplug", *_IRQ_FIELDS])
    state_name = {s.value: s.name for s in L.ExecState}
    hotplug_name = {h.value: h.name.lower() for h in L.Hotplug}
    irq_counts = [w[f] for f in _IRQ_FIELDS]
    out = []
    for cpu in cpus:
        c = {"cpu": cpu, "state": state_name[w["state"][cpu]], "hotplug": hotplug_name[w["hotplug"][cpu]],
             "generation": map_of(cpu).gen}  # the kernel it runs, or sits parked in
        if quiet_irqs or any(counts[cpu] for counts in irq_counts):
            c["interrupts"] = {k: {"taken": w[t][cpu], "pending": w[p][cpu], "held": w[h][cpu]} for k, (t, p, h) in _IRQ}
        out.append(c)
    return out


def _full_all(seg: Segment, map_of: _MapOf, briefs: list[dict]) -> list[dict]:
    """The brief views, each with its process, wake-ups, struct mwait_cpu_dead and monitor."""
    w = _columns(seg, ["pid", "mon_armed", "mon_line", "mwait_entries", "init_count", "sipi_count",
                       "sleeping", "sleep_core", *_WAKEUPS.values()])
    own: dict[tuple[int, int], bool] = {}  # (generation, page) -> still holds that kernel's per-CPU area
    out = []
    for brief in briefs:
        cpu = brief["cpu"]
        pid = w["pid"][cpu]
        core = seg.cb(cpu, "core")
        if core < 0 and pid:
            # A sleeping CPU said where it went to sleep (smpd.machine.hotpath), and a process
            # asleep runs nowhere else; /proc (~37 us a CPU) for one awake, or that could not say.
            asleep = w["sleeping"][cpu] and w["sleep_core"][cpu] < 2**31  # not sched_getcpu()'s -1
            core = w["sleep_core"][cpu] if asleep else last_core(pid)
        m = map_of(cpu)
        md = None
        if not m.boot.monitors_thread_info:  # a pre-fix kernel has no struct mwait_cpu_dead: None
            md = m.mwait_cpu_dead_addr(cpu)
            page = (md - L.PHYS_BASE) // L.PAGE
            if (m.gen, page) not in own:
                own[m.gen, page] = image.is_own_page(seg, m, page)
            md = _words(md, seg.mem_u32(md), seg.mem_u32(md + 4), not own[m.gen, page])
        line = seg.geo.line_addr(w["mon_line"][cpu]) if w["mon_armed"][cpu] else None
        out.append({
            **brief, "pid": pid, "core": core, "wakeups": {k: w[f][cpu] for k, f in _WAKEUPS.items()},
            "mwait_entries": w["mwait_entries"][cpu], "init": w["init_count"][cpu], "sipi": w["sipi_count"][cpu],
            "mwait_cpu_dead": md,
            "monitor": {"armed": bool(w["mon_armed"][cpu]), "addr": line,
                        "symbol": m.symbol(line) if line is not None else None},
        })
    return out


def status_snapshot(seg: Segment, brief: bool = False, only: list[int] | None = None) -> dict:
    """Everything `smpd status` shows, read from the observation plane (and /proc for cores).

    ``brief``: per CPU only its number, state, hotplug state, generation and, when one is not 0,
    its interrupt counts (what the view of a machine with many CPUs shows): a host process lookup
    per CPU (its core) and the memory map's symbols made a 4096-CPU status take seconds.
    ``only``: the CPUs listed, in that order (the machine's counts are still of all of them)."""
    geo = seg.geo
    now = time.monotonic_ns()
    gens = Generations(seg)
    current = gens.current()
    map_of = _MapOf(seg, gens, current)
    every = _brief_all(seg, map_of, range(geo.ncpus), quiet_irqs=not brief)
    cpus = every if only is None else [every[c] for c in only]
    if not brief:
        cpus = _full_all(seg, map_of, cpus)
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
