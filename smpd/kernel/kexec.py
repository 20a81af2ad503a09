"""The kexec sequence, run by the coordinator (CPU 0, the kexec CPU). DESIGN.md §5.

    1. stop_other_cpus()          REBOOT IPI to online CPUs -> stop_this_cpu() -> HLT (1 s bound)
    2. park policy                none: nothing (the pre-fix kernel: offline CPUs monitor
                                        their thread_info->flags line)
                                  hlt:  smp_kick_mwait_play_dead()
                                  init: smp_park_other_cpus_in_init()
    3. injections                 NMI/MCE/SMI signals at before-kick, during-kick,
                                  after-kick, during-copy, after-copy
    4. copy                       the new kernel (generation + 1) over the old, through the bus
    5. the new kernel             its early writes to its per-CPU data, then INIT/SIPI of
                                  every CPU not in SHUTDOWN, then verification of its image
    6. the outcome                exactly one of CLEAN, TRIPLE_FAULT, CORRUPTION,
                                  MCE_SHUTDOWN, STUCK, CPU_LOST, with its evidence

Every wait is bounded; a CPU process that dies is reported (CPU_LOST), never waited for.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time

from smpd import cpulist
from smpd.machine import events, layout as L
from smpd.kernel.kick import smp_kick_mwait_play_dead
from smpd.kernel.image import page_image
from smpd.kernel.scenario import Scenario

OUTCOMES = ("CLEAN", "TRIPLE_FAULT", "CORRUPTION", "MCE_SHUTDOWN", "STUCK", "CPU_LOST")
STOP_OTHER_CPUS_S = 1.0  # stop_other_cpus() waits up to 1 s for the REBOOT vector to land
SETTLE_S = 2.0  # how long the CPUs get to finish what a write or an interrupt started
IRQ_TAKEN_S = 1.0  # how long an injected signal gets to be taken (or held)
BOOT_IPI_S = 2.0  # INIT/SIPI acknowledgement budget when the new kernel starts the APs


class Kexec:
    def __init__(self, coord, scenario: Scenario):
        self.c = coord
        self.seg = coord.seg
        self.bus = coord.bus
        self.geo = coord.seg.geo
        self.s = scenario
        self.rng = random.Random(scenario.seed)
        self.t = events.Timeline()
        self.cpus = list(range(1, self.geo.ncpus))
        self.kick: dict | None = None
        self.not_taken: dict[int, str] = {}  # injections a CPU never took, and why
        self.boot_missing: list[int] = []
        self.copy_woke = 0
        self.copy_info: dict = {}

    # -- helpers -----------------------------------------------------------------

    def log(self, what: str) -> None:
        self.t.add(0, what)

    def alive(self, cpu: int) -> bool:
        p = self.c.procs.get(cpu)
        return p is not None and p.is_alive() and self.seg.cb(cpu, "state") != L.ExecState.GONE

    def irq_seen(self, cpu: int) -> int:
        return sum(self.seg.cb(cpu, f"{k}_taken") + self.seg.cb(cpu, f"{k}_held") for k in L.IRQ_KINDS)

    def status_word(self, cpu: int) -> int:
        return self.seg.mem_u32(self.geo.mwait_cpu_dead_addr(cpu) + 4)

    def proc_note(self, cpu: int) -> str:
        p = self.c.procs.get(cpu)
        if p is None or not p.is_alive():
            return "its process is gone"
        try:
            import psutil

            st = psutil.Process(p.pid).status()
        except Exception:  # noqa: BLE001 - a vanished pid is just "gone"
            return "its process is gone"
        return "its process is stopped (SIGSTOP)" if st == "stopped" else f"its process is {st}"

    # -- the sequence ----------------------------------------------------------

    def run(self) -> dict:
        seg, s = self.seg, self.s
        t0 = time.monotonic_ns()
        self.old_gen = seg.hdr("generation")
        self.new_gen = self.old_gen + 1
        self.marks = {cpu: seg.cb(cpu, "ev_head") for cpu in self.cpus}
        online = [c for c in self.cpus if seg.cb(c, "hotplug") == L.Hotplug.ONLINE and self.alive(c)]
        self.offline_at_start = [c for c in self.cpus if c not in online]
        self.log(f"kexec: park={s.park} order={s.order} seed={s.seed}; old kernel generation {self.old_gen}; "
                 f"offline CPUs {cpulist.format_list(self.offline_at_start) or 'none'}")
        if s.park == "none":
            self.become_prefix_kernel()
        self.stop_other_cpus(online)
        self.inject("before-kick")
        if s.park == "hlt":
            self.kick = self.smp_kick_mwait_play_dead(lambda: self.inject("during-kick"))
        elif s.park == "init":
            self.smp_park_other_cpus_in_init(lambda: self.inject("during-kick"))
        else:
            self.inject("during-kick")
        self.inject("after-kick")
        self.copy(lambda: self.inject("during-copy"))
        self.inject("after-copy")
        self.new_kernel_early_writes()
        unsettled = self.settle()
        verdict = self.machine_verdict()
        corruption: list[dict] = []
        if verdict is None:
            self.boot()
            corruption = self.verify()
        self.t.merge_cpus(seg, self.marks)
        report = self.outcome(verdict, corruption, unsettled)
        report["duration_ms"] = (time.monotonic_ns() - t0) / 1e6
        return report

    def become_prefix_kernel(self) -> None:
        """park=none is the kernel before the fix: its offline CPUs MONITOR their idle
        thread_info->flags line. Re-arm every parked CPU under that flavour (a wake-up
        through its current line makes it loop back and MONITOR the other)."""
        self.seg.set_hdr("monitor_target", L.MonitorTarget.THREAD_INFO)
        parked = [c for c in self.offline_at_start
                  if self.seg.cb(c, "state") == L.ExecState.MWAIT and self.alive(c)]
        for cpu in parked:
            md = self.geo.mwait_cpu_dead_addr(cpu)
            self.bus.write(md, struct.pack("<I", self.seg.mem_u32(md)))
        deadline = time.monotonic() + STOP_OTHER_CPUS_S
        want = {c: self.geo.addr_line(self.geo.thread_info_addr(c)) for c in parked}
        while want and time.monotonic() < deadline:
            for cpu, line in list(want.items()):
                if self.seg.cb(cpu, "mon_armed") and self.seg.cb(cpu, "mon_line") == line or not self.alive(cpu):
                    del want[cpu]
            time.sleep(0.0002)
        self.marks = {cpu: self.seg.cb(cpu, "ev_head") for cpu in self.cpus}
        self.log("old kernel is pre-fix: offline CPUs MONITOR their thread_info->flags line"
                 + (f" (CPU {cpulist.format_list(list(want))} did not re-arm)" if want else ""))

    def stop_other_cpus(self, online: list[int]) -> None:
        """REBOOT vector to every other online CPU; each runs stop_this_cpu() into HLT."""
        if not online:
            self.log("stop_other_cpus(): no other CPU online")
            return
        acked, missing = self.c.ipi_wait(online, L.Ipi.REBOOT, STOP_OTHER_CPUS_S)
        self.log(f"stop_other_cpus(): REBOOT to CPU {cpulist.format_list(online)}; "
                 f"{len(acked)} in stop_this_cpu() HLT"
                 + (f", CPU {cpulist.format_list(missing)} did not stop within 1 s" if missing else ""))

    def smp_kick_mwait_play_dead(self, during) -> dict:
        """The kernel's kick (smpd.kick) over the present-but-offline CPUs."""
        present_offline = [c for c in self.cpus if self.seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]
        kick = smp_kick_mwait_play_dead(self.seg, self.bus, present_offline,
                                        self.c.cfg.get("kick", "delay_us") * 1000,
                                        self.c.cfg.get("kick", "rounds"), during, self.log)
        per, stuck = kick["cpus"], kick["stuck"]
        self.log(f"smp_kick_mwait_play_dead(): kicked {len(per)} CPUs in {kick['total_ns'] / 1e3:.0f} us; "
                 f"{len(per) - len(stuck)} acknowledged" + (f", CPU {cpulist.format_list(stuck)} stuck" if stuck else ""))
        return kick

    def smp_park_other_cpus_in_init(self, during) -> None:
        """INIT to every other present CPU, offline ones included: wait-for-SIPI holds
        NMI and SMI off and turns a broadcast MCE into a machine shutdown."""
        targets = [c for c in self.cpus if self.alive(c)]
        half = len(targets) // 2
        missing: list[int] = []
        for n, part in enumerate((targets[:half], targets[half:])):
            if n == 1:  # halfway through the INITs
                during()
            if part:
                _, miss = self.c.ipi_wait(part, L.Ipi.INIT, STOP_OTHER_CPUS_S)
                missing += miss
        self.log(f"smp_park_other_cpus_in_init(): INIT to CPU {cpulist.format_list(targets) or 'none'}"
                 + (f"; CPU {cpulist.format_list(missing)} did not reach wait-for-SIPI" if missing else
                    "; all in wait-for-SIPI"))

    def inject(self, phase: str) -> None:
        for inj in self.s.at(phase):
            sig = self.c.signals[inj.kind]
            targets = [c for c in inj.cpus if self.alive(c)]
            before = {c: self.irq_seen(c) for c in targets}
            for _ in range(inj.count):
                for cpu in targets:
                    try:
                        os.kill(self.c.procs[cpu].pid, sig)
                    except ProcessLookupError:
                        pass
            self.log(f"inject {inj.spec()} at {phase}: {inj.kind.upper()} x{inj.count} to CPU "
                     f"{cpulist.format_list(targets)}")
            deadline = time.monotonic() + IRQ_TAKEN_S
            waiting = set(targets)
            while waiting and time.monotonic() < deadline:
                waiting = {c for c in waiting if self.irq_seen(c) == before[c] and self.alive(c)}
                if waiting:
                    time.sleep(0.0002)
            for cpu in waiting:
                self.not_taken[cpu] = f"{inj.kind.upper()} at {phase} not taken within {IRQ_TAKEN_S:.0f} s: " \
                                      f"{self.proc_note(cpu)}"

    def copy_order(self) -> list[int]:
        pages = list(range(self.geo.npages))
        order = self.s.order
        if order == "random":
            self.rng.shuffle(pages)
        elif order in ("monitored-first", "monitored-last"):
            d, base = self.seg.u16, self.geo.dir_off // L.DIR_ENTRY
            monitored = [p for p in pages
                         if any(d[base + p * L.LINES_PER_PAGE + i] for i in range(L.LINES_PER_PAGE))]
            rest = [p for p in pages if p not in set(monitored)]
            pages = monitored + rest if order == "monitored-first" else rest + monitored
        return pages

    def copy(self, during) -> None:
        """machine_kexec(): the new kernel's image over the old, one page per bus write."""
        pages = self.copy_order()
        self.copy_info = {"pages": len(pages), "first_pages": pages[:8],
                          "order_digest": hashlib.sha256(struct.pack(f"<{len(pages)}I", *pages)).hexdigest()[:16]}
        seed = self.seg.hdr("seed")
        t0 = time.monotonic_ns()
        self.log(f"copy: {len(pages)} pages of generation {self.new_gen}, order {self.s.order}")
        for n, page in enumerate(pages):
            if n == len(pages) // 2:
                during()
            region, index = self.geo.region_of(page)
            self.copy_woke += self.bus.write(L.PHYS_BASE + page * L.PAGE,
                                             page_image(seed, self.new_gen, region, index))
        self.log(f"copy done in {(time.monotonic_ns() - t0) / 1e6:.1f} ms; "
                 f"its writes woke {self.copy_woke} monitors")

    def new_kernel_early_writes(self) -> None:
        """Before it starts the APs, the new kernel initialises its per-CPU data: it writes
        every CPU's thread_info and mwait_cpu_dead lines (with what its image holds)."""
        zeros = bytes(L.LINE)
        woke = 0
        for cpu in range(self.geo.ncpus):
            woke += self.bus.write(self.geo.thread_info_addr(cpu), zeros)
            woke += self.bus.write(self.geo.mwait_cpu_dead_addr(cpu), zeros)
        self.log(f"new kernel: early writes to its per-CPU data woke {woke} monitors")

    def settle(self) -> list[int]:
        """Wait (bounded) until no CPU is still acting on a wake-up: two scans in a row with
        every CPU idle and no activity in between."""
        deadline = time.monotonic() + SETTLE_S
        prev = None
        while True:
            idle, acts = [], []
            for cpu in self.cpus:
                if not self.alive(cpu):
                    continue
                quiet = not self.seg.cb(cpu, "busy") and not self.seg.cb(cpu, "wake")
                idle.append(quiet)
                acts.append(self.seg.cb(cpu, "activity"))
            if all(idle):
                if acts == prev:
                    return []
                prev = acts
            else:
                prev = None
            if time.monotonic() > deadline:
                return [c for c in self.cpus if self.alive(c)
                        and (self.seg.cb(c, "busy") or self.seg.cb(c, "wake"))]
            time.sleep(0.0005)

    def machine_verdict(self) -> str | None:
        """A triple fault or an MCE shutdown ends the machine before the new kernel runs."""
        faults = {self.seg.cb(c, "fault") for c in self.cpus}
        if L.Fault.MCE_SHUTDOWN in faults:
            return "MCE_SHUTDOWN"
        if L.Fault.TRIPLE_FAULT in faults:
            return "TRIPLE_FAULT"
        return None

    def boot(self) -> None:
        """The new kernel starts every CPU that is not in SHUTDOWN with INIT, then SIPI."""
        self.seg.set_hdr("generation", self.new_gen)
        self.seg.set_hdr("monitor_target", L.MonitorTarget.MWAIT_CPU_DEAD)
        targets = [c for c in self.cpus if self.alive(c) and self.seg.cb(c, "state") != L.ExecState.SHUTDOWN]
        _, miss_init = self.c.ipi_wait(targets, L.Ipi.INIT, BOOT_IPI_S)
        started = [c for c in targets if c not in miss_init]
        _, miss_sipi = self.c.ipi_wait(started, L.Ipi.SIPI, BOOT_IPI_S)
        self.boot_missing = miss_init + miss_sipi
        self.log(f"new kernel: INIT/SIPI to CPU {cpulist.format_list(targets) or 'none'}; "
                 f"{len(started) - len(miss_sipi)} online in generation {self.new_gen}"
                 + (f"; CPU {cpulist.format_list(self.boot_missing)} did not answer" if self.boot_missing else ""))

    def verify(self) -> list[dict]:
        """Compare the new kernel's memory with its image; name each differing word."""
        seed = self.seg.hdr("seed")
        geo = self.geo
        bad: list[dict] = []
        for page in range(geo.npages):
            region, index = geo.region_of(page)
            want = page_image(seed, self.new_gen, region, index)
            off = geo.mem_off + page * L.PAGE
            have = self.seg.buf[off:off + L.PAGE]
            if have == want:
                continue
            for w in range(0, L.PAGE, 4):
                if have[w:w + 4] != want[w:w + 4]:
                    addr = L.PHYS_BASE + page * L.PAGE + w
                    bad.append({"addr": addr, "symbol": geo.symbol(addr),
                                "value": struct.unpack_from("<I", have, w)[0],
                                "expected": struct.unpack_from("<I", want, w)[0]})
        self.log("new kernel: image verification " + (f"found {len(bad)} corrupted words" if bad else "clean"))
        return bad

    # -- the outcome -----------------------------------------------------------

    def cpu_report(self, cpu: int) -> dict:
        seg = self.seg
        fault = L.Fault(seg.cb(cpu, "fault"))
        d = {"cpu": cpu, "pid": seg.cb(cpu, "pid"), "state": L.ExecState(seg.cb(cpu, "state")).name,
             "hotplug": L.Hotplug(seg.cb(cpu, "hotplug")).name.lower(), "generation": seg.cb(cpu, "cpu_gen"),
             "fault": fault.name, "stray_stores": seg.cb(cpu, "stray_stores")}
        if fault not in (L.Fault.NONE, L.Fault.MCE_SHUTDOWN):
            page = seg.cb(cpu, "fault_page")
            region, index = self.geo.region_of(page)
            d["fault_page"] = {"page": page, "region": region.name.lower(), "index": index}
            cause, arg = seg.cb(cpu, "fault_cause"), seg.cb(cpu, "fault_cause_arg")
            d["fault_cause"] = events.describe(seg, L.Ev(cause), arg) if cause else None
        if fault == L.Fault.STRAY_STORE:
            d["first_store"] = {"addr": seg.cb(cpu, "fault_addr"), "value": seg.cb(cpu, "fault_value"),
                                "symbol": self.geo.symbol(seg.cb(cpu, "fault_addr"))}
        if not self.alive(cpu):
            d["state"] = "GONE"
        return d

    def outcome(self, verdict: str | None, corruption: list[dict], unsettled: list[int]) -> dict:
        cpus = [self.cpu_report(c) for c in self.cpus]
        by_cpu = {c["cpu"]: c for c in cpus}
        lost = [c for c in self.cpus if not self.alive(c)]
        notes = [f"CPU{c}: {why}" for c, why in sorted(self.not_taken.items())]
        notes += [f"CPU{c} was still acting on a wake-up after {SETTLE_S:.0f} s ({self.proc_note(c)})"
                  for c in unsettled]
        foreign = [c for c in cpus if c["fault"] == "FOREIGN_HALT"]
        notes += [f"CPU{c['cpu']} executed foreign bytes ({c['fault_page']['region']} page "
                  f"{c['fault_page']['index']}) into a halt; INIT recovered it" for c in foreign]
        stuck = self.kick["stuck"] if self.kick else []
        if lost:
            outcome = "CPU_LOST"
            evidence = "; ".join(f"CPU{c} (pid {self.c.procs[c].pid}) died, exit code {self.c.procs[c].exitcode}"
                                 for c in lost) + " - an emulator fault, not an emulated one"
        elif verdict == "MCE_SHUTDOWN":
            outcome = verdict
            who = [c for c in cpus if c["fault"] == "MCE_SHUTDOWN"]
            evidence = (f"MCE reached CPU {cpulist.format_list([c['cpu'] for c in who])} in wait-for-SIPI (INIT): "
                        f"the machine shuts down, loudly, instead of running the old kernel")
        elif verdict == "TRIPLE_FAULT":
            outcome = verdict
            first = min((c for c in self.cpus if self.seg.cb(c, "fault") == L.Fault.TRIPLE_FAULT),
                        key=lambda c: self.seg.cb(c, "fault_ns"))
            r = by_cpu[first]
            evidence = (f"CPU{first} resumed after \"{r['fault_cause']}\" in overwritten memory: "
                        f"{r['fault_page']['region']} page {r['fault_page']['index']} is no longer its kernel's "
                        f"-> triple fault; the platform resets the machine")
        elif corruption or any(c["stray_stores"] for c in cpus):
            outcome = "CORRUPTION"
            writers = [c for c in cpus if c["stray_stores"]]
            w = writers[0] if writers else None
            if w:
                landed = "and it is in the new kernel's image" if corruption else \
                    "(the copy overwrote it later: this time the new image survived)"
                evidence = (f"CPU{w['cpu']} resumed after \"{w['fault_cause']}\", executed foreign bytes of "
                            f"{w['fault_page']['region']} page {w['fault_page']['index']} and stored "
                            f"{w['first_store']['value']:#010x} to {w['first_store']['symbol']} "
                            f"({w['first_store']['addr']:#x}) {landed}")
            else:
                b = corruption[0]
                evidence = f"the new kernel's image differs at {b['symbol']} ({b['addr']:#x})"
        elif stuck:
            outcome = "STUCK"
            cpu = stuck[0]
            st = by_cpu[cpu]["state"]
            evidence = (f"CPU{cpu} never acknowledged the kick ({self.kick['cpus'][cpu]['rounds']} rounds, "
                        f"{self.kick['budget_ns'] / 1e6:.0f} ms): {self.kick['message']}; it is now {st}, "
                        f"{self.proc_note(cpu)}")
            if cpu in self.boot_missing:
                evidence += "; it did not answer the new kernel's INIT/SIPI"
        else:
            outcome = "CLEAN"
            evidence = {"hlt": "every parked CPU acknowledged the kick and halted; writes did not wake them",
                        "init": "every other CPU sat in wait-for-SIPI through the copy",
                        "none": "no parked CPU was woken into overwritten memory"}[self.s.park]
            held = [c for c in self.cpus if any(self.seg.cb(c, f"{k}_held") for k in ("nmi", "smi"))]
            if held and self.s.injections:
                evidence += f"; NMI/SMI held pending on CPU {cpulist.format_list(held)}"
            evidence += f"; the new kernel (generation {self.new_gen}) verified its image"
        assert outcome in OUTCOMES
        return {
            "outcome": outcome, "evidence": evidence, "notes": notes,
            "park": self.s.park, "order": self.s.order, "seed": self.s.seed,
            "scenario": self.s.to_json(),
            "injections": [dict(i, cpus=cpulist.format_list(i["cpus"])) for i in self.s.to_json()["injections"]],
            "kick": self.kick, "copy": dict(self.copy_info, woke=self.copy_woke),
            "generation": {"old": self.old_gen, "new": self.new_gen},
            "corruption": corruption[:16], "corrupted_words": len(corruption),
            "cpus": cpus,
            "timeline": self.t.ordered(),
        }
