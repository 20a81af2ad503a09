"""The janitor, and what it shares with `smpd up`/`down`: cleaning up after a dead coordinator.

The janitor is a tiny process that outlives its coordinator only to clean up after a
SIGKILL: it blocks on a pipe whose write end only the coordinator holds, and on EOF
removes the segment if it still names that coordinator. ``clean_stale_segment`` is
that clean-up, and the CLI's stale-machine recovery (smpd.tools.lifecycle) too.
"""

from __future__ import annotations

import os
import signal
import time

import posix_ipc

from smpd.daemon.stopping import STOP_SIGNALS
from smpd.errors import SmpdError
from smpd.host import trust
from smpd.host.proc import set_process_name
from smpd.machine.segment import Segment, unlink

COORDINATOR_COMM = "smpd-coord"  # the coordinator's process name: part of its identity (smpd.host.trust)
JANITOR_DONE = b"x"  # written on a clean shutdown: the janitor leaves without touching anything


def is_coordinator(pid: int, ctime: float) -> bool:
    """True while ``pid`` is our coordinator created at ``ctime`` (a recycled pid is not)."""
    return trust.is_our_process(pid, ctime, name=COORDINATOR_COMM)


def wait_gone(pid: int, ctime: float, timeout_s: float) -> bool:
    """Wait (bounded) until our process ``pid`` created at ``ctime`` has exited."""
    deadline = time.monotonic() + timeout_s
    while trust.is_our_process(pid, ctime):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def clean_stale_segment(seg_name: str, expect_pid: int, expect_ctime: float) -> list[int]:
    """Kill the leftovers of a dead coordinator and unlink its segment. Returns the pids killed.

    Only acts on a segment of ours (Segment.attach verifies it) that still names that
    coordinator (a new machine may have taken the name since), when that coordinator
    is not running; and signals only CPU processes that smpd.host.trust recognises as
    the ones this machine started: our uid, comm smpd-cpuN, the recorded creation
    time, the coordinator's session.
    """
    try:
        seg = Segment.attach(seg_name)
    except (posix_ipc.ExistentialError, SmpdError):
        return []
    killed: list[int] = []
    try:
        if seg.hdr("coordinator_pid") != expect_pid or abs(seg.hdr("coordinator_ctime") - expect_ctime) > 0.05:
            return []
        if is_coordinator(expect_pid, expect_ctime):
            return []
        sid = seg.hdr("coordinator_sid")
        for cpu in range(1, seg.geo.ncpus):
            pid, ctime_ms = seg.cb(cpu, "pid"), seg.cb(cpu, "ctime_ms")
            if pid and trust.signal_ours(pid, signal.SIGKILL, ctime_ms / 1000, name=f"smpd-cpu{cpu}", sid=sid):
                killed.append(pid)
    finally:
        seg.close()
    unlink(seg_name)
    return killed


def janitor_main(r: int, w: int, seg_name: str, coord_pid: int, coord_ctime: float, close: list[int]) -> None:
    """Block until the coordinator is gone; if it went without cleaning up, clean up after it."""
    set_process_name("smpd-janitor")
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # it leaves by itself as soon as its job is done
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for fd in (w, *close):  # the pipe's write end, and what only the coordinator may hold open
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        data = os.read(r, 1)
    except OSError:
        data = b""
    if data == JANITOR_DONE:
        os._exit(0)
    try:
        # EOF comes when the coordinator's files close, a moment before it is a zombie.
        wait_gone(coord_pid, coord_ctime, 10.0)
        clean_stale_segment(seg_name, expect_pid=coord_pid, expect_ctime=coord_ctime)
    finally:
        os._exit(0)
