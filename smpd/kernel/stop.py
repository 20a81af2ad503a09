"""Stopping the other CPUs, as the kernel's shutdown paths do it (arch/x86/kernel/smp.c,
smpboot.c, crash.c), run by the CPU that shuts down (``this_cpu``; smpd's coordinator does
the work, and stands in for CPU 0 when CPU 0 is one of the others).

    native_stop_other_cpus()   kexec (machine_shutdown()) and panic() without a crash kernel
                               (smp_send_stop()):
        if (kexec_in_progress) smp_kick_mwait_play_dead();     6.5, 6.6: the kick comes first
        REBOOT vector to the other online CPUs -> stop_this_cpu() -> HLT; wait up to 1 s
        6.5: if (smp_park_other_cpus_in_init()) goto done;     INIT to every present CPU booted once
        the NMI fallback (smp_stop_nmi_callback()) for the CPUs that did not stop; wait again
    crash_smp_send_stop()      kdump: NMI to the other online CPUs; no kick, no INIT

smp_park_other_cpus_in_init() runs only on the boot CPU (b1472a60a584): INIT to the boot
CPU resets the whole machine. ``boot_cpu_check=False`` drops that check ([kernel]
init_only_from_boot_cpu = false, 45e34c8af58f's behaviour before it): a panic on another
CPU then resets the machine. (smpd stops at that INIT; upstream goes on to INIT the rest,
which changes nothing once the machine resets.)
"""

from __future__ import annotations

from typing import Callable, Iterable

from smpd import cpulist
from smpd.kernel.kick import smp_kick_mwait_play_dead
from smpd.kernel.memmap import MemoryMap
from smpd.kernel.timeline import Timeline
from smpd.machine import layout as L

STOP_OTHER_CPUS_S = 1.0  # native_stop_other_cpus(): "Don't wait longer than a second"


class StopOtherCpus:
    """One shutdown's stop of the other CPUs. ``cpus``: the emulated CPUs (1..N-1), ``alive_of``:
    those of some CPUs whose process runs, ``inject(phase)``: the scenario's injections at a phase."""

    def __init__(self, port, t: Timeline, old: MemoryMap, cpus: list[int],
                 alive_of: Callable[[Iterable[int]], set[int]], inject: Callable[[str], None], this_cpu: int = 0,
                 boot_cpu_check: bool = True):
        self.c, self.seg, self.t, self.old = port, port.seg, t, old
        self.cpus, self.alive_of, self.inject = cpus, alive_of, inject
        self.this_cpu, self.boot_cpu_check = this_cpu, boot_cpu_check
        self.kick: dict | None = None  # smp_kick_mwait_play_dead()'s result, when it ran
        self.parked_in_init = False  # smp_park_other_cpus_in_init() sent its INITs
        self.not_in_init: list[int] = []  # ... to none of these: this kernel never started them (maxcpus)
        self.init_to_boot_cpu = False  # ... and one of them reached the boot CPU: the machine reset

    def log(self, what: str, kind: str = "note") -> None:
        self.t.add(0, what, None, kind)

    def others(self, online: list[int]) -> list[int]:
        """The other online CPUs as the kernel names them: CPU 0 is one when this is not CPU 0."""
        return sorted(([0] if self.this_cpu else []) + [c for c in online if c != self.this_cpu])

    def native_stop_other_cpus(self, online: list[int], flavour: str, kexec_in_progress: bool = True) -> None:
        self.inject("before-kick")
        if flavour != "pre-fix" and kexec_in_progress:  # if (kexec_in_progress) smp_kick_mwait_play_dead();
            with self.t.phase("smp_kick_mwait_play_dead()"):
                self.kick = self.smp_kick_mwait_play_dead(lambda: self.inject("during-kick"))
        else:
            self.inject("during-kick")
        self.inject("after-kick")
        if flavour == "6.5":
            with self.t.phase("REBOOT_VECTOR to the other online CPUs"):
                missing = self.stop_online(online, "REBOOT vector", "stop_other_cpus()", nmi_fallback=False)
            with self.t.phase("smp_park_other_cpus_in_init()"):
                if self.smp_park_other_cpus_in_init():
                    return  # goto done: INIT parking replaces the NMI fallback
            if missing:
                with self.t.phase("NMI to the CPUs that did not stop"):
                    self.nmi_shootdown(missing, "stop_other_cpus()")
            return
        with self.t.phase("REBOOT_VECTOR to the other online CPUs; NMI if they do not stop"):
            self.stop_online(online, "REBOOT vector", "stop_other_cpus()")

    def crash_smp_send_stop(self, online: list[int]) -> None:
        """kdump: the panicking CPU NMIs the others (nmi_shootdown_cpus()); kexec_in_progress is false:
        no kick, no INIT. (The all-but-self shorthand also reaches parked siblings when every present
        CPU was booted once, as with nosmt; they halt in crash_nmi_callback(), in the still intact old
        kernel, which changes no outcome: smpd leaves them parked.)"""
        for phase in ("before-kick", "during-kick", "after-kick"):
            self.inject(phase)
        self.stop_online(online, "NMI", "crash_smp_send_stop()", nmi_fallback=False, cmd=L.Ipi.NMI_STOP)

    def stop_online(self, online: list[int], vector: str, who: str, nmi_fallback: bool = True,
                    cmd: L.Ipi = L.Ipi.REBOOT) -> list[int]:
        """The other online CPUs stop (stop_this_cpu(): offline, APIC off, HLT); wait up to 1 s, then
        the NMI fallback for those that did not (upstream then waits 10 ms, or forever with wait=1,
        as machine_shutdown() asks; every wait here is bounded: 1 s). Returns the CPUs that did not stop."""
        targets = [c for c in online if c != self.this_cpu]
        if not self.others(online):
            self.log(f"{who}: no other CPU online")
            return []
        acked, missing = self.c.ipi_wait(targets, cmd, STOP_OTHER_CPUS_S)
        where = "crash_nmi_callback() HLT" if cmd == L.Ipi.NMI_STOP else "stop_this_cpu() HLT"
        msg = (f"{who}: {vector} to CPU {cpulist.format_list(self.others(online))}; "
               f"{len(acked) + (1 if self.this_cpu else 0)} in {where}")
        if self.this_cpu:
            msg += " (CPU 0 counted: the coordinator stands in for it)"
        self.log(msg + (f"; CPU {cpulist.format_list(missing)} did not stop" if missing else ""))
        if missing and nmi_fallback:
            missing = self.nmi_shootdown(missing, who)
        return missing

    def nmi_shootdown(self, cpus: list[int], who: str) -> list[int]:
        acked, missing = self.c.ipi_wait(cpus, L.Ipi.NMI_STOP, STOP_OTHER_CPUS_S)
        self.log(f"{who}: the NMI fallback (smp_stop_nmi_callback()) stopped {len(acked)} of CPU "
                 f"{cpulist.format_list(cpus)}"
                 + (f"; CPU {cpulist.format_list(missing)} did not stop" if missing else ""))
        return missing

    def smp_kick_mwait_play_dead(self, during) -> dict:
        """The kernel's kick (smpd.kernel.kick) over the present-but-offline CPUs."""
        present_offline = [c for c in self.cpus if self.seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]
        delay_ns, rounds = self.c.kick_params()
        kick = smp_kick_mwait_play_dead(self.seg, self.c.bus, self.old, present_offline, delay_ns, rounds, during,
                                        self.log)
        per, stuck = kick["cpus"], kick["stuck"]
        if per:
            self.log(f"smp_kick_mwait_play_dead(): kicked {len(per)} CPUs in {kick['total_ns'] / 1e3:.0f} us; "
                     f"{len(per) - len(stuck)} acknowledged"
                     + (f", CPU {cpulist.format_list(stuck)} stuck" if stuck else ""))
        else:
            self.log("smp_kick_mwait_play_dead(): no CPU sits in mwait_play_dead()")
        return kick

    def smp_park_other_cpus_in_init(self) -> bool:
        """6.5: INIT to every other present CPU this kernel booted once, offline ones included
        (3f874c9b2aae; 45e34c8af58f as first merged sent it to every present CPU): wait-for-SIPI
        holds NMI and SMI off and turns a broadcast MCE into a machine shutdown. Only without a special wakeup
        method (none here), and only on the boot CPU (b1472a60a584); False: not possible here."""
        if self.this_cpu and self.boot_cpu_check:
            self.log(f"smp_park_other_cpus_in_init(): runs on CPU {self.this_cpu}, not the boot CPU: INIT to "
                     f"CPU 0 would reset the machine, so no CPU is parked in INIT (b1472a60a584)")
            return False
        if self.this_cpu:  # for_each_present_cpu(): CPU 0 comes first, and its INIT resets everything
            self.init_to_boot_cpu = True
            self.log(f"smp_park_other_cpus_in_init(): on CPU {self.this_cpu}, INIT to CPU 0, the boot CPU: "
                     f"the whole machine resets (45e34c8af58f without b1472a60a584)", "machine_reset")
            return True
        # Only CPUs this kernel booted once (3f874c9b2aae, for 6.5.y): INIT to an APIC it never
        # started (maxcpus here) is not safe -- the fix for an APIC ID that was never valid.
        alive = self.alive_of(self.cpus)
        targets = [c for c in self.cpus if c in alive and self.old.boot.started(c)]
        self.not_in_init = [c for c in self.cpus if c in alive and c not in targets]
        _, missing = self.c.ipi_wait(targets, L.Ipi.INIT, STOP_OTHER_CPUS_S)
        self.parked_in_init = True
        self.log(f"smp_park_other_cpus_in_init(): INIT to CPU {cpulist.format_list(targets) or 'none'}"
                 + (f"; CPU {cpulist.format_list(missing)} did not reach wait-for-SIPI" if missing else
                    "; all in wait-for-SIPI"))
        return True
