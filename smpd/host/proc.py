"""Process facts every process of ours sets on itself: its name, that it dies with its parent,
and who its parent is (``fork_sibling``).

Used by CPU processes, the janitor, load generators and the hardware-floor probe,
so that `ps` names each one and none outlives the process that started it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

from smpd.errors import HostTooSmall

PID_MAX = 2**31 - 1  # pid_t's largest: a word read from a segment (any u32) above it names no process,
# and kill() would take -1 or a process group for it (os.kill, os.pidfd_open: OverflowError)
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_CLONE_PARENT = 0x00008000
_SYS_CLONE = 56  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)
_pylibc = ctypes.PyDLL(None, use_errno=True)  # calls that keep the GIL held across them
_pylibc.syscall.restype = ctypes.c_long


def set_process_name(name: str) -> None:
    """comm of this process (what ps and psutil.Process.name() show), 15 bytes at most."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """``sig`` (SIGKILL) to this process when its parent dies, even by SIGKILL (prctl PR_SET_PDEATHSIG).

    The parent may have died between fork and prctl; given ``parent_pid``, a
    getppid() that already names another process makes us leave at once.
    Without it (a subprocess preexec_fn), the exec'd program is on its own.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def fork_sibling() -> int:
    """fork(), except that the child's parent is our parent (clone CLONE_PARENT): 0 in the child,
    its pid here. Our parent then reaps it, gets its SIGCHLD, and holds its pid until it does,
    as for a child it forked itself; its PR_SET_PDEATHSIG follows our parent too.

    The same steps as os.fork() around the system call (the interpreter's fork hooks and locks,
    PyOS_BeforeFork / AfterFork), with the GIL held throughout. For a single-threaded caller
    only (smpd.daemon.template): glibc's own fork handlers do not run.
    """
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = _pylibc.syscall(_SYS_CLONE, ctypes.c_ulong(_CLONE_PARENT | signal.SIGCHLD), 0, 0, 0, 0)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid


def is_child(pid: int) -> bool:
    """Is ``pid`` a child of this process, running or exited and not yet reaped? (waitid with
    WNOWAIT, which reaps nothing; ECHILD for any other pid.)"""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def process_name(pid: int) -> str | None:
    """Process ``pid``'s name (/proc/PID/comm, what set_process_name set), or None when it cannot
    be read (the process is gone). One read of the file's 16 bytes at most, by descriptor: ~10 us,
    where open() and its buffered reader took ~25 (the coordinator asks it of each CPU process it
    adopts)."""
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64).rstrip(b"\n").decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def signal_queued(pid: int, sig: int) -> bool:
    """Does the host still hold signal ``sig`` for process ``pid``, sent but not yet delivered (its
    bit in SigPnd or ShdPnd of /proc/PID/status, which psutil does not give)? False once it is
    gone. For a process of ours only (a child not yet reaped): the pid names nobody else."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) >> (sig - 1) & 1:
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def read_all(fd: int) -> bytes:
    """All of a /proc file through ``fd``, read from its start (pread): a long Groups: line or CPU
    mask can take /proc/PID/status past a page."""
    chunks, at = [], 0
    while True:
        chunk = os.pread(fd, 16384, at)
        chunks.append(chunk)
        at += len(chunk)
        if len(chunk) < 16384:
            return b"".join(chunks)


def status_field(status: bytes, name: bytes) -> int | None:
    """A decimal field of a /proc/PID/status text (``name``: b"PPid", ...), or None."""
    at = status.find(b"\n" + name + b":")
    if at < 0:
        return None
    try:
        return int(status[at + len(name) + 2:].split(None, 1)[0])
    except (ValueError, IndexError):
        return None


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat from the 3rd (state) on, past the name, which may hold spaces
    and parentheses: ``[0]`` is field 3; None when it cannot be read (the process is gone)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = read_all(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    end = stat.rfind(b")")
    return stat[end + 2:].split() if end >= 0 else None


def cpu_time_ns(pid: int) -> int | None:
    """Host CPU time (ns) process ``pid`` has used (/proc/PID/schedstat), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def current_core() -> int:
    """The host core this process runs on now (sched_getcpu), or -1."""
    return _libc.sched_getcpu()


def last_core(pid: int) -> int:
    """The host core process ``pid`` last ran on (field 39 of /proc/PID/stat, what psutil's
    cpu_num() reads), or -1 once it is gone. One read of one file: psutil.Process(pid).cpu_num()
    reads it twice (the constructor takes the creation time from it too), 110 us a process against
    24 here; a 2048-CPU `smpd status --json` spent 0.22 s of its ~0.9 s there."""
    fields = stat_fields(pid)
    try:
        return int(fields[36]) if fields is not None else -1
    except (ValueError, IndexError):
        return -1


_SYS_RT_SIGTIMEDWAIT = 128  # x86_64: sigwaitinfo() and sigtimedwait()


def stop_state(pid: int) -> bytes | None:
    """How process ``pid`` is stopped: b"T" (SIGSTOP, a terminal's ^Z: SIGCONT goes on), b"t" (by its
    tracer, a debugger: only the tracer goes on), or None (not stopped, or gone); /proc/PID/stat."""
    fields = stat_fields(pid)
    return fields[0] if fields and fields[0] in (b"T", b"t") else None


def asleep_in_sigwait(pid: int) -> bool:
    """Is process ``pid`` asleep inside sigwaitinfo()/sigtimedwait() (its /proc/PID/syscall and
    stat)? A process woken there but not yet run is still runnable, not asleep. For a process of
    ours only (a child not yet reaped)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split(maxsplit=1)[:1] != [str(_SYS_RT_SIGTIMEDWAIT)]:
                return False
    except OSError:
        return False
    fields = stat_fields(pid)
    return bool(fields) and fields[0] == b"S"


def fork_refused(err: OSError, what: str) -> HostTooSmall:
    """The error for a process the host would not give us (fork's EAGAIN, ENOMEM; the pipe a CPU
    process waits on, EMFILE; the template's exec, EACCES...), with what to look at for its errno.
    What it leaves is the caller's to say: nothing, at a bring-up; a machine to reset again, at a reset."""
    limits = "(see `ulimit -u`, pid_max and the cgroup's pids.max)"
    why = {errno.EAGAIN: f"too many processes for this user or host {limits}",
           errno.ENOMEM: f"the host is out of memory, or of processes {limits}",
           errno.EMFILE: "too many open files for this process (see `ulimit -n`)",
           errno.ENFILE: "too many open files on the host (see fs.file-max)"}.get(err.errno)
    return HostTooSmall(f"the host refused a process for {what} ({err.strerror or err})"
                        f"{': ' + why if why else ''}")
