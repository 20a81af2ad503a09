"""Host facts, read with psutil and /sys before anything is forked.

* ``check_capacity``: can this host hold N CPU processes? (memory, RLIMIT_NPROC,
  pid_max, open files). Refusing before the first fork is what keeps a too-big
  request from leaving a half-made machine.
* ``free_cores`` and ``choose_watch``: the ``auto`` watch strategy.
* ``pin_plan``: which host core each emulated CPU runs on, per pin policy, and
  ``machine_cores``: how many host cores the machine's processes may use under it.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import psutil

from smpd.errors import HostTooSmall
from smpd.host.names import SHM_DIR

# A machine's processes besides CPUs 1..N-1: the coordinator, its janitor, and the template the
# CPU processes are forked from (smpd.daemon.template), alive beside them during bring-up.
OWN_PROCESSES = 3


def _uid_processes() -> int:
    uid = os.getuid()
    n = 0
    for p in psutil.process_iter(["uids"]):
        uids = p.info.get("uids")
        if uids is not None and uids.real == uid:
            n += 1
    return n


def check_capacity(ncpus: int, segment_bytes: int, cpu_process_mib: int, memory_share: float) -> None:
    """Raise HostTooSmall, naming the limit, when the host cannot hold the machine."""
    procs = ncpus - 1 + OWN_PROCESSES
    need = (ncpus - 1) * cpu_process_mib * 2**20 + segment_bytes
    avail = psutil.virtual_memory().available
    if need > avail * memory_share:
        fit = max(1, int((avail * memory_share - segment_bytes) // (cpu_process_mib * 2**20)) + 1)
        raise HostTooSmall(
            f"--cpus {ncpus} needs about {need / 2**30:.1f} GiB ({cpu_process_mib} MiB per CPU "
            f"process + a {segment_bytes / 2**20:.1f} MiB segment) but the host has "
            f"{avail / 2**30:.1f} GiB available and smpd uses at most {memory_share:.0%} of it; "
            f"this host holds up to --cpus {fit}"
        )
    soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    # The kernel does not hold root to RLIMIT_NPROC (copy_process(): INIT_USER), so neither do we.
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        room = max(soft - _uid_processes(), 0)
        if procs > room:
            raise HostTooSmall(
                f"--cpus {ncpus} needs {procs} processes but RLIMIT_NPROC ({soft}, `ulimit -u`) leaves room "
                f"for {room} more of this user's; " + (f"this host holds up to --cpus {room - OWN_PROCESSES + 1}"
                                                       if room >= OWN_PROCESSES else
                                                       f"no machine fits (the smallest needs {OWN_PROCESSES})")
            )
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    running = len(psutil.pids())
    if procs > pid_max - running:
        raise HostTooSmall(f"--cpus {ncpus} needs {procs} processes but pid_max {pid_max} leaves {pid_max - running}")
    _soft, hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard_files != resource.RLIM_INFINITY and hard_files < COORDINATOR_FILES:
        raise HostTooSmall(
            f"a machine's coordinator needs {COORDINATOR_FILES} open files but the hard RLIMIT_NOFILE "
            f"(`ulimit -Hn`) is {hard_files}; no machine fits (a CPU process costs none)"
        )
    fsize, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if fsize != resource.RLIM_INFINITY and segment_bytes > fsize:
        raise HostTooSmall(
            f"--cpus {ncpus} needs a {segment_bytes / 2**20:.1f} MiB shared-memory segment but RLIMIT_FSIZE "
            f"(`ulimit -f`) allows files of {fsize / 2**20:.1f} MiB; raise it, or ask for fewer CPUs"
        )
    try:
        shm = os.statvfs(SHM_DIR)
        free = shm.f_bavail * shm.f_frsize
    except OSError:
        free = None
    if free is not None and segment_bytes > free:
        raise HostTooSmall(f"--cpus {ncpus} needs a {segment_bytes / 2**20:.1f} MiB segment but {SHM_DIR} has "
                           f"{free / 2**20:.1f} MiB free")


# The coordinator's own descriptors (the interpreter's, the segment, the channel, the janitor's
# pipe, the up client): a CPU process costs it none (smpd.daemon.cpuproc), whatever N.
COORDINATOR_FILES = 64


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < COORDINATOR_FILES:
        resource.setrlimit(resource.RLIMIT_NOFILE, (COORDINATOR_FILES, hard))


def allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def free_cores(sample_s: float = 0.1) -> float:
    """Logical cores not busy over a short sample, in core units (e.g. 1.7)."""
    cores = allowed_cores()
    per = psutil.cpu_percent(interval=sample_s, percpu=True)
    busy = sum(per[c] for c in cores if c < len(per)) / 100.0
    return max(0.0, len(cores) - busy)


def choose_watch(strategy: str, ncpus: int, pin: str = "none") -> tuple[str, str]:
    """Resolve ``auto`` (for the cores the pin policy ``pin`` leaves the machine); return (strategy, why)."""
    if strategy != "auto":
        return strategy, f"{strategy} (asked for)"
    need = ncpus  # N-1 CPU processes plus the coordinator, which also spins while it waits
    cores = machine_cores(pin_plan(pin, ncpus))
    # more than the machine could ever have: no load sample (0.1 s)
    free = min(free_cores(), float(cores)) if need <= cores else None
    if free is not None and need <= int(free + 0.25):
        return "spin", f"spin: {ncpus - 1} CPU processes + coordinator fit {free:.1f} free host cores"
    has = f"{cores}" if free is None else f"{free:.1f} free of {cores}"
    return "adaptive", f"adaptive: {ncpus - 1} CPU processes + coordinator need {need} cores, the host has {has}"


def machine_cores(plan: list[int | None]) -> int:
    """How many host cores a machine's processes (coordinator and CPUs) placed by ``plan``
    (pin_plan's) may run on: the cores it names, or every core this process may use."""
    return len(set(plan)) if plan[0] is not None else len(allowed_cores())


def _physical_core(cpu: int) -> tuple[int, int]:
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return int((base / "physical_package_id").read_text()), int((base / "core_id").read_text())
    except (OSError, ValueError):
        return 0, cpu


def pin_plan(policy: str, ncpus: int) -> list[int | None]:
    """Host core of each emulated CPU (index 0 = the coordinator), or None for 'none'.

    compact: logical cores in order, wrapping. spread: one logical core of every
    physical core first, then their siblings, wrapping. one: all on the first core (on a VM, a
    sleeping CPU's wake-up never waits for an idle vCPU to be woken by the hypervisor).
    """
    if policy == "none":
        return [None] * ncpus
    cores = allowed_cores()
    if policy == "one":  # every process on the coordinator's core: each wake-up a hand-off there
        return [cores[0]] * ncpus
    if policy == "spread":
        seen: dict[tuple[int, int], int] = {}
        first, siblings = [], []
        for c in cores:
            key = _physical_core(c)
            (siblings if key in seen else first).append(c)
            seen.setdefault(key, c)
        cores = first + siblings
    return [cores[i % len(cores)] for i in range(ncpus)]
