"""The template: the lean process every CPU process is forked from. A host-side saving with no
kernel counterpart: a CPU process stands for a logical CPU and lives across kexecs; it is not
the idle task each generation's fork_idle() writes into the emulated memory (smpd.kernel.memmap).

A CPU process forked from the coordinator inherits the coordinator's heap (~33 MB resident),
and each page of it the CPU writes (a reference count, an allocation) is copied for it. The
template is a fresh interpreter that imports the CPU's code (smpd.kernel.cpu) and nothing else,
maps the segment by the descriptor the coordinator hands down (no name to trust), freezes its
collector, and forks each CPU on request. Measured on the 2-core box, 64 CPUs, after bring-up:
698 -> 614 page faults and 2.65 -> 2.23 MB USS per CPU process; `smpd down` of 1024 CPUs
1.5 -> 0.9 s (bench/bench_machine.py). What is left per CPU is CPython's own: its fork hooks,
then one fault per page of every object the CPU touches. The hooks are those of whatever the
template imported: threading's (pulled in by psutil) cost ~120 faults a CPU, so the template's
imports leave psutil out (smpd.machine.segment.attach), and the CPU's creation time is the
coordinator's to read (~25 more): 605 -> 459 faults and 2.5 -> 2.0 ms of host CPU per CPU
process; `smpd up` of 2048 CPUs 4.5-5.4 -> 3.5-4.2 s, alternated.

Its fork loop is C (smpd.daemon._forkloop) on a machine of the compiled hot path, Python
(``_fork_cpus``) on one of the Python hot path or where the C is not built. The Python loop's
objects lay in pages each fork had just shared with the child, so the template copied ~50 of
them again after every fork; in C it copies ~7, and returns to Python only once all are forked.
Measured at 1024 CPUs, three bring-ups each: the template's CPU 1.29-1.63 s -> 0.78-1.0 s.

It builds each CPU's Cpu object before it forks the CPU's process (BUILT_AHEAD at a time, then
drops them): the allocations and first calls of its construction, ~100 copy-on-write faults in
a process just forked, are made once here, before any fork shares their pages. So are the
interrupt handlers, which are process-wide (smpd.machine.core.install_interrupt_handlers: the
interrupt signals blocked until the CPU owns them). What a CPU must own is still set in its own
process: that its handlers record for it, and its mask (cpu_main), its generator of spurious
wake-ups (smpd.machine.core). Its name and death signal are set by the fork loop, which also
closes every descriptor it inherited but 0-2 (~225 -> ~180 page faults a CPU process).
On the compiled path each CPU built here is also taught generation 1 (Handoff.learn_boot), as
found in the table: its process's first wait then takes the bring-up's INIT and SIPI in C, and
no Python of smp_callin() runs in it until its next wake-up (~375 -> ~225 page faults and
~2.0 -> ~1.0 ms of host CPU a CPU process at 1024 CPUs). There the compiled fork loop also makes
the CPU's start and first wait itself (CpuCore.first_wait_calls: calls into C alone), so that no
Python runs in the process at all until that wake-up (~150 -> ~110 page faults).

It forks with CLONE_PARENT (smpd.host.proc.fork_sibling): each CPU process is the coordinator's
own child, as before. The coordinator reaps it, holds its pid until it does (so a signal by pid
reaches nobody else), and the CPU's PR_SET_PDEATHSIG follows the coordinator. The template
lives for one batch (the bring-up, a reset's respawns), dies with the coordinator too, and is
reaped by it.

It is exec'd with subprocess, not started by multiprocess: multiprocess's spawn would import
the coordinator's main module (smpd.daemon.__main__, all of the daemon) into it, which is what
the template exists to leave out.

The protocol, on a socketpair (SOCK_SEQPACKET, one message each): the coordinator sends one
request, an array of (cpu, core or -1) int32 pairs; the template answers each with
(cpu, pid), or (cpu, -errno) when the host refused the fork (and forks no more).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Callable

from smpd.errors import CpuLost, Timeout
from smpd.host.proc import (PID_MAX, die_with_parent, fork_refused, fork_sibling, is_child, process_name,
                             set_process_name)
from smpd.machine import layout as L

try:
    from smpd.daemon import _forkloop
except ImportError:  # built without a C compiler: the Python loop forks (as on a Python hot path machine)
    _forkloop = None

if TYPE_CHECKING:
    from smpd.machine.segment import Segment

TEMPLATE_COMM = "smpd-template"
CPU_COMM = "smpd-cpu"  # and the CPU's number: each CPU process's name (comm, 15 bytes at most)
BUILT_AHEAD = 64  # CPUs whose Cpu objects (~3.5 KB each) the template builds, then forks, at a time
_PAIR = struct.Struct("<ii")
NAME_WAIT_S = 0.05  # how long a batch's CPU process names may be read again before one is taken for another's
STOP_WAIT_S = 5.0  # a template told to exit after its batch has this long before it is killed
START_S = 30.0  # what its first answer may take besides: its interpreter's start (~0.1 s idle, more loaded)


class Template:
    """The coordinator's half: start the template, have it fork CPUs, stop it."""

    def __init__(self):
        self.proc = None  # subprocess.Popen
        self.sock: socket.socket | None = None

    def start(self) -> None:
        """Exec the template, unless it runs already. Its interpreter starts (~0.1 s here, most of
        a small machine's bring-up) while the coordinator goes on: `python -m smpd.daemon` starts
        it before its own imports (~0.25 s), and it waits for the segment, which ``attach`` hands
        it. This module imports light for that: the CPU's code is the template process's own
        (``cpu_code``). LD_BIND_NOW: its dynamic linker binds every function of its libraries as
        it loads them, not at each one's first call, so no CPU process forked from it binds one
        (the first call, in the child, of each function the template never called: at 1024 CPUs
        110 -> 95 page faults a CPU process, three runs of each alternated)."""
        if self.proc is not None:
            return
        import subprocess  # here: the template's own interpreter need not import it

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = {"socket_fd": theirs.fileno(), "coordinator": os.getpid()}
        try:
            self.proc = subprocess.Popen([sys.executable, "-P", "-m", __name__, json.dumps(spec)],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         env={**os.environ, "LD_BIND_NOW": "1"})
        except OSError as err:
            ours.close()
            raise fork_refused(err, "the process CPU processes are forked from") from None
        finally:
            theirs.close()
        self.sock = ours

    def attach(self, seg: Segment, signals: dict[str, int]) -> None:
        """Hand the template the segment (its name, and its descriptor: SCM_RIGHTS) and the
        machine's interrupt signals."""
        try:
            socket.send_fds(self.sock, [json.dumps({"segment": seg.name, "signals": signals}).encode()], [seg.fd])
        except OSError:  # it died (EPIPE, ECONNRESET)
            raise self._gone() from None

    def fork(self, seg: Segment, signals: dict[str, int], plan: dict[int, int | None], poll: Callable[[], None],
             adopt: Callable[[int, int], None], stall_s: float, meanwhile: Callable[[], None] = lambda: None) -> None:
        """Fork a CPU process for each CPU of ``plan`` (cpu -> host core), its interrupts ``signals``
        (smpd.config), ``adopt(cpu, pid)`` each as it is forked, then end the template. Each CPU is
        in wait-for-SIPI first, offline, where power-on leaves an AP: stored here, before the
        request, and its process starts there (smpd.kernel.cpu's run).
        ``meanwhile`` runs once the request is sent (the coordinator's own work, done while the
        template forks); ``poll`` runs between answers (the coordinator's stop check). Raises
        HostTooSmall when the host refuses a process, CpuLost when the template dies before it
        answered all (or answers what it was not asked, or a pid it did not fork for that CPU:
        ``_forked_for``), Timeout when it answers none for ``stall_s`` (stopped, or starved; its
        first answer may take START_S more); every CPU process forked is adopted all the same, and
        the template killed."""
        done = False
        answered: set[int] = set()
        patience = [NAME_WAIT_S]  # what all of this batch's names may take to read again (_forked_for)
        template = None
        try:
            if self.proc is None:
                self.start()
            template = self.proc.pid
            for cpu in plan:
                seg.set_cb(cpu, "state", L.ExecState.WAIT_FOR_SIPI)
                seg.set_cb(cpu, "hotplug", L.Hotplug.OFFLINE)
            self.attach(seg, signals)  # a template forks one batch, so it is handed the segment once
            try:
                self.sock.send(b"".join(_PAIR.pack(c, -1 if k is None else k) for c, k in plan.items()))
            except OSError:  # it died before it read the request (EPIPE, ECONNRESET)
                raise self._gone() from None
            meanwhile()
            self.sock.settimeout(0.1)
            for n in range(len(plan)):
                cpu, pid = self._answer(poll, stall_s, n, len(plan))
                if cpu not in plan or pid == 0 or pid > PID_MAX:  # a pid 0 would name our process group
                    raise CpuLost(f"the process CPU processes are forked from answered CPU{cpu} pid {pid}, "
                                  f"which it was not asked for; it is killed")
                if pid > 0 and not _forked_for(cpu, pid, template, answered, patience):
                    raise CpuLost(f"the process CPU processes are forked from answered CPU{cpu} pid {pid}, "
                                  f"which is not a process it forked for that CPU; it is killed")
                if pid < 0:
                    raise fork_refused(OSError(-pid, os.strerror(-pid)), f"CPU{cpu}")
                answered.add(pid)
                adopt(cpu, pid)
            done = True
        finally:
            for cpu, pid in self.stop(wait_s=STOP_WAIT_S if done else 0):
                if cpu in plan and _forked_for(cpu, pid, template, answered, patience):
                    answered.add(pid)
                    adopt(cpu, pid)

    def _answer(self, poll: Callable[[], None], stall_s: float, n: int, of: int) -> tuple[int, int]:
        deadline = time.monotonic() + stall_s + (START_S if n == 0 else 0.0)
        while True:
            poll()
            try:
                reply = self.sock.recv(_PAIR.size)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise Timeout(f"the process CPU processes are forked from (pid {self.proc.pid}) forked "
                                  f"{n} of {of} and then none for {stall_s * 1000:g} ms (ipi_ack_ms; stopped, "
                                  f"or starved of the host's cores); it is killed") from None
                continue
            except OSError:
                reply = b""
                break
        if not reply:
            raise self._gone()
        return _PAIR.unpack(reply)

    def _gone(self) -> CpuLost:
        """Its end of the socket closed: it is exiting (waited for STOP_WAIT_S, then killed)."""
        import subprocess

        try:
            status = self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = f"{self.proc.wait()} (it closed its socket but did not exit, and was killed)"
        return CpuLost(f"the process CPU processes are forked from (pid {self.proc.pid}) exited with status {status}")

    def stop(self, wait_s: float = 0) -> list[tuple[int, int]]:
        """End the template and reap it: told to, so that it lets its last CPU run, and killed after
        ``wait_s`` (at once by default: mid-batch, when the coordinator stops). Returns the
        (cpu, pid) answers it sent that were not read: those CPU processes are the coordinator's
        children all the same. One it forked but had not told to run exits (``_fork_cpus``)."""
        import subprocess

        left = []
        if self.proc is not None:
            if wait_s and self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_WR)  # its recv() ends: it exits
                    self.proc.wait(wait_s)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.sock is not None:
            self.sock.setblocking(False)
            try:
                while reply := self.sock.recv(_PAIR.size):
                    left.append(_PAIR.unpack(reply))
            except OSError:  # none left (EAGAIN), or the template's end reset
                pass
            self.sock.close()
            self.sock = None
        return [(c, pid) for c, pid in left if 0 < pid <= PID_MAX]


def _forked_for(cpu: int, pid: int, template: int | None, answered: set[int], patience: list[float]) -> bool:
    """Is ``pid`` a process the template (pid ``template``) forked for ``cpu``: a child of ours,
    unreaped (proc.is_child; the liveness checks take such a one as alive while no child has exited:
    smpd.daemon.cpuproc.maybe_gone), not the template itself nor one answered already, and named
    for that CPU, or still the template's name (the fork loop renames the child right after the
    clone; the answer may come first)? A name read while the rename runs may be neither, torn
    (the kernel copies comm without a lock: seen once in ~25 bring-ups of 1024 CPUs here), so a
    name that is neither is read again before it is refused: for ``patience[0]`` seconds at most,
    which those reads use up (the batch's, NAME_WAIT_S: a template that answers pids named for
    another CPU stalls its coordinator that long, not that long for each)."""
    if pid == template or pid in answered or not is_child(pid):
        return False
    start = time.monotonic()
    try:
        while process_name(pid) not in (f"{CPU_COMM}{cpu}", TEMPLATE_COMM):
            if time.monotonic() - start >= patience[0]:
                return False
            time.sleep(0.001)
        return True
    finally:
        patience[0] = max(0.0, patience[0] - (time.monotonic() - start))


def cpu_code():
    """What the template process imports to fork CPU processes: their code, and what it runs on."""
    from smpd.kernel.cpu import Cpu, cpu_main
    from smpd.kernel.generations import Generations
    from smpd.machine.bus import Bus
    from smpd.machine.core import install_interrupt_handlers
    from smpd.machine.segment import Segment

    return Cpu, cpu_main, Generations, Bus, Segment, install_interrupt_handlers


def template_main(spec: dict) -> None:
    """The template: fork each CPU asked for, answer its pid, until the coordinator hangs up."""
    die_with_parent(spec["coordinator"])
    set_process_name(TEMPLATE_COMM)
    Cpu, cpu_main, Generations, Bus, Segment, install_interrupt_handlers = cpu_code()  # while the segment is made
    sock = socket.socket(fileno=spec["socket_fd"])
    attached, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
    if not fds:  # the coordinator hung up first
        os._exit(0)
    attached = json.loads(attached)
    spec["signals"] = attached["signals"]
    install_interrupt_handlers(spec["signals"])  # every CPU process's, blocked until its CPU takes them
    seg = Segment.inherit(attached["segment"], fds[0])
    bus = Bus(seg)
    gens = Generations(seg)
    from smpd.machine.hotpath import compiled

    fork_cpus = _forkloop.fork_cpus if _forkloop is not None and compiled(seg) else _fork_cpus
    while request := sock.recv(seg.geo.ncpus * _PAIR.size):
        # The memory map every CPU process we fork starts in, built once here rather than by each
        # at its smp_callin() (~220 us and ~35 page faults a CPU): generation 1's, which `smpd up`
        # boots and which the reset that respawns CPUs boots again, and which each CPU learns with
        # its entry (Handoff.learn_boot). Cached by that entry, so another kernel's is never
        # mistaken for it.
        try:
            entry = gens.entry(1)
            first = entry, gens.map_of(entry)
        except LookupError:  # not in the table any more (a long chain): each CPU builds its own
            first = None
        for at in range(0, len(request), BUILT_AHEAD * _PAIR.size):
            part = request[at:at + BUILT_AHEAD * _PAIR.size]
            built = {cpu: Cpu(seg, bus, cpu, spec["signals"], gens) for cpu, _core in _PAIR.iter_unpack(part)}
            starts = {}
            if first is not None:  # each CPU's first SIPI into generation 1 taken by its compiled wait
                for me in built.values():
                    me.learn_boot(*first)
                if fork_cpus is not _fork_cpus:  # and its first wait made by the compiled fork loop
                    starts = {cpu: calls for cpu, core in _PAIR.iter_unpack(part)
                              if (calls := built[cpu].first_wait_calls(True, None if core < 0 else core))}
            gc.freeze()  # what the CPUs inherit stays out of their collector (and so uncopied)
            child = fork_cpus(sock.fileno(), part, spec["coordinator"], CPU_COMM, *((starts,) if starts else ()))
            if child is not None:  # a CPU process
                cpu, core, *came = child
                try:
                    cpu_main(built[cpu], None if core < 0 else core, *came)
                finally:
                    os._exit(70)
            del built, starts  # their pages are the template's again (a copy-on-write fault each), for the next
    os._exit(0)


def _fork_cpus(sock: int, request: bytes, parent: int, comm: str) -> tuple[int, int] | None:
    """The Python peer of smpd.daemon._forkloop.fork_cpus (its docstring says what both do), run on
    a machine of the Python hot path: (cpu, core) in each CPU process, None here once all are
    forked, or at the first the host refuses (answered (cpu, -errno)). Each CPU process waits on
    a pipe until its answer is sent: one whose answer never left (the template killed between
    the two) exits at once, so every CPU process that runs is one the coordinator was told of."""
    for cpu, core in _PAIR.iter_unpack(request):
        try:
            told_r, told_w = os.pipe()
        except OSError as err:
            os.write(sock, _PAIR.pack(cpu, -err.errno))
            return None
        try:
            pid = fork_sibling()
        except OSError as err:
            os.close(told_r)
            os.close(told_w)
            os.write(sock, _PAIR.pack(cpu, -err.errno))
            return None
        if pid == 0:
            try:
                die_with_parent(parent)
                set_process_name(f"{comm}{cpu}")
                os.close(told_w)
                told = os.read(told_r, 1)
                os.close(told_r)
            except BaseException:  # a CPU process must never go on as the template
                os._exit(70)
            if not told:
                os._exit(0)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # as the compiled loop's child does
            return cpu, core
        os.close(told_r)
        os.write(sock, _PAIR.pack(cpu, pid))
        try:
            os.write(told_w, b"!")
        except BrokenPipeError:  # the child died already (killed, or its parent was not ours): answered
            pass
        os.close(told_w)
    return None


if __name__ == "__main__":
    template_main(json.loads(sys.argv[1]))
