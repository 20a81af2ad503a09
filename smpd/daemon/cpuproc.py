"""A CPU's process, as the coordinator forks it: multiprocess's fork Process, less what costs O(N).

The coordinator forks N-1 of these and keeps each in ``Coordinator.procs``; it reaps them
itself (smpd.daemon.supervisor ``shutdown``). Taken as it is, multiprocess would make a
bring-up quadratic in three ways, each measured at 2048 and 4096 CPUs (bench/bench_machine.py):

* each ``start()`` polls every child started before (a waitpid each), because multiprocess
  keeps every child in its registry: a started CPU process leaves that registry;
* each child empties its copy of the parent's finalizer registry on the way in, touching one
  entry per earlier CPU (a copy-on-write fault per page of them): a CPU leaves by
  ``os._exit`` and never runs finalizers, so the registry it inherits is left untouched;
* each child costs the coordinator two pipe descriptors (a sentinel, and a pipe that tells
  the child its parent lives), which every later fork copies and every later CPU closes
  (close_range over all of them): a CPU process here has no pipe. A CPU dies with its parent
  by PR_SET_PDEATHSIG (smpd.host.proc), and its exit is seen by waitpid(WNOHANG), which is all
  the coordinator asks (``is_alive``, ``exitcode``, ``join``).
"""

from __future__ import annotations

import os
import time

import multiprocess
import multiprocess.popen_fork
import multiprocess.process
import multiprocess.util

_ctx = multiprocess.get_context("fork")


class _Popen(multiprocess.popen_fork.Popen):
    """fork, without the sentinel and parent pipes (see the module's docstring)."""

    def _launch(self, process_obj) -> None:
        code = 1
        self.pid = os.fork()
        if self.pid == 0:
            try:
                code = process_obj._bootstrap()
            finally:
                os._exit(code)
        self.sentinel = None  # nothing to select on: join() polls waitpid (wait, below)

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
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)

    def start(self) -> None:
        super().start()
        multiprocess.process._children.discard(self)

    @staticmethod
    def _after_fork() -> None:
        multiprocess.util._run_after_forkers()
