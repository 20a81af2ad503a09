"""The one cross-process ordering primitive smpd needs: a full memory fence.

Waking a sleeper is the classic store-then-load race: the waker stores "you
have work" then loads "are you asleep?", the sleeper stores "I am asleep" then
loads "do I have work?". x86 keeps stores in a store buffer and lets a later
load pass them (TSO's one reordering), so without a full fence on both sides
each can miss the other and a wake-up is lost.

CPython offers no fence, but every lock operation is a locked read-modify-write
(glibc sem_trywait/sem_post under ``_thread`` locks), and on x86 a locked
instruction drains the store buffer: a full fence for ~100-200 ns.
"""

from __future__ import annotations

import _thread

_fence_lock = _thread.allocate_lock()


def fence() -> None:
    """Full memory barrier (see the module comment for why a lock is one)."""
    _fence_lock.acquire()
    _fence_lock.release()
