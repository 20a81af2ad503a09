"""The janitor, and what it shares with `smpd up`/`down`: cleaning up after a dead coordinator.

The janitor is a tiny process that outlives its coordinator only to clean up after a
SIGKILL: it blocks on a pipe whose write end only the coordinator holds, and on EOF
removes the segment if it still names that coordinator. ``clean_stale_segment`` is
that clean-up, and the CLI's stale-machine recovery (smpd.tools.lifecycle) too.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import stat
import sys
import time
from typing import Callable

import posix_ipc

from smpd.daemon.stopping import STOP_SIGNALS
from smpd.errors import SmpdError
from smpd.host import names, trust
from smpd.host.proc import fork_refused, set_process_name
from smpd.machine.segment import Segment, SegmentBeingCreated, unlink

COORDINATOR_COMM = "smpd-coord"  # the coordinator's process name: part of its identity (smpd.host.trust)
JANITOR_DONE = b"x"  # written on a clean shutdown: the janitor leaves without touching anything
# A header is written microseconds after shm_open(); one still blank this long belongs to a
# coordinator that died in between, and may be removed by any smpd of this user.
INCOMPLETE_STALE_S = 5.0


def is_coordinator(pid: int, start: int) -> bool:
    """True while ``pid`` is our coordinator that started at ``start`` (ticks since boot; a recycled pid did not)."""
    return trust.is_our_process(pid, start, name=COORDINATOR_COMM)


def wait_gone(pid: int, start: int, timeout_s: float) -> bool:
    """Wait (bounded) until our process ``pid`` that started at ``start`` (ticks since boot) has exited."""
    deadline = time.monotonic() + timeout_s
    while trust.is_our_process(pid, start):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def clean_stale_segment(seg_name: str, expect_pid: int, expect_start: int, lock_wait_s: float = 2.0) -> list[int]:
    """Kill the leftovers of a dead coordinator and unlink its segment. Returns the pids killed.

    Only acts on a segment of ours (Segment.attach verifies it) that still names that
    coordinator (a new machine may have taken the name since), when that coordinator
    is not running; and signals only CPU processes that smpd.host.trust recognises as
    the ones this machine started: our uid, comm smpd-cpuN, the recorded creation
    time, the coordinator's session. Cleaners take turns (``_locked``) and unlink only
    the very file they checked, never a new machine's made under the same name meanwhile.
    """
    fd = _locked(seg_name, lock_wait_s)
    if fd is None:
        return []
    killed: list[int] = []
    try:
        try:
            seg = Segment.attach(seg_name)
        except (posix_ipc.ExistentialError, SmpdError):
            return []
        try:
            if not same_file(seg_name, fd):
                return []
            if seg.hdr("coordinator_pid") != expect_pid or seg.hdr("coordinator_start") != expect_start:
                return []
            if is_coordinator(expect_pid, expect_start):
                return []
            sid = seg.hdr("coordinator_sid")
            for cpu in range(1, seg.geo.ncpus):
                pid, start = seg.cb(cpu, "pid"), seg.cb(cpu, "start_ticks")
                if pid and trust.signal_ours(pid, signal.SIGKILL, start, name=f"smpd-cpu{cpu}", sid=sid):
                    killed.append(pid)
        finally:
            seg.close()
        if same_file(seg_name, fd):
            unlink(seg_name)
        return killed
    finally:
        os.close(fd)


def clean_incomplete(seg_name: str, lock_wait_s: float = 2.0) -> str:
    """Unlink a segment of ours whose header is still blank INCOMPLETE_STALE_S after it was made:
    its coordinator died between shm_open() and writing it (nobody else knows whose it was).

    Returns "removed", "young" (blank, but not for long enough yet), or "other" (absent,
    complete, not ours, or locked by someone who will see to it)."""
    fd = _locked(seg_name, lock_wait_s)
    if fd is None:
        return "other"
    try:
        try:
            Segment.attach(seg_name).close()
            return "other"  # complete: a machine's, live or stale, judged elsewhere
        except SegmentBeingCreated:
            pass
        except (posix_ipc.ExistentialError, SmpdError):
            return "other"
        if not same_file(seg_name, fd):
            return "other"
        if time.time() - os.fstat(fd).st_ctime < INCOMPLETE_STALE_S:
            return "young"
        unlink(seg_name)
        return "removed"
    finally:
        os.close(fd)


def _locked(seg_name: str, wait_s: float) -> int | None:
    """A descriptor on our segment file, held under flock(LOCK_EX) so cleaners take turns; None
    when it is not there, not ours, or still locked after ``wait_s`` (a soak's lock, or another
    cleaner: it will do the job)."""
    path = names.SHM_DIR + seg_name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    deadline = time.monotonic() + wait_s
    try:
        trust.check_stat(os.fstat(fd), path, "an smpd segment", "")
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
    except SmpdError:
        pass
    os.close(fd)
    return None


def same_file(seg_name: str, fd: int) -> bool:
    """Is the name still the file ``fd`` holds? (An unlinked one may have a successor by now.)"""
    try:
        st = os.lstat(names.SHM_DIR + seg_name)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def janitor_main(r: int, w: int, seg_name: str, coord_pid: int, coord_start: int, close: list[int]) -> None:
    """Block until the coordinator is gone; if it went without cleaning up, clean up after it.

    It leaves the coordinator's session and process group first: a signal to that group (a
    service manager's stop, `timeout -s KILL`, `kill -9 -- -PGID`) must leave it to do its job."""
    os.setsid()
    set_process_name("smpd-janitor")
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # it leaves by itself as soon as its job is done
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for fd in (w, *close, *_sockets()):  # the pipe's write end, what only the coordinator may hold
        try:  # open, and any socket: a client's connection a reply thread (smpd.daemon.channel) was
            os.close(fd)  # still sending on when the coordinator forked us would stay open for our life
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
        wait_gone(coord_pid, coord_start, 10.0)
        clean_stale_segment(seg_name, expect_pid=coord_pid, expect_start=coord_start, lock_wait_s=10.0)
        # Killed between shm_open() and its header (the janitor starts first): wait out the
        # blank header's grace, then remove it if it is still blank.
        deadline = time.monotonic() + INCOMPLETE_STALE_S + 2.0
        while clean_incomplete(seg_name) == "young" and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os._exit(0)


def _sockets() -> list[int]:
    """This process's socket descriptors (it needs none: it reads a pipe and opens the segment anew)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                fds.append(int(name))
        except OSError:  # (the directory's own descriptor, closed by now)
            pass
    return fds


class Janitor:
    """The coordinator's handle on its janitor process: start it, replace it at once if anyone
    kills it (so that a coordinator killed later still has someone to clean up after it), and
    release it at the end (JANITOR_DONE: the coordinator cleaned up itself)."""

    def __init__(self, ctx, seg_name: str, coord_pid: int, coord_start: int):
        self.ctx, self.seg_name, self.coord_pid, self.coord_start = ctx, seg_name, coord_pid, coord_start
        self.process = None
        self.w: int | None = None  # our end of its pipe: a descriptor no child may inherit
        self.watched: int | None = None  # the sentinel registered in the serving loop's selector (tend)
        self.refused = False  # the host refused the last new janitor (said once)

    def start(self, close: list[int]) -> int:
        """Fork it (it closes ``close``: what only the coordinator may hold open); its pid.
        OSError when the host refuses the process."""
        r, w = os.pipe()
        try:
            process = self.ctx.Process(target=janitor_main, name="smpd-janitor", daemon=True,
                                       args=(r, w, self.seg_name, self.coord_pid, self.coord_start, close))
            process.start()
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self.process, self.w = process, w
        return process.pid

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        """Readable the moment it dies (for the coordinator's select loop)."""
        return self.process.sentinel

    def gone(self) -> bool:
        return self.process is not None and not self.process.is_alive()

    def tend(self, sel: selectors.BaseSelector, close: Callable[[], list[int]]) -> int | None:
        """Between two requests of the serving loop: replace a janitor that is gone (killed by anyone;
        it closes what ``close()`` gives once the old one is reaped, as start's), and keep the live
        one's sentinel in ``sel``, so that the loop wakes the moment it dies. When the host refuses
        the process (every pid taken by someone), the machine goes on without one, said once on
        stderr, and the next call (within the loop's second) tries again: another user's fork bomb
        must not take the machine down with it. Returns the new janitor's pid, if one was started,
        0 when none runs now (refused)."""
        pid = None
        if self.process is None or self.gone():
            if self.watched is not None:
                sel.unregister(self.watched)
                self.watched = None
            if self.process is not None:
                self.reap()
            try:
                pid = self.start(close())
            except OSError as err:
                if not self.refused:
                    print(f"smpd-coord: {fork_refused(err, 'a new janitor')}; the machine goes on without one "
                          f"and tries again each second", file=sys.stderr)
                self.refused = True
                return 0
            self.refused = False
        if self.watched is None:
            self.watched = self.process.sentinel
            sel.register(self.watched, selectors.EVENT_READ, "janitor")
        return pid

    def reap(self) -> None:
        """After gone(): collect the dead one before a new one is started."""
        self.process.join(0)
        self.process.close()
        os.close(self.w)
        self.w, self.process = None, None

    def release(self) -> None:
        """Tell it the coordinator cleaned up, and wait (bounded) for it to leave."""
        if self.process is None:
            return
        try:
            os.write(self.w, JANITOR_DONE)
        except OSError:
            pass
        os.close(self.w)
        self.w = None
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.process = None
