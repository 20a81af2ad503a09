"""panic() on one CPU with no crash kernel loaded (kernel/panic.c): __crash_kexec() has
nothing to run and returns, and smp_send_stop() stops the other CPUs through
native_stop_other_cpus() (smpd.kernel.stop) from the panicking CPU -- which need not be
the boot CPU. kexec_in_progress is false: no kick. The 6.5 kernel then tries
smp_park_other_cpus_in_init(): from a CPU other than CPU 0 it would send INIT to the boot
CPU, which resets the whole machine; b1472a60a584 (reported by Baokun Li, for exactly this
crash case) makes it refuse, and the CPUs stay in HLT. Nothing is copied and nothing is
written: the parked CPUs stay in mwait_play_dead(), and the machine stays in panic()
(panic_timeout=0) until it is reset.
"""

from __future__ import annotations

import time

from smpd import cpulist
from smpd.kernel.generations import Generations
from smpd.kernel.observe import Observer
from smpd.kernel.outcome import Snapshot, classify, explain
from smpd.kernel.stop import StopOtherCpus
from smpd.kernel.timeline import Timeline
from smpd.machine import layout as L


class Panic:
    """``cpu``: the CPU that panics (0 is the boot CPU); ``boot_cpu_check``: b1472a60a584 applied."""

    def __init__(self, port, cpu: int, boot_cpu_check: bool = True):
        self.c, self.seg, self.cpu = port, port.seg, cpu
        self.gens = Generations(self.seg)
        self.obs = Observer(port, self.gens)
        self.t = Timeline()
        self.cpus = list(range(1, self.seg.geo.ncpus))
        self.boot_cpu_check = boot_cpu_check

    def run(self) -> dict:
        seg, t0 = self.seg, time.monotonic_ns()
        m = self.gens.current()
        flavour = m.boot.flavour
        alive = self.obs.alive_of(self.cpus)
        online = [c for c in self.cpus if seg.cb(c, "hotplug") == L.Hotplug.ONLINE and c in alive]
        offline = [c for c in self.cpus if c not in online]
        stop = StopOtherCpus(self.c, self.t, m, self.cpus, self.obs.alive_of, lambda phase: None, self.cpu,
                             self.boot_cpu_check)
        marks = self.t.mark_start(seg, self.cpus)
        self.t.add(0, f"panic() on CPU {self.cpu}: generation {m.gen} ({m.boot.text()}), no crash kernel loaded; "
                      f"offline CPUs {cpulist.format_list(offline) or 'none'}")
        with self.t.phase("panic() -> smp_send_stop() -> native_stop_other_cpus()"):
            stop.native_stop_other_cpus(online, flavour, kexec_in_progress=False)
        self.t.merge_cpus(seg, marks, self.gens)
        self.t.mark_machine_end()
        alive = self.obs.alive_of(self.cpus)
        snap = Snapshot(kernel=flavour, new_gen=m.gen,
                        cpus=tuple(self.obs.cpu_facts(c, alive=c in alive) for c in self.cpus),
                        parked_in_init=stop.parked_in_init, panic_cpu=self.cpu,
                        init_to_boot_cpu=stop.init_to_boot_cpu)
        v = classify(snap)
        return {"outcome": v.outcome, "evidence": explain(v), "notes": list(v.notes),
                "host_faults": list(v.host_faults), "kernel": flavour, "panic_cpu": self.cpu,
                "boot_cpu_check": self.boot_cpu_check, "generation": m.gen,
                "cpus": [self.obs.cpu_report(c) for c in self.cpus],
                "duration_ms": (time.monotonic_ns() - t0) / 1e6, **self.t.record()}
