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

import multiprocess
import multiprocess.popen_fork

from smpd.host import trust

_ctx = multiprocess.get_context("fork")


class _Adopted(multiprocess.popen_fork.Popen):
    """A child of ours by pid (see the module's docstring): no sentinel, join() polls waitpid."""

    def __init__(self, pid: int):
        self.pid, self.returncode, self.finalizer, self.sentinel = pid, None, None, None

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
    def adopt(self, pid: int) -> "CpuProcess":
        """This Process is child ``pid`` of ours, already running (forked by smpd.daemon.template)."""
        self._check_closed()
        assert self._popen is None and self._parent_pid == os.getpid()
        self._popen = _Adopted(pid)
        self._sentinel = None
        del self._target, self._args, self._kwargs
        return self

    def start_ticks(self) -> int:
        """When the process started (clock ticks since boot): with its pid, its identity
        (smpd.host.trust). Read by us, not by the CPU process: our child, unreaped, is surely
        that pid. 0, which matches nothing, when it cannot be read."""
        return trust.start_ticks(self.pid)
