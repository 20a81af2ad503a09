"""Process facts every process of ours sets on itself: its name, and that it dies with its parent.

Used by CPU processes, the janitor, load generators and the hardware-floor probe,
so that `ps` names each one and none outlives the process that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


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
