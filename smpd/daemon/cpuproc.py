"""A CPU's process, as the coordinator holds it: a multiprocess Process for a child it did not fork.

The CPU processes are forked by a lean template process (smpd.daemon.template) with
CLONE_PARENT, so each is the coordinator's own child; ``CpuProcess.adopt`` makes the pid the
template answered a multiprocess Process of the coordinator's (``is_alive``, ``exitcode``,
``join``, ``kill``, by waitpid on that pid). The coordinator keeps each in
``Coordinator.procs`` and reaps it itself (smpd.daemon.supervisor ``shutdown``). Taken as it is,
multiprocess would make a bring-up quadratic, measured at 2048 and 4096 CPUs
(bench/bench_machine.py): each ``start()`` polls every child started before (a waitpid each),
and each child costs two pipe descriptors (a sentinel, and a pipe that tells the child its
parent lives) that every later fork copies. An adopted CPU process is in no registry and has no
pipe: it dies with the coordinator by PR_SET_PDEATHSIG (smpd.host.proc), and its exit is seen
by waitpid(WNOHANG), which is all the coordinator asks.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Iterable

import multiprocess
import multiprocess.popen_fork

from smpd.host import trust
from smpd.machine import layout as L

if TYPE_CHECKING:
    from smpd.machine.segment import Segment

_ctx = multiprocess.get_context("fork")


def mark_gone(seg: Segment, cpu: int) -> None:
    """CPU ``cpu`` has no process: GONE, and no pid for a doorbell to ring (a recycled one's)."""
    seg.set_cb(cpu, "state", L.ExecState.GONE)
    seg.set_cb(cpu, "sleeping", 0)
    seg.set_cb(cpu, "pid", 0)


EXIT_LOST = 255  # the exit code of a CPU process reaped by another wait than its Process's: unknown


def maybe_gone(procs: dict[int, CpuProcess], cpus: Iterable[int]) -> list[int]:
    """Those of ``cpus`` whose process may have exited: every one once a child of ours has exited
    and waits to be reaped (one waitid(P_ALL, WNOWAIT), which reaps nothing); else those with no
    process, or one reaped already. Asking each CPU's process instead (a waitpid, and multiprocess
    around it) took 80 ms of every `smpd status` of 4096 CPUs.

    It holds while a CPU process is reaped only through its CpuProcess (``_Adopted.poll``), as
    everywhere in smpd: one reaped by any other wait would go unnoticed here while another child
    is alive. With no child at all, though, every CPU whose process is not reaped is asked."""
    try:
        quiet = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # no children, so ours were reaped elsewhere (if we hold any unreaped)
        quiet = False
    return [c for c in cpus if not quiet or (p := procs.get(c)) is None or p.reaped()]


def alive_among(procs: dict[int, CpuProcess], cpus: Iterable[int], alive: Callable[[int], bool]) -> set[int]:
    """Those of ``cpus`` whose process lives: ``alive(cpu)`` is asked only of those whose process
    may have exited (``maybe_gone``), and while none has, one waitid() answers for all. That holds
    while a CPU process is reaped only through its CpuProcess, as ``maybe_gone`` says. Asked CPU
    by CPU, a 64-CPU soak trial made ~450 liveness checks, a waitid() each: ~1.1 ms of
    coordinator CPU."""
    cpus = list(cpus)
    suspects = set(maybe_gone(procs, cpus))
    return {c for c in cpus if c not in suspects or alive(c)}


class _Adopted(multiprocess.popen_fork.Popen):
    """A child of ours by pid (see the module's docstring): no sentinel, join() polls waitpid.
    ``before_reap`` runs once it has exited and before it is reaped, while its pid is still its
    own (a zombie's): whatever names that pid is cleared before the host may hand it out again."""

    def __init__(self, pid: int, before_reap: Callable[[], None] | None = None):
        self.pid, self.returncode, self.finalizer, self.sentinel = pid, None, None, None
        self.before_reap = before_reap

    def poll(self, flag: int = os.WNOHANG):
        if self.returncode is None and self.before_reap is not None:
            try:  # exited? (WNOWAIT: it stays a zombie)
                exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | (flag & os.WNOHANG))
            except ChildProcessError:  # no child of ours by that pid any more (reaped elsewhere): gone
                exited = True
            if exited is None:
                return None
            before_reap, self.before_reap = self.before_reap, None
            before_reap()
        if self.returncode is None:  # multiprocess's poll, but for ECHILD, which it takes for "not started yet"
            try:
                pid, status = os.waitpid(self.pid, flag)
            except ChildProcessError:  # reaped by another wait: dead, its exit status lost
                self.returncode = EXIT_LOST
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        """The exit code once the process has exited; None if it has not within ``timeout``."""
        if timeout is None:
            return self.poll(0)
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(0.01, pause * 2)
        return self.returncode


class CpuProcess(_ctx.Process):
    def adopt(self, pid: int, seg: Segment | None = None, cpu: int = 0,
              before_reap: Callable[[], None] | None = None) -> "CpuProcess":
        """This Process is child ``pid`` of ours, already running (forked by smpd.daemon.template),
        CPU ``cpu`` of the machine of ``seg``. Once it has exited, and before it is reaped, wherever
        that happens (a liveness check, a respawn, the power-off): its CPU is marked gone while
        ``seg`` still names this pid, then ``before_reap`` runs. Its siblings read that word to ring
        its doorbell (smpd.machine.bus), and a reaped pid may be anyone's next process."""
        self._check_closed()
        assert self._popen is None and self._parent_pid == os.getpid()

        def exited():
            if seg is not None and seg.buf is not None and seg.cb(cpu, "pid") == pid:
                mark_gone(seg, cpu)
            if before_reap is not None:
                before_reap()

        self._popen = _Adopted(pid, exited)
        self._sentinel = None
        del self._target, self._args, self._kwargs
        return self

    def reaped(self) -> bool:
        """Reaped already by this Process (or never started): no syscall, so not a liveness check."""
        return self._popen is None or self._popen.returncode is not None

    def start_ticks(self) -> int:
        """When the process started (clock ticks since boot): with its pid, its identity
        (smpd.host.trust). Read by us, not by the CPU process: our child, unreaped, is surely
        that pid. 0, which matches nothing, when it cannot be read."""
        return trust.start_ticks(self.pid)
