"""The kexec sequence, run by the coordinator (CPU 0, the kexec CPU). DESIGN §1 and §5.

    1. native_stop_other_cpus(), as the running kernel's flavour has it:
         6.5, 6.6   if (kexec_in_progress) smp_kick_mwait_play_dead();   (the kick comes first)
         all        REBOOT vector to the other online CPUs -> stop_this_cpu() -> HLT; wait 1 s
         6.5        smp_park_other_cpus_in_init(): INIT to every other present CPU it booted, from the
                    boot CPU only (b1472a60a584), when no special wakeup method exists; then done
         all        else the NMI fallback for those that did not stop (smpd.kernel.stop)
       kdump instead: crash_smp_send_stop() NMIs the online CPUs; no kick, no INIT
    2. injections                 NMI/MCE/SMI at before-kick, during-kick, after-kick,
                                  during-copy, after-copy
    3. the copy                   relocate_kernel(): the new kernel's segments to where the
                                  loader placed them (smpd.kernel.memmap), and nothing else;
                                  a crash kernel was loaded at boot: no copy
    4. the new kernel             decompresses, clears its BSS, builds its page tables and
                                  makes its early allocations, each a bus write to addresses
                                  from its own memory map; then INIT/SIPI to each CPU it
                                  starts (boot parameters: nosmt re-parks the siblings,
                                  maxcpus leaves CPUs alone); then it verifies its memory
    5. the outcome                smpd.kernel.outcome.classify(), from a snapshot

Every wait is bounded; a CPU process that dies is reported (CPU_LOST), never waited for.
The coordinator is reached only through ``Port`` (the operations this needs).
"""

from __future__ import annotations

import random
import time
from typing import Iterable, Protocol

from smpd import cpulist
from smpd.kernel import boot as boot_mod, generations as gens_mod
from smpd.kernel.generations import Generations
from smpd.kernel.memmap import Boot, MemoryMap, Region, kexec_load
from smpd.kernel.observe import Observer
from smpd.kernel.relocate import Relocation
from smpd.kernel.outcome import OUTCOMES, CpuFacts, Snapshot, classify, explain
from smpd.kernel.scenario import Scenario, parse_boot
from smpd.kernel.stop import STOP_OTHER_CPUS_S, StopOtherCpus
from smpd.kernel.timeline import Timeline
from smpd.machine import layout as L
from smpd.machine.mailbox import Then

__all__ = ["Kexec", "Port", "OUTCOMES"]

SETTLE_S = 2.0  # how long the CPUs get to finish what a write or an interrupt started
IRQ_TAKEN_S = 1.0  # how long an injected signal gets to be taken (or held)
# Where CPU 0 is, at each phase a broadcast MCE finds it with #MC off (mce_reaches_kexec_cpu)
MCE_OFF_ON_KEXEC_CPU = {"during-copy": "in relocate_kernel() (its copy; a crash kernel has none)",
                        "after-copy": "in purgatory or the new kernel before its mcheck_cpu_init()"}
BOOT_IPI_S = 2.0  # INIT/SIPI acknowledgement budget when the new kernel starts the APs


class Port(Protocol):
    """What the kexec needs of the coordinator (smpd.daemon.supervisor implements it)."""

    seg: object
    bus: object
    signals: dict[str, int]  # the host signal each interrupt kind is sent as

    def ipi_wait(self, cpus: list[int], cmd: L.Ipi, timeout_s: float,
                 then: Then = ()) -> tuple[dict[int, int], list[int]]: ...
    def cpu_alive(self, cpu: int) -> bool: ...
    def cpus_alive(self, cpus: Iterable[int]) -> set[int]: ...  # those of cpus whose process lives (asked together)
    def cpu_process(self, cpu: int): ...  # pid and exitcode of its process
    def send_interrupt(self, cpu: int, kind: str) -> None: ...
    def kick_params(self) -> tuple[int, int]: ...  # (delay ns, rounds)


class Kexec:
    def __init__(self, port: Port, scenario: Scenario, brief: bool = False):
        self.c = port
        # ``brief``: the report without what a soak trial's record leaves out (each CPU's report and
        # the timeline, ~7 ms of a 64-CPU kexec's ~35), which replaying the trial shows. Every check
        # and the outcome are the same.
        self.brief = brief
        self.seg, self.bus = port.seg, port.bus
        self.s = scenario
        self.gens = Generations(self.seg)
        self.obs = Observer(port, self.gens)  # what it reads back about each CPU
        self.rng = random.Random(scenario.seed)
        self.t = Timeline()
        self.cpus = list(range(1, self.seg.geo.ncpus))
        self.stop: StopOtherCpus | None = None  # native_stop_other_cpus() or crash_smp_send_stop()
        self.not_taken: dict[int, str] = {}
        self.boot_missing: list[int] = []
        self.left_behind: list[int] = []
        self.smm_hang = ""
        self.mce_on_kexec_cpu = ""  # the phase at which a broadcast MCE reached CPU 0 with #MC off
        self.writes: Relocation | None = None  # the copy and the new kernel's own writes
        self.old: MemoryMap | None = None
        self.new: MemoryMap | None = None

    # -- helpers -----------------------------------------------------------------

    def log(self, what: str, kind: str = "note", ns: int | None = None) -> None:
        self.t.add(0, what, ns, kind)

    def alive_of(self, cpus: Iterable[int]) -> set[int]:
        return self.obs.alive_of(cpus)

    # -- the sequence ----------------------------------------------------------

    def run(self) -> dict:
        seg, s = self.seg, self.s
        t0 = time.monotonic_ns()
        self.old = self.gens.current()
        flavour = s.kernel or self.old.boot.flavour
        params = parse_boot(s.boot, seg.geo.ncpus, self.old.boot, seg.hdr("seed"))
        new_boot = Boot(s.into or flavour, nosmt=params.nosmt, maxcpus=params.maxcpus, kaslr=params.kaslr,
                        crash=s.crash)
        alive = self.alive_of(self.cpus)
        online = [c for c in self.cpus if seg.cb(c, "hotplug") == L.Hotplug.ONLINE and c in alive]
        offline = [c for c in self.cpus if c not in online]
        if flavour != self.old.boot.flavour:
            self.become(flavour)  # first: the kexec below is the one of the kernel now running, as its report says
        self.log(f"{'kdump' if s.crash else 'kexec'}: generation {self.old.gen} ({self.old.boot.text()}) -> "
                 f"{self.old.gen + 1} ({new_boot.text()}); order {s.order}, seed {s.seed}; offline CPUs "
                 f"{cpulist.format_list(offline) or 'none'}")
        self.new = self.obs.new = kexec_load(self.old, new_boot)
        self.writes = Relocation(seg, self.bus, self.gens, self.new, s.order, self.rng, self.log)
        self.marks = self.t.mark_start(seg, self.cpus)
        self.stop = StopOtherCpus(self.c, self.t, self.old, self.cpus, self.alive_of, self.inject)
        if s.crash:
            with self.t.phase("__crash_kexec() -> native_machine_crash_shutdown() -> crash_smp_send_stop()"):
                self.stop.crash_smp_send_stop(online)
            with self.t.phase("machine_kexec(): into the crash kernel, loaded at boot (no copy)"):
                self.writes.copy(lambda: self.inject("during-copy"), s.crash)
        else:
            with self.t.phase("kernel_kexec() -> machine_shutdown() -> native_stop_other_cpus()"):
                self.stop.native_stop_other_cpus(online, flavour)
            with self.t.phase("machine_kexec() -> relocate_kernel(): the copy"):
                self.writes.copy(lambda: self.inject("during-copy"), s.crash)
        self.inject("after-copy")
        with self.t.phase(f"generation {self.new.gen}'s early boot: decompress, BSS, page tables, memblock, slab"):
            self.writes.new_kernel_boot()
        with self.t.phase("smpd: the CPUs settle", "smpd"):
            unsettled = self.settle()
        corruption: list[dict] = []
        if not self.machine_ended():
            with self.t.phase("smpd: check the new kernel's memory", "smpd"):
                corruption = self.writes.verify()  # before the APs run and write their own per-CPU data
            with self.t.phase(f"generation {self.new.gen}: smp_init() -> INIT, SIPI to each AP"):
                self.start_aps()
        if not self.brief:
            self.t.merge_cpus(seg, self.marks, self.gens)
            self.t.mark_machine_end()
        snap = self.snapshot(flavour, corruption, unsettled)
        v = classify(snap)
        report = self.report(v, snap, corruption)
        report["duration_ms"] = (time.monotonic_ns() - t0) / 1e6
        return report

    def become(self, flavour: str) -> None:
        """`smpd kexec --kernel F`: the running generation is of flavour F from now on. Its parked
        CPUs start mwait_play_dead() over (REPARK), so that they run F's entry (the fix's kernels
        set status and control to CPUDEAD_MWAIT_WAIT) and arm MONITOR where F's loop does."""
        old = self.old
        b = old.boot
        gens_mod.record(self.seg, MemoryMap.build(old.gen, Boot(flavour, b.nosmt, b.maxcpus, b.kaslr, b.crash),
                                                  old.sizes, old.regions[Region.TEXT], old.segments,
                                                  old.placement))
        self.old = self.gens.current()
        alive = self.alive_of(self.cpus)
        parked = [c for c in self.cpus if self.seg.cb(c, "state") == L.ExecState.MWAIT and c in alive
                  and self.seg.cb(c, "cpu_gen") == old.gen]
        _, missing = self.c.ipi_wait(parked, L.Ipi.REPARK, STOP_OTHER_CPUS_S)
        self.log(f"the running kernel is {flavour}: offline CPUs MONITOR "
                 + ("their idle thread_info->flags line" if flavour == "pre-fix" else "their mwait_cpu_dead line")
                 + (f" (CPU {cpulist.format_list(missing)} did not re-park)" if missing else ""))

    def inject(self, phase: str, stray: bool = False) -> None:
        """The scenario's injections at ``phase``; ``stray``: `smpd inject`, outside any kexec."""
        for inj in self.s.at(phase):
            alive = self.alive_of(inj.cpus)
            targets = [c for c in inj.cpus if c in alive]
            before = {c: self.obs.irq_seen(c) for c in targets}
            sent = time.monotonic_ns()  # the line goes before the CPUs' "taken": they follow it
            for _ in range(inj.count):
                for cpu in targets:
                    self.c.send_interrupt(cpu, inj.kind)
            self.log((f"stray {inj.kind.upper()} x{inj.count} to CPU {cpulist.format_list(targets)}, now "
                      f"(no kexec runs)") if stray else
                     (f"inject {inj.spec()} = {inj.kind.upper()} x{inj.count} to CPU "
                      f"{cpulist.format_list(targets)}"), "inject", sent)
            if inj.kind == "smi":
                self.smm_rendezvous(phase)
            if inj.kind == "mce" and inj.target == "all" and phase in MCE_OFF_ON_KEXEC_CPU and not stray:
                self.mce_reaches_kexec_cpu(phase, sent)
            with self.t.phase(f"smpd: until the {inj.kind.upper()} is taken or held", "smpd"):
                waiting, merged = self.until_taken(before, inj.kind, inj.count)
            if merged:
                self.log(f"{inj.kind.upper()} x{inj.count} to CPU {cpulist.format_list(sorted(merged))} came "
                         f"as fewer: signals that reached the CPU's process together were taken as one")
            for cpu in waiting:
                note = self.obs.host_note(cpu)
                self.not_taken[cpu] = f"{inj.kind.upper()} at {phase} not taken within {IRQ_TAKEN_S:.0f} s" + \
                    (f": {note}" if note else "")

    def mce_reaches_kexec_cpu(self, phase: str, sent: int) -> None:
        """A broadcast MCE reaches every CPU, CPU 0 too (the kexec CPU here: smpd kexecs from CPU 0,
        a kdump from the CPU that panicked). #MC cannot be taken there from machine_kexec() on:
        native_idt_invalidate() leaves an IDT of limit 0 (#MC -> #GP -> #DF -> triple fault), then
        relocate_kernel()'s identity_mapped loads CR4 with PAE (and LA57) only, CR4.MCE clear, and
        the new kernel sets #MC up only in mcheck_cpu_init() (head_64.S: a machine check before
        that crashes the system whatever CR4.MCE says). Either way the processor enters shutdown
        (SDM), as for a triple fault, and the platform normally resets: the new kernel never runs,
        whatever the kernel's flavour did with the other CPUs. (Before machine_kexec(), #MC is taken
        as ever: smpd's earlier phases leave CPU 0 alone.)"""
        if not self.mce_on_kexec_cpu:
            self.mce_on_kexec_cpu = phase
            self.log(f"the broadcast MCE reaches CPU 0 too, {MCE_OFF_ON_KEXEC_CPU[phase]}, where #MC cannot "
                     f"be taken: shutdown", "mce_shutdown", sent)  # (at once: the APs' come after)

    def smm_rendezvous(self, phase: str) -> None:
        """An SMI: SMM waits for every CPU to join; on firmware that hangs then, a CPU in INIT
        ([firmware] smm_hangs_with_cpus_in_init) never comes, and the machine hangs."""
        if not self.seg.hdr("smm_hangs_in_init") or self.smm_hang:
            return
        in_init = [c for c in self.cpus if self.seg.cb(c, "state") == L.ExecState.WAIT_FOR_SIPI]
        if in_init:
            self.smm_hang = f"the SMI injected at {phase}"
            self.log(f"SMM: waits for CPU {cpulist.format_list(in_init)} (in INIT) forever: the machine hangs",
                     "smm_hang")

    def until_taken(self, before: dict[int, int], kind: str, count: int = 1) -> tuple[set[int], list[int]]:
        """Wait (IRQ_TAKEN_S at most) until each CPU took or held the ``count`` interrupts of
        ``kind`` sent since ``before``, and is done with them: the handlers and the return into the
        interrupted code ran (its resume checks read the memory the copy is writing) and the CPU
        waits again (a dead CPU is not waited for). An interrupt injected at a phase is so handled
        at that phase, whatever the host's scheduling: the copy goes on after.

        Signals of a kind that reach a CPU process together may be taken as one (CPython runs
        a handler once for them: smpd.machine.core), so fewer than ``count`` may ever be taken: a
        CPU that took some is also done once it is idle and ``Observer.irq_settled`` (none still
        queued, then its process asleep in its wait, which it re-enters only after taking what
        it dequeued). Without that, each such injection waited out IRQ_TAKEN_S (3 of 100 soak
        trials, 1 s each). Returns (the CPUs that took none, those done with fewer than
        ``count``)."""
        deadline = time.monotonic() + IRQ_TAKEN_S
        seen, seg = self.obs.irq_seen, self.seg
        waiting = set(before)
        merged: list[int] = []

        def idle(c: int) -> bool:
            return not seg.cb(c, "busy") and not seg.wake_raised(c)

        def done(c: int) -> bool:
            got = seen(c) - before[c]
            if got >= count:
                return idle(c)
            # Idle first, from the segment: irq_settled() reads three /proc files, ~9 ms for 63 CPUs
            # here, a round of this loop while those CPUs still take their interrupts on the same cores.
            if got > 0 and idle(c) and self.obs.irq_settled(c, kind) and idle(c) and seen(c) - before[c] == got:
                merged.append(c)
                return True
            return False

        while waiting and time.monotonic() < deadline:
            waiting = {c for c in self.alive_of(waiting) if not done(c)}
            if waiting:
                time.sleep(0.0002)
        return {c for c in self.alive_of(waiting) if seen(c) == before[c]}, merged

    def settle(self) -> list[int]:
        """Wait (bounded) until no CPU is still acting on a wake-up: two scans in a row with
        every CPU idle and no activity in between."""
        deadline = time.monotonic() + SETTLE_S
        prev = None
        while True:
            idle, acts = [], []
            alive = self.alive_of(self.cpus)
            for cpu in self.cpus:
                if cpu not in alive:
                    continue
                idle.append(not self.seg.cb(cpu, "busy") and not self.seg.wake_raised(cpu))
                acts.append(self.seg.cb(cpu, "activity"))
            if all(idle):
                if acts == prev:
                    return []
                prev = acts
            else:
                prev = None
            if time.monotonic() > deadline:
                alive = self.alive_of(self.cpus)
                return [c for c in self.cpus if c in alive and (self.seg.cb(c, "busy") or self.seg.wake_raised(c))]
            time.sleep(0.0005)

    def machine_ended(self) -> bool:
        """A triple fault, an MCE shutdown or a hung SMM ends the machine before the APs start."""
        return bool(self.smm_hang or self.mce_on_kexec_cpu) or any(self.seg.cb(c, "fault") in L.ENDING_FAULTS
                                                                  for c in self.cpus)

    def start_aps(self) -> None:
        """The new kernel starts each CPU its boot parameters keep, with INIT, then SIPI; nosmt
        siblings then park themselves in mwait_play_dead(), in the new kernel's memory."""
        live = self.alive_of(self.cpus)
        alive = [c for c in self.cpus if c in live and self.seg.cb(c, "state") != L.ExecState.SHUTDOWN]
        r = boot_mod.start_aps(self.c, self.new, alive, BOOT_IPI_S)
        self.boot_missing, self.left_behind = r["missing"], r["left_behind"]
        boot = self.new.boot
        self.log(f"generation {self.new.gen}: INIT/SIPI to CPU {cpulist.format_list(sorted(r['messages'])) or 'none'}; "
                 f"{len(r['started'])} up"
                 + (f", SMT siblings CPU {cpulist.format_list(r['parked'])} parked in mwait_play_dead() again"
                    if r["parked"] else "")
                 + (f"; CPU {cpulist.format_list(self.left_behind)} not started ("
                    + ("kdump: nr_cpus=1" if boot.crash else f"maxcpus={boot.maxcpus}") + ")" if self.left_behind else "")
                 + (f"; CPU {cpulist.format_list(self.boot_missing)} did not answer" if self.boot_missing else "")
                 + (f"; {boot_mod.describe_ignored(r['sipi_ignored'])} did not take the SIPI" if r["sipi_ignored"] else ""))

    # -- the outcome -----------------------------------------------------------

    def cpu_facts(self, cpu: int, alive: bool | None = None) -> CpuFacts:
        return self.obs.cpu_facts(cpu, cpu in self.not_taken or bool(self.kick and cpu in self.kick["stuck"]), alive)

    @property
    def kick(self) -> dict | None:
        return self.stop.kick if self.stop else None

    def snapshot(self, flavour: str, corruption: list[dict], unsettled: list[int]) -> Snapshot:
        alive = self.alive_of(self.cpus)
        return Snapshot(kernel=flavour, new_gen=self.new.gen,
                        cpus=tuple(self.cpu_facts(c, c in alive) for c in self.cpus),
                        crash=self.s.crash, injected=bool(self.s.injections), kick=self.kick,
                        parked_in_init=self.stop.parked_in_init, not_in_init=tuple(self.stop.not_in_init),
                        corruption=tuple(corruption), smm_hang=self.smm_hang,
                        mce_on_kexec_cpu=self.mce_on_kexec_cpu,
                        not_taken=dict(self.not_taken), unsettled=tuple(unsettled),
                        boot_missing=tuple(self.boot_missing), left_behind=tuple(self.left_behind),
                        waking=tuple(self.writes.waking))

    def report(self, v, snap: Snapshot, corruption: list[dict]) -> dict:
        s = self.s
        return {
            "outcome": v.outcome, "evidence": explain(v), "notes": list(v.notes),
            "near_misses": list(v.near_misses), "host_faults": list(v.host_faults),
            "kernel": snap.kernel, "into": self.new.boot.flavour, "crash": s.crash,
            "park": {"pre-fix": "none", "6.5": "init", "6.6": "hlt"}[snap.kernel],
            "order": s.order, "seed": s.seed, "scenario": s.to_json(),
            "injections": [dict(i, cpus=cpulist.format_list(i["cpus"])) for i in s.to_json()["injections"]],
            "kick": self.kick, "copy": dict(self.writes.copy_info, woke=self.writes.copy_woke),
            "boot_woke": self.writes.boot_woke, "waking_writes": self.writes.waking,
            "generation": {"old": self.old.gen, "new": self.new.gen},
            "memory": {"old": self.old.summary(), "new": self.new.summary()},
            "corruption": corruption[:16], "corrupted_words": len(corruption),
            **({} if self.brief else {"cpus": [self.obs.cpu_report(c) for c in self.cpus], **self.t.record()}),
        }
