"""A kexec's outcome, as a pure function of what the machine looked like afterwards.

``classify(snapshot)`` takes plain data (each CPU's state and fault, the kick's
result, the new kernel's verification, what the host did) and returns the one
outcome a real machine would show, and why; ``explain()`` turns that into the
evidence line. Nothing here touches a segment or a process, so every rule is a
millisecond unit test (tests/test_outcome.py); smpd.kernel.kexec builds the snapshot
from the machine and the process tests check that it matches reality.

Precedence, from what ends the machine first to what it survives:

    CPU_LOST      a CPU process died: an emulator fault, not an emulated one
    MACHINE_RESET INIT reached the boot CPU (6.5's INIT parking run on another CPU, without
                  b1472a60a584's check): the whole machine resets
    SMM_HANG      an SMI came while CPUs sat in INIT and the firmware waited for them
    MCE_SHUTDOWN  an MCE reached a CPU in wait-for-SIPI (INIT), or a broadcast one reached CPU 0
                  from relocate_kernel() on (#MC off there): the machine goes down
    TRIPLE_FAULT  a CPU resumed in overwritten memory and could not deliver the fault
    CORRUPTION    the new kernel's own memory differs from its image (a stray store landed)
    STUCK         a CPU never acknowledged the kick (and what became of it)
    CLEAN         the new kernel verified its memory; near misses are said, not counted

A stray store that a later write (the copy, the new kernel's own boot) covered left no
trace: that is CLEAN with a near miss, as on real hardware. A CPU the host did not run
in time (SIGSTOP, a scheduling gap) is a host fault, reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smpd.cpulist import format_list

OUTCOMES = ("CLEAN", "TRIPLE_FAULT", "CORRUPTION", "MCE_SHUTDOWN", "SMM_HANG", "MACHINE_RESET", "STUCK", "CPU_LOST")


@dataclass(frozen=True)
class CpuFacts:
    cpu: int
    state: str  # RUNNING, MWAIT, HLT, WAIT_FOR_SIPI, SHUTDOWN, GONE
    fault: str = "NONE"  # smpd.machine.layout.Fault
    fault_ns: int = 0
    fault_page: str = ""  # e.g. "pgtable page 0 of generation 2"
    fault_cause: str = ""  # what resumed it, e.g. 'MWAIT woken by a write to thread_info[3].flags'
    stray_stores: int = 0
    first_store: tuple[int, str, int] | None = None  # (address, symbol, value)
    alive: bool = True
    exit_code: int | None = None
    pid: int = 0
    held: bool = False  # NMI or SMI held pending in wait-for-SIPI
    host_note: str = ""  # e.g. "its process is stopped (SIGSTOP)"
    generation: int = 0  # the generation it runs
    monitor: str = ""  # the line its MONITOR is armed on, named in its own generation's map


@dataclass(frozen=True)
class Snapshot:
    kernel: str  # the flavour of the kernel that did the kexec (or panicked)
    new_gen: int  # the generation kexec'd into; for a panic, the one that panicked
    cpus: tuple[CpuFacts, ...]
    crash: bool = False
    injected: bool = False
    kick: dict | None = None  # smpd.kernel.kick's result: stuck, cpus (rounds), budget_ns, message
    parked_in_init: bool = False  # smp_park_other_cpus_in_init() ran
    not_in_init: tuple[int, ...] = ()  # ... and left these out: the kernel never started them (maxcpus)
    corruption: tuple[dict, ...] = ()  # words of the new kernel's memory that differ: addr, symbol, value, expected
    smm_hang: str = ""  # which SMI hung the firmware, if one did
    not_taken: dict = field(default_factory=dict)  # cpu -> why an injection was not taken
    unsettled: tuple[int, ...] = ()
    boot_missing: tuple[int, ...] = ()  # CPUs that did not answer the new kernel's INIT/SIPI
    left_behind: tuple[int, ...] = ()  # CPUs the new kernel does not start: still in old memory
    waking: tuple[dict, ...] = ()  # writes that woke a monitor: cpu, write (what and where), line
    panic_cpu: int | None = None  # `smpd panic`: the CPU that panicked (no kexec, no new kernel)
    init_to_boot_cpu: bool = False  # smp_park_other_cpus_in_init() sent INIT to the boot CPU
    mce_on_kexec_cpu: str = ""  # the phase at which a broadcast MCE reached CPU 0 with #MC off (kexec.py)


@dataclass(frozen=True)
class Verdict:
    outcome: str
    cause: dict  # the facts the evidence is made of
    notes: tuple[str, ...] = ()
    near_misses: tuple[str, ...] = ()
    host_faults: tuple[str, ...] = ()

    def __post_init__(self):
        assert self.outcome in OUTCOMES, self.outcome


def classify(s: Snapshot) -> Verdict:
    """The outcome: the first of PRECEDENCE's rules that holds, else CLEAN; with the notes,
    near misses and host faults that go with any outcome."""
    for rule in PRECEDENCE:
        found = rule(s)
        if found is not None:
            outcome, cause = found
            break
    else:
        outcome, cause = "CLEAN", {"kernel": s.kernel, "crash": s.crash, "parked_in_init": s.parked_in_init,
                                   "not_in_init": list(s.not_in_init),
                                   "kicked": bool(s.kick and s.kick.get("cpus")),
                                   "held": [c.cpu for c in s.cpus if c.held] if s.injected else [],
                                   "new_gen": s.new_gen, "panic_cpu": s.panic_cpu}
    return Verdict(outcome, cause, tuple(_notes(s)), _near_misses(s), tuple(_host_faults(s)))


def _notes(s: Snapshot) -> list[str]:
    by = {c.cpu: c for c in s.cpus}
    notes = [f"CPU{c}: {why}" for c, why in sorted(s.not_taken.items())]
    notes += [f"CPU{c.cpu} executed foreign bytes ({c.fault_page}) into a halt; INIT recovered it"
              for c in s.cpus if c.fault == "FOREIGN_HALT"]
    in_init = [c for c in s.left_behind if c in by and by[c].state == "WAIT_FOR_SIPI"]
    elsewhere = [c for c in s.left_behind if c in by and c not in in_init]
    if elsewhere:
        gens = sorted({by[c].generation for c in elsewhere})
        states = sorted({by[c].state for c in elsewhere})
        notes.append(f"CPU {_cpus(elsewhere)} not started by the new kernel: still in the memory of "
                     f"generation {', '.join(map(str, gens))} ({', '.join(states)})")
    notes += [f"CPU{c} still MWAITs on generation {by[c].generation}'s {by[c].monitor}: the running kernel "
              f"does not know it is watched, and any later write to that line wakes it in memory that is no "
              f"longer its kernel's"
              for c in elsewhere if by[c].state == "MWAIT" and by[c].monitor]
    if in_init:
        notes.append(f"CPU {_cpus(in_init)} not started by the new kernel: still in wait-for-SIPI (INIT), where "
                     f"they run no kernel's code; NMI and SMI stay held, and a broadcast MCE shuts the machine "
                     f"down for as long as this kernel runs")
    return notes


def _host_faults(s: Snapshot) -> list[str]:
    return ([f"CPU{c.cpu}: {c.host_note}" for c in s.cpus if c.host_note]
            + [f"CPU{c} was still acting on a wake-up when the kexec ended" for c in s.unsettled])


def _near_misses(s: Snapshot) -> tuple[str, ...]:
    """Stray stores that left no trace: a later write covered them (none when memory is corrupt)."""
    if s.corruption:
        return ()
    return tuple(f"CPU{c.cpu} executed foreign bytes and stored {c.first_store[2]:#010x} to {c.first_store[1]} "
                 f"({c.first_store[0]:#x}): no trace is left in the new kernel's memory"
                 for c in s.cpus if c.stray_stores and c.first_store)


# The rules, in precedence order: each gives (outcome, cause) when it holds, else None.

def _cpu_lost(s: Snapshot):
    lost = [c for c in s.cpus if not c.alive]
    return ("CPU_LOST", {"lost": [(c.cpu, c.pid, c.exit_code) for c in lost]}) if lost else None


def _machine_reset(s: Snapshot):
    return ("MACHINE_RESET", {"cpu": s.panic_cpu}) if s.init_to_boot_cpu else None


def _smm_hang(s: Snapshot):
    if not s.smm_hang:
        return None
    return "SMM_HANG", {"smi": s.smm_hang, "in_init": [c.cpu for c in s.cpus if c.state == "WAIT_FOR_SIPI"]}


def _mce_shutdown(s: Snapshot):
    mce = [c.cpu for c in s.cpus if c.fault == "MCE_SHUTDOWN"]
    return ("MCE_SHUTDOWN", {"cpus": mce, "kexec_cpu": s.mce_on_kexec_cpu}) if mce or s.mce_on_kexec_cpu else None


def _triple_fault(s: Snapshot):
    triple = sorted((c for c in s.cpus if c.fault == "TRIPLE_FAULT"), key=lambda c: c.fault_ns)
    if not triple:
        return None
    t = triple[0]
    by = next((w["write"] for w in s.waking if w["cpu"] == t.cpu), "")
    return "TRIPLE_FAULT", {"cpu": t.cpu, "after": t.fault_cause, "page": t.fault_page, "others": len(triple) - 1,
                            "by": by}


def _corruption(s: Snapshot):
    if not s.corruption:
        return None
    w = next((c for c in s.cpus if c.stray_stores and c.first_store), None)
    return "CORRUPTION", {"writer": None if w is None else (w.cpu, w.fault_cause, w.fault_page, w.first_store),
                          "first": s.corruption[0], "words": len(s.corruption)}


def _stuck(s: Snapshot):
    stuck = (s.kick or {}).get("stuck") or []
    if not stuck:
        return None
    cpu = stuck[0]
    c = next((x for x in s.cpus if x.cpu == cpu), None)
    return "STUCK", {"cpu": cpu, "rounds": s.kick["cpus"][cpu]["rounds"], "budget_ns": s.kick["budget_ns"],
                     "message": s.kick["message"], "state": c.state if c else "?", "host": c.host_note if c else "",
                     "no_boot": cpu in s.boot_missing}


PRECEDENCE = (_cpu_lost, _machine_reset, _smm_hang, _mce_shutdown, _triple_fault, _corruption, _stuck)


def explain(v: Verdict) -> str:
    """The evidence line: one sentence a kernel engineer can check against the memory maps."""
    return _EVIDENCE[v.outcome](v.cause, v)


def _lost(c: dict, _v) -> str:
    return "; ".join(f"CPU{cpu} (pid {pid}) died, exit code {code}" for cpu, pid, code in c["lost"]) + \
        " - an emulator fault, not an emulated one"


def _smm(c: dict, _v) -> str:
    return (f"{c['smi']} entered SMM while CPU {_cpus(c['in_init'])} sat in INIT: this firmware "
            f"([firmware] smm_hangs_with_cpus_in_init) waits for every CPU to join SMM, and the machine hangs "
            f"at shutdown; consistent with bugzilla 217995's hangs, which led to the revert (fbe1bf1e5ff1)")


def _reset(c: dict, _v) -> str:
    return (f"panic() on CPU{c['cpu']} ran smp_park_other_cpus_in_init(), which sent INIT to CPU 0, the boot CPU: "
            f"the whole machine reset before panic() went on -- no panic notifiers (pvpanic), no kmsg_dump, no "
            f"end marker, no panic_timeout wait (45e34c8af58f without b1472a60a584, which refuses INIT parking "
            f"off the boot CPU)")


def _mce(c: dict, _v) -> str:
    init = (f"MCE reached CPU {_cpus(c['cpus'])} in wait-for-SIPI (INIT)" if c["cpus"] else "")
    if not c.get("kexec_cpu"):
        return (f"{init}: the CPU enters shutdown and the platform takes the machine down (normally a reset), "
                f"loudly; no CPU resumes in the old kernel's overwritten memory (the lesser of two evils)")
    return (f"the broadcast MCE at {c['kexec_cpu']} reached CPU 0, the kexec CPU, where #MC cannot be taken "
            f"(machine_kexec()'s native_idt_invalidate(), then relocate_kernel()'s identity_mapped clears CR4.MCE; "
            f"the new kernel sets #MC up only in mcheck_cpu_init()): CPU 0 enters shutdown, as for a triple "
            f"fault, and the platform normally resets; the new kernel never runs, whatever the kernel parked the "
            f"other CPUs in" + (f"; the {init} too" if init else ""))


def _triple(c: dict, _v) -> str:
    return (f"CPU{c['cpu']} resumed after \"{c['after']}\"" + (f" ({c['by']})" if c.get("by") else "")
            + f" in overwritten memory: {c['page']} is no longer its kernel's -> triple fault; the platform "
            f"resets the machine"
            + (f" ({c['others']} more CPU{'s' if c['others'] > 1 else ''} faulted too)" if c["others"] else ""))


def _corrupt(c: dict, _v) -> str:
    f = c["first"]
    if not c["writer"]:
        return f"the new kernel's memory differs at {f['symbol']} ({f['addr']:#x}) in {c['words']} words"
    cpu, cause, page, (addr, symbol, value) = c["writer"]
    return (f"CPU{cpu} resumed after \"{cause}\", executed foreign bytes of {page} and stored {value:#010x} "
            f"to {symbol} ({addr:#x}); the new kernel's image differs in {c['words']} word"
            f"{'s' if c['words'] > 1 else ''}, first at {f['symbol']} ({f['addr']:#x})")


def _stuck_cpu(c: dict, _v) -> str:
    e = (f"CPU{c['cpu']} never acknowledged the kick ({c['rounds']} rounds, {c['budget_ns'] / 1e6:.0f} ms): "
         f"{c['message']}; it is now {c['state']}")
    if c["host"]:
        e += f" ({c['host']})"
    return e + ("; it did not answer the new kernel's INIT/SIPI" if c["no_boot"] else "")


def _clean(c: dict, v: Verdict) -> str:
    if c["panic_cpu"] is not None:
        return _clean_panic(c)
    if c["crash"]:
        e = ("crash_smp_send_stop() stopped the other CPUs by NMI; no kick, no INIT: the parked CPUs stayed in "
             "the old kernel's memory and no write of the crash kernel, which runs in its crashkernel= region, "
             "reached the lines they monitor")
    elif c["parked_in_init"] and c.get("not_in_init"):
        e = (f"every other CPU this kernel had started sat in wait-for-SIPI (INIT) through the copy and the "
             f"new kernel's boot; CPU {_cpus(c['not_in_init'])}, which it never started (maxcpus), got no INIT and "
             f"stayed where an older kernel left them")
    elif c["parked_in_init"]:
        e = "every other CPU sat in wait-for-SIPI (INIT) through the copy and the new kernel's boot"
    elif c["kicked"]:
        e = "every parked CPU acknowledged the kick and halted; no write ends HLT"
    elif c["kernel"] == "pre-fix":
        e = "no write before the new kernel started the APs hit a line a parked CPU monitors"
    else:
        e = "no CPU was parked in mwait_play_dead(): nothing to kick"
    if c["held"]:
        e += f"; NMI/SMI held pending on CPU {_cpus(c['held'])}"
    e += f"; the new kernel (generation {c['new_gen']}) verified its memory"
    if v.near_misses:
        more = len(v.near_misses) - 1
        e += f"; near miss: {v.near_misses[0]}" + (f" (and {more} more)" if more else "")
    return e


def _clean_panic(c: dict) -> str:
    e = f"panic() on CPU{c['panic_cpu']}: smp_send_stop() stopped the other online CPUs"
    if c["parked_in_init"]:
        e += "; smp_park_other_cpus_in_init() parked every other CPU in wait-for-SIPI (INIT)"
    else:
        e += ("; no INIT parking off the boot CPU (b1472a60a584): they stay in HLT" if c["kernel"] == "6.5" else "")
        e += ("; no kick (" + ("this kernel has none" if c["kernel"] == "pre-fix" else "kexec_in_progress is false")
              + ") and no write: the parked CPUs stay in mwait_play_dead()")
    e += ". The machine stays in panic() with its message on the console (panic_timeout=0)"
    if c["held"]:
        e += f"; NMI/SMI held pending on CPU {_cpus(c['held'])}"
    return e


_EVIDENCE = {"CPU_LOST": _lost, "MACHINE_RESET": _reset, "SMM_HANG": _smm, "MCE_SHUTDOWN": _mce, "TRIPLE_FAULT": _triple,
             "CORRUPTION": _corrupt, "STUCK": _stuck_cpu, "CLEAN": _clean}
assert set(_EVIDENCE) == set(OUTCOMES)


def _cpus(cpus) -> str:
    return format_list(list(cpus)) or "none"
