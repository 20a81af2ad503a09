"""Cross-process ordering primitives: a full memory fence, and futex wait/wake on segment words.

Why these two and nothing more. Waking a sleeper is the classic store-then-load
race: the waker stores "you have work" then loads "are you asleep?", the sleeper
stores "I am asleep" then loads "do I have work?". x86 keeps stores in a store
buffer and lets a later load pass them (TSO's one reordering), so without a full
fence on both sides each can miss the other and a wake-up is lost.

* ``fence()``: CPython gives no fence, but every lock operation is a locked
  read-modify-write (glibc sem_trywait/sem_post under ``_thread`` locks), and on
  x86 a locked instruction drains the store buffer: a full fence for ~100-200 ns.
* ``futex_wait`` / ``futex_wake``: the segment is a shared mapping, so a plain
  (non-PRIVATE) futex on a word of it works across processes and needs no named
  object that could leak. FUTEX_WAIT re-checks the word against the expected value
  under the kernel's futex lock, so "check then sleep" is atomic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import _thread

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_fence_lock = _thread.allocate_lock()


def fence() -> None:
    """Full memory barrier (see the module comment for why a lock is one)."""
    _fence_lock.acquire()
    _fence_lock.release()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def base_address(mm: mmap.mmap) -> int:
    """The address where ``mm`` is mapped in this process (to name futex words)."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the mmap can be closed later


def futex_wait(addr: int, expected: int, timeout_ns: int | None = None) -> bool:
    """Sleep while the u32 at ``addr`` equals ``expected``.

    Returns False on timeout, True otherwise (woken, value differed, or a signal
    arrived: the caller re-checks its condition in every case, as with MWAIT).
    """
    if _SYS_FUTEX is None:  # pragma: no cover - other architectures
        raise OSError(errno.ENOSYS, f"futex syscall number unknown on {platform.machine()}")
    ts = None
    if timeout_ns is not None:
        ts = ctypes.byref(_Timespec(timeout_ns // 1_000_000_000, timeout_ns % 1_000_000_000))
    r = _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT,
                      ctypes.c_uint32(expected), ts, None, 0)
    if r == -1:
        e = ctypes.get_errno()
        if e == errno.ETIMEDOUT:
            return False
        if e not in (errno.EAGAIN, errno.EINTR):
            raise OSError(e, os.strerror(e))
    return True


def futex_wake(addr: int, count: int = 1) -> int:
    """Wake up to ``count`` sleepers on the u32 at ``addr``; returns how many woke."""
    r = _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, count, None, None, 0)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
