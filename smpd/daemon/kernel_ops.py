"""The coordinator's ops that run the kernel on the machine: kexec, chain, panic, the kick
alone, a stray interrupt, a reset (power cycle) and the kick benchmark.

smpd.daemon.handlers binds each request to one of these (arguments checked against the
signatures here); each op refuses a machine that has no kernel left to run it (a kexec
or a panic ended it: `smpd reset` first) or that lost a CPU process.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from smpd import cpulist
from smpd.daemon import soakhold
from smpd.errors import BadInput, CpuLost, HostTooSmall, Timeout
from smpd.kernel import boot as kboot, generations as gens_mod, kick as kick_mod
from smpd.kernel.generations import Generations
from smpd.kernel.kexec import Kexec
from smpd.kernel.panic import Panic
from smpd.kernel.memmap import Boot
from smpd.kernel.scenario import Scenario, flavour, injection, parse_boot, trial_seed
from smpd.kernel.stop import StopOtherCpus
from smpd.machine import layout as L

RESET_ATTEMPTS = 3  # a reset respawns CPUs that died; it tries again if one dies during it
ENDING = ("TRIPLE_FAULT", "MCE_SHUTDOWN", "SMM_HANG", "MACHINE_RESET", "CPU_LOST")  # outcomes after which nothing runs
MAX_CHAIN = 100  # kexecs in one `smpd chain`
VALIDATE_ONLY = 0  # bench_kick's rounds=0: check the targets, kick nothing
# What a reset clears in each CPU's control block once INIT has reached it: the last fault and
# its evidence, the kick's stamp, interrupts pending or held, the generation it ran.
RESET_CLEARED = ("fault", "fault_page", "fault_addr", "fault_value", "fault_cause", "fault_cause_arg", "fault_ns",
                 "fault_gen", "stray_stores", "kick_seen_ns", "nmi_pending", "smi_pending", "mce_pending", "nmi_held",
                 "smi_held", "mce_held", "cpu_gen")
_RESET_CLEARS = L.cb_ranges(RESET_CLEARED)  # as byte ranges, adjacent fields merged


def require_alive(sup, cpus: list[int]) -> None:
    """Refuse (CpuLost) when a CPU of ``cpus`` lost its process."""
    sup.refresh_gone()
    gone = [c for c in cpus if c != 0 and sup.seg.cb(c, "state") == L.ExecState.GONE]
    if gone:
        raise CpuLost(f"CPU {cpulist.format_list(gone)} is GONE (its process died); "
                      f"`smpd reset` gives it a new process")


def ending_faults(sup) -> dict[int, int]:
    """Each CPU's fault that ended the machine (layout.ENDING_FAULTS), so far."""
    return {cpu: f for cpu in range(1, sup.ncpus) if (f := sup.seg.cb(cpu, "fault")) in L.ENDING_FAULTS}


def end_if_faulted(sup, before: dict[int, int], what: str, smm_hang: str = "") -> str | None:
    """After ``what`` (a stray interrupt, a poke) outside a kexec: when it made a CPU fault so that
    the machine ended, or hung SMM (``smm_hang``, a stray SMI's), the machine is ENDED, so that
    nothing after it (a kexec) is blamed for it. Returns how it ended, or None."""
    new = {c: f for c, f in ending_faults(sup).items() if before.get(c) != f}
    if not (new or smm_hang) or sup.seg.hdr("state") == L.MachineState.ENDED:  # (ended before: by what ended it)
        return None
    why = ("SMM_HANG: the firmware waits in SMM for the CPUs in INIT" if smm_hang else
           f"{L.Fault(new[min(new)]).name} on CPU {cpulist.format_list(sorted(new))}")
    sup.seg.set_hdr("state", L.MachineState.ENDED)
    sup.ended_by = f"ended when {what} ({why})"
    return sup.ended_by


def settle_then_end_if_faulted(sup, before: dict[int, int], what: str) -> str | None:
    """``end_if_faulted``, once the CPUs have done what ``what`` (a write that woke one) started."""
    Kexec(sup, Scenario(None, "sequential", 0)).settle()
    return end_if_faulted(sup, before, what)


def require_running_kernel(sup, what: str) -> None:
    """Refuse (BadInput) when no kernel runs that could do ``what``: a kexec or a panic ended
    the machine, or the crash kernel runs (nr_cpus=1)."""
    if sup.seg.hdr("state") == L.MachineState.ENDED:
        raise BadInput(f"machine '{sup.name}' {sup.ended_by}: no kernel runs to do {what}; "
                       f"`smpd reset` power-cycles it")
    if Generations(sup.seg).current().boot.crash:
        raise BadInput(f"machine '{sup.name}' runs a crash kernel (kdump, nr_cpus=1, inside its "
                       f"crashkernel= region): {what} needs a running kernel; `smpd reset` power-cycles it")


class KernelOps:
    """The kernel's ops on the machine of the coordinator ``sup`` (smpd.daemon.supervisor)."""

    def __init__(self, sup):
        self.sup = sup

    def _map(self):
        return Generations(self.sup.seg).current()

    def _offline_now(self) -> list[int]:
        return [c for c in range(1, self.sup.ncpus) if self.sup.seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]

    def _note_offline_set(self) -> None:
        """Before the first kexec or panic since power-on (each stops CPUs, which leaves them
        marked offline): the offline set that `smpd reset` restores."""
        if self.sup.reset_offline is None:
            self.sup.reset_offline = self._offline_now()

    def _require_kexec_able(self, what: str) -> None:
        require_running_kernel(self.sup, what)
        require_alive(self.sup, list(range(1, self.sup.ncpus)))

    def op_kexec(self, kernel: str | None = None, into: str | None = None, crash: bool = False,
                 boot: str | None = None, inject: list[str] | None = None, order: str = "sequential",
                 seed: int | None = None, park: str | None = None, brief: bool = False) -> dict:
        """One kexec from the running generation into the next (smpd.kernel.kexec). ``park`` is
        the old name of ``kernel`` (none, init, hlt); ``brief``: no per-CPU reports, no timeline
        (a soak trial's)."""
        if park is not None:
            if kernel is not None:
                raise BadInput("request 'kexec': give kernel or park, not both")
            kernel = park
        if seed is None:
            seed = secrets.randbelow(2**63)
        scenario = Scenario.build(kernel, order, seed, list(inject or []), self.sup.ncpus, into, crash, boot)
        self._require_kexec_able("a kexec")
        if len(gens_mod.in_use(self.sup.seg)) >= L.GEN_SLOTS:
            raise BadInput(f"the machine's CPUs are in {L.GEN_SLOTS} different kernel generations (each left "
                           f"where a kernel with maxcpus= did not start it), as many as smpd's generation table "
                           f"has slots (an emulator limit, not the kernel's): no slot for another; `smpd reset` "
                           f"power-cycles it")
        if crash and not self.sup.seg.hdr("crash_pages"):
            raise BadInput("no crashkernel= region is reserved on this machine (memory.crashkernel_pages = 0); "
                           "`smpd up` with crashkernel_pages \"auto\" reserves one")
        parse_boot(boot, self.sup.ncpus)  # bad boot parameters are refused before anything runs
        self._note_offline_set()
        report = Kexec(self.sup, scenario, brief).run()
        ended = report["outcome"] in ENDING
        self.sup.seg.set_hdr("state", L.MachineState.ENDED if ended else L.MachineState.KEXECED)
        if ended:
            self.sup.ended_by = f"ended in the kexec into generation {report['generation']['new']} ({report['outcome']})"
        self.sup.seg.set_hdr("kexec_count", self.sup.seg.hdr("kexec_count") + 1)
        report["machine"] = {"name": self.sup.name, "cpus": self.sup.ncpus, "watch": self.sup.watch,
                             "hot_path": self.sup.hot_path}
        return report

    def op_chain(self, kexecs: int, kernel: str | None = None, into: str | None = None, boot: str | None = None,
                 inject: list[str] | None = None, order: str = "sequential", seed: int | None = None) -> dict:
        """``kexecs`` kexecs in a row, no reset between; stops at the first link that is not CLEAN
        (after a triple fault or a shutdown there is no kernel left to kexec from), or once its client
        has gone (Ctrl-C), after the link in flight."""
        if not 1 <= kexecs <= MAX_CHAIN:
            raise BadInput(f"--kexecs {kexecs} is not in the range 1..{MAX_CHAIN}")
        seed = secrets.randbelow(2**63) if seed is None else seed
        Scenario.build(kernel, order, seed, list(inject or []), self.sup.ncpus, into, False, boot)  # validates
        links = []
        for n in range(kexecs):
            if n and self.sup.handlers.client_left():  # nobody waits for the rest: the machine stays at this link
                break
            r = self.op_kexec(kernel=kernel if n == 0 else None, into=into, boot=boot if n == 0 else None,
                              inject=inject, order=order, seed=trial_seed(seed, n))
            links.append(r)
            if r["outcome"] != "CLEAN":
                break
        failing = next((i for i, r in enumerate(links) if r["outcome"] != "CLEAN"), None)
        return {"links": links, "kexecs": kexecs, "seed": seed, "first_failing_link": None if failing is None
                else failing + 1, "machine": links[-1]["machine"]}

    def op_panic(self, cpu: int = 0) -> dict:
        """panic() on ``cpu`` with no crash kernel loaded (smpd.kernel.panic); the machine stays in
        panic() (or reset itself): nothing runs on it until `smpd reset`."""
        if type(cpu) is not int or not 0 <= cpu < self.sup.ncpus:
            raise BadInput(f"--cpu {cpu}: the machine has CPUs 0..{self.sup.ncpus - 1}")
        self._require_kexec_able("a panic")
        if cpu and self.sup.seg.cb(cpu, "hotplug") != L.Hotplug.ONLINE:
            raise BadInput(f"CPU {cpu} is offline (in mwait_play_dead()): only an online CPU can panic; "
                           f"`smpd online {cpu}` first")
        self._note_offline_set()
        report = Panic(self.sup, cpu, self.sup.cfg.get("kernel", "init_only_from_boot_cpu")).run()
        self.sup.seg.set_hdr("state", L.MachineState.ENDED)
        self.sup.ended_by = {"MACHINE_RESET": f"reset itself when CPU {cpu} panicked (MACHINE_RESET)",
                             "CLEAN": f"sits in panic() since CPU {cpu} panicked"}.get(
            report["outcome"], f"ended when CPU {cpu} panicked ({report['outcome']})")
        report["machine"] = {"name": self.sup.name, "cpus": self.sup.ncpus, "watch": self.sup.watch,
                             "hot_path": self.sup.hot_path}
        return report

    def op_kick(self) -> dict:
        """smp_kick_mwait_play_dead() alone: who acknowledged, how fast, who is stuck."""
        self._require_kexec_able("a kick")
        if self._map().boot.monitors_thread_info:  # its CPUs do sit in mwait_play_dead(), on thread_info
            raise BadInput("the running kernel is pre-fix: it has no smp_kick_mwait_play_dead() (its parked CPUs "
                           "monitor their idle task's thread_info->flags; no control word to write); "
                           "`smpd reset --kernel 6.6` boots one that has")
        k = Kexec(self.sup, Scenario(None, "sequential", 0))
        stop = StopOtherCpus(self.sup, k.t, self._map(), k.cpus, k.alive_of, lambda phase: None)
        marks = k.t.mark_start(self.sup.seg, k.cpus)
        with k.t.phase("smp_kick_mwait_play_dead()"):
            kick = stop.smp_kick_mwait_play_dead(lambda: None)
        k.settle()  # the kicked CPUs' way into HLT, logged after their acknowledgements
        k.t.merge_cpus(self.sup.seg, marks, k.gens)
        return {"kick": kick, **k.t.record(),
                "cpus": [k.obs.cpu_report(c) for c in k.cpus],
                "machine": {"name": self.sup.name, "cpus": self.sup.ncpus, "watch": self.sup.watch,
                            "hot_path": self.sup.hot_path}}

    def op_reset(self, offline: str | None = None, kernel: str | None = None) -> dict:
        """A power cycle: INIT every CPU, RAM back to firmware's bytes, generation 1 boots again and
        starts its APs, and the CPUs offline before the first kexec go offline again; no re-fork. A
        CPU whose process died (GONE) is the exception: it gets a new process, even when it dies
        during the reset itself (up to RESET_ATTEMPTS times).

        ``offline``: the CPUs to take offline after the boot instead (a CPU list, "" for none):
        the soak's next trial's, which it would otherwise reach by hotplugging from these.
        ``kernel``: generation 1 boots as this flavour (its boot parameters the machine's), not
        the machine's own, until the next reset: the soak's next trial's kernel, whose offline CPUs
        then park in its own mwait_play_dead(), where `kexec --kernel` would rewrite the running
        generation and re-park them (Kexec.become)."""
        t0 = time.monotonic_ns()
        restored = None
        if (hold := soakhold.orphaned(self.sup)) is not None:  # a soak ended without restoring the machine
            if offline is None and kernel is None:  # restored now
                offline, kernel, restored = cpulist.format_list(hold.offline), hold.kernel, hold.said()
                self.sup.soak_hold = None
            elif not soakhold.from_the_soak(self.sup, hold):  # the user's own offline CPUs or kernel
                self.sup.soak_hold = None
        boot1 = self.sup.boot1
        if kernel is not None:
            boot1 = dataclasses.replace(boot1, flavour=flavour(kernel, "--kernel"))
        if offline is not None:
            offline = cpulist.parse(offline, self.sup.ncpus) if offline else []
            if 0 in offline:
                raise BadInput("CPU 0 is the boot CPU and cannot be left offline; name CPUs 1-%d"
                               % (self.sup.ncpus - 1))
        elif self.sup.reset_offline is not None:
            offline = self.sup.reset_offline
        else:
            offline = self._offline_now()
        # Kept until this reset succeeds: one that fails (a respawn cut short leaves CPUs marked
        # offline, with no process) leaves the next the same set to restore.
        self.sup.reset_offline = offline
        # Until it succeeds, no kernel runs: a reset cut short (a CPU that does not answer INIT or
        # SIPI in time, one that dies each time) leaves CPUs between the two kernels, which a kexec
        # would report as stuck. Only another reset goes on from there.
        self.sup.seg.set_hdr("state", L.MachineState.ENDED)
        self.sup.ended_by = "had its last `smpd reset` cut short"
        respawned: list[int] = []
        try:
            for attempt in range(RESET_ATTEMPTS):
                respawned += self.sup.respawn_gone()
                try:
                    self._reset_once(offline, boot1)
                    break
                except CpuLost:
                    if attempt == RESET_ATTEMPTS - 1:
                        raise
        except Timeout as err:  # a stopped or starved process (a CPU's, the template's): another reset may do
            raise Timeout(f"{err}; the reset did not finish, so no kernel runs until one does: "
                          f"`smpd status` shows where each CPU is, `smpd reset` tries again") from None
        except HostTooSmall as err:  # a new process for a GONE CPU refused: the machine stays as it is
            raise HostTooSmall(f"{err}; the reset did not finish: the machine stays ENDED, its CPUs without a "
                               f"process GONE in `smpd status`; `smpd reset` again once the host has room for "
                               f"them, or `smpd down`") from None
        self.sup.seg.set_hdr("state", L.MachineState.UP)
        self.sup.reset_offline = None
        seg = self.sup.seg
        return {"offline": self._offline_now(), "generation": 1, "kernel": boot1.text(), "respawned": respawned,
                "restored_from_soak": restored,
                # of those, the CPUs generation 1 does not start (maxcpus=): in wait-for-SIPI, not parked
                "not_started": [c for c in range(1, self.sup.ncpus) if seg.cb(c, "state") == L.ExecState.WAIT_FOR_SIPI],
                "ms": (time.monotonic_ns() - t0) / 1e6}

    def _reset_once(self, offline: list[int], boot1: Boot) -> None:
        seg = self.sup.seg
        cpus = list(range(1, self.sup.ncpus))
        budget = self.sup.ipi_timeout_s
        self.sup.ipi_all(cpus, L.Ipi.INIT, budget, "reset (INIT)")
        for cpu in cpus:
            seg.clear_cb(cpu, _RESET_CLEARS)
        gen1 = kboot.power_on(seg, self.sup.bus, boot1)
        self.sup.start_aps(gen1, budget, "reset (INIT, SIPI)", offline)
        todo = [c for c in offline if seg.cb(c, "hotplug") == L.Hotplug.ONLINE]  # none, unless one ignored it
        self.sup.ipi_all(todo, L.Ipi.CPU_DOWN, budget, "reset (offline)")

    def op_soak_hold(self, offline: str | None = None, kernel: str | None = None, pid: int = 0,
                     started: int = 0) -> dict:
        """A soak's hold (smpd.daemon.soakhold): the user's ``offline`` CPUs and ``kernel``, which a
        plain reset restores once soak ``pid`` (started at ``started``) is gone; no ``offline``: the
        soak took them back itself, and the hold goes."""
        if offline is None:
            self.sup.soak_hold = None
            return {"held": False}
        cpus = cpulist.parse(offline, self.sup.ncpus) if offline else []
        if 0 in cpus or pid <= 0 or started <= 0 or kernel is None:
            raise BadInput("a soak's hold names CPUs 1-%d, its kernel and its pid" % (self.sup.ncpus - 1))
        self.sup.soak_hold = soakhold.SoakHold(cpus, flavour(kernel, "--kernel"), pid, started)
        return {"held": True}

    def op_inject(self, kind: str, cpus: str = "all", count: int = 1) -> dict:
        """A stray interrupt right now: send it, wait (bounded) until it is taken or held."""
        inj = injection(kind, "after-copy", cpus, count, self.sup.ncpus, f"--cpus '{cpus}'")
        self.sup.refresh_gone()
        before = ending_faults(self.sup)
        k = Kexec(self.sup, Scenario(None, "sequential", 0, (inj,)))
        marks = k.t.mark_start(self.sup.seg, inj.cpus)
        k.inject("after-copy", stray=True)
        k.settle()
        k.t.merge_cpus(self.sup.seg, marks, k.gens)
        targets = cpulist.format_list(inj.cpus)
        ended = end_if_faulted(self.sup, before, f"a stray {kind.upper()} reached CPU {targets}", k.smm_hang)
        return {"injection": f"{kind} to CPU {targets} x{count}", "ended": ended,
                "cpus": [k.obs.cpu_report(c) for c in inj.cpus],
                "not_taken": {str(c): why for c, why in k.not_taken.items()}, **k.t.record()}

    def op_bench_kick(self, targets: str | None = None, rounds: int = 100) -> dict:
        """`rounds` rounds of: kick each target (smpd.kernel.kick.kick_one), then REPARK them all.

        Returns raw samples for the client to fold into histograms, so that a long run
        is many short requests (a progress bar, Ctrl-C between batches)."""
        self._require_kexec_able("a kick benchmark")
        if not 0 <= rounds <= 100_000:
            raise BadInput(f"rounds {rounds} is not in the range 1..100000")
        kmap, seg = self._map(), self.sup.seg
        parked = [c for c in range(1, self.sup.ncpus) if kick_mod.parked(seg, kmap, c)]
        cpus = parked if targets in (None, "", "parked") else cpulist.parse(targets, self.sup.ncpus)
        bad = [c for c in cpus if not kick_mod.parked(seg, kmap, c)]
        if bad or not cpus:
            raise BadInput(
                (f"CPU {cpulist.format_list(bad)} {'is' if len(bad) == 1 else 'are'} not parked in "
                 f"mwait_play_dead() (online, kicked, or elsewhere)" if bad else "no CPU is parked")
                + f"; parked now: CPU {cpulist.format_list(parked) or 'none'} (`smpd offline` parks CPUs)"
                + ("; the running kernel is pre-fix: it has no kick" if kmap.boot.monitors_thread_info else ""))
        if rounds == VALIDATE_ONLY:  # (and the pids, to sample before the first batch)
            return {"targets": cpus, "pids": {str(c): seg.cb(c, "pid") for c in cpus}}
        delay_ns, budget = self.sup.kick_params()
        try:
            samples = kick_mod.bench_rounds(seg, self.sup.bus, kmap, cpus, rounds, delay_ns, budget,
                                            lambda c: self.sup.ipi_wait(c, L.Ipi.REPARK, self.sup.ipi_timeout_s)[1])
        except TimeoutError as err:
            raise Timeout(f"bench kick: CPU {cpulist.format_list(err.args[0])} did not re-park "
                          f"in mwait_play_dead() within {self.sup.ipi_timeout_s:.0f} s") from None
        return {"samples": samples, "budget_ns": delay_ns * budget, "delay_ns": delay_ns, "watch": self.sup.watch,
                "hot_path": self.sup.hot_path,
                "pids": {str(c): self.sup.seg.cb(c, "pid") for c in cpus}}
