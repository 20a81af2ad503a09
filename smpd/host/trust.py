"""Acting only on what is provably ours: files, processes and channel peers (DESIGN §7).

smpd runs on shared hosts, often as root. Every name it uses can be taken by
someone else first: /dev/shm is world-writable (sticky: others cannot remove our
entries, but they can create any name we have not created yet, including a
symbolic link), abstract socket names belong to whoever binds them first, and a
pid written in a file is only a number. Root's smpd can signal any process and
unlink any file, so believing a name is how another user makes root kill an
arbitrary process (issue 10: a forged segment listing a victim as "CPU 1").

The options were: hide everything in a 0700 per-user directory (POSIX shared
memory has no directories; a socket file there is one more thing a SIGKILL leaves
behind), or keep the flat names and verify before acting. We verify, at the
point of use, against facts another user cannot forge:

* A /dev/shm entry is believed only after ``fstat`` of the descriptor we opened
  says: a regular file, owned by our effective uid, no group or other bits.
  ``shm_open`` opens with O_NOFOLLOW (glibc), so a symbolic link fails with ELOOP
  before anything is read; ``lstat`` then names who made it.
* A process is signalled only when psutil says it runs as our uid, has the comm
  that we gave it, was created at the time recorded for it, and sits in the
  session of the coordinator that started it. The session stands in for the
  parent: a CPU process outlives its coordinator only as an orphan, re-parented
  to init, but its session id is inherited and cannot be joined from outside.
* A channel peer is believed only when SO_PEERCRED gives our uid and the pid of
  the coordinator named in a segment we verified (see smpd.channel).

What is ours is left alone otherwise too: an entry that is not ours is never
unlinked, even by root, and gets one ``Error:`` line that names its owner.
"""

from __future__ import annotations

import functools
import os
import pwd
import signal
import stat

import psutil

from smpd.errors import NotOurs
from smpd.host.proc import PID_MAX, stat_fields


def me() -> int:
    """The uid whose files and processes are ours: the effective one, as the kernel sees it."""
    return os.geteuid()


def describe_uid(uid: int) -> str:
    try:
        return f"user '{pwd.getpwuid(uid).pw_name}' (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def foreign(st: os.stat_result, path: str, what: str, remedy: str) -> NotOurs | None:
    """The refusal for an entry (from lstat or fstat) that is a link or another user's, else None."""
    if stat.S_ISLNK(st.st_mode):
        return NotOurs(f"{path} is a symbolic link made by {describe_uid(st.st_uid)}, not {what}: smpd "
                       f"does not follow it and will not remove it; {remedy}")
    if st.st_uid != me():
        return NotOurs(f"{path} belongs to {describe_uid(st.st_uid)}, not to you: smpd will not read, "
                       f"signal or remove it; {remedy}")
    return None


def check_stat(st: os.stat_result, path: str, what: str, remedy: str) -> None:
    """Raise NotOurs unless ``st`` is a regular file of ours with no group or other access."""
    refusal = foreign(st, path, what, remedy)
    if refusal is not None:
        raise refusal
    if not stat.S_ISREG(st.st_mode):
        raise NotOurs(f"{path} is not {what} (it is not a regular file); smpd leaves it alone; {remedy}")
    if st.st_mode & 0o077:
        raise NotOurs(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, but smpd makes {what} 0600 and "
                      f"trusts no other; {remedy}")
    if st.st_nlink != 1:  # a second name for one of our files (fs.protected_hardlinks=0 lets anyone make one)
        raise NotOurs(f"{path} has {st.st_nlink} names (hard links), but smpd makes {what} with one: it may "
                      f"be another machine's under a second name; smpd will not trust it; {remedy}")


def refuse_entry(path: str, what: str, remedy: str) -> NotOurs | None:
    """The NotOurs error for an entry we could not open (a link, a directory, a socket, another
    user's file), judged by lstat; None when it is a regular file of ours (the error is then the story)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    refusal = foreign(st, path, what, remedy)
    if refusal is None and not stat.S_ISREG(st.st_mode):
        refusal = NotOurs(f"{path} is not {what} (it is not a regular file); smpd leaves it alone; {remedy}")
    return refusal


START_TOLERANCE_TICKS = 1  # a time namespace's offset need not be whole ticks: one tick of rounding


@functools.cache
def _boottime_offset_ticks() -> int:
    """Our time namespace's boot-time offset, in clock ticks (/proc/self/timens_offsets; 0 without
    time namespaces): what the kernel adds to every start time it shows us."""
    try:
        with open("/proc/self/timens_offsets") as f:
            for line in f:
                clock, secs, nsecs = line.split()
                if clock == "boottime":
                    return round((int(secs) + int(nsecs) / 1e9) * os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        pass
    return 0


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since the host booted (/proc/PID/stat field 22, less our
    time namespace's boot-time offset, which the kernel adds to it for us); 0 when it cannot be
    read. With the pid, a process's identity: a recycled pid starts later; the same process reads
    the same from every time namespace. Not psutil's create_time(), which adds the wall-clock boot
    time of *now*: a clock step (settimeofday, an NTP step, a VM resumed) or a day of NTP slewing
    moves it, and our own machine would then look stale."""
    fields = stat_fields(pid)
    try:
        return int(fields[19]) - _boottime_offset_ticks() if fields is not None else 0  # starttime: field 22
    except (ValueError, IndexError):
        return 0


def is_our_process(pid: int, start: int, name: str | None = None, sid: int | None = None) -> bool:
    """True when ``pid`` is a live process of ours that started at ``start`` (clock ticks since
    boot, ``start_ticks``), named ``name`` and in session ``sid`` when given. A zombie, a recycled
    pid or another user's process (a set-uid one they started included) is not."""
    if not 0 < pid <= PID_MAX or not start:  # a word read from a segment may be any u32
        return False
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            # Real uid too: a set-uid program another user started (their `su` behind a link named
            # smpd-coord) runs with our effective uid, but is theirs (hostile review).
            if p.status() == psutil.STATUS_ZOMBIE or set(p.uids()[:2]) != {me()}:
                return False
            if abs(start_ticks(pid) - start) > START_TOLERANCE_TICKS:
                return False
            if name is not None and p.name() != name:
                return False
        return sid is None or os.getsid(pid) == sid
    except (psutil.Error, OSError):
        return False


def signal_ours(pid: int, sig: int, start: int, name: str | None = None, sid: int | None = None) -> bool:
    """Send ``sig`` to ``pid`` only if it is the process of ours we mean; True if sent.

    A pidfd is opened first and the identity checked after: the pidfd pins that
    process, so the pid cannot be recycled between the check and the signal."""
    if not 0 < pid <= PID_MAX:
        return False
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not is_our_process(pid, start, name, sid):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
