"""A soak's hold on its machine: the offline CPUs and kernel the user had when the soak began.

A soak moves the machine through its trials' offline sets and kernels (each trial's reset boots
the next trial's), and puts the user's back when it ends, even on Ctrl-C or SIGTERM. A SIGKILL
leaves nothing of the soak to do that. So the soak leaves them with the coordinator first
(`soak_hold`) and takes them back at its end. A plain `smpd reset` that finds a hold whose soak
is gone restores them, and says so; a choice the user has made since (a hotplug, `reset
--offline` or `--kernel`) drops it. While the soak runs, its machine lock keeps the user's
commands out (smpd.tools.lifecycle.machine_lock), and its own resets name their sets. A request
the soak sent just before it was killed may be answered after: it is the soak's (its client pid,
from SO_PEERCRED), not the user's choice, and drops nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from smpd.host import trust


@dataclass(frozen=True)
class SoakHold:
    offline: list[int]
    kernel: str
    pid: int  # the soak's process,
    started: int  # and its start (trust.start_ticks): a pid alone may be another process's by now

    def soak_gone(self) -> bool:
        """Gone: not a live process of ours that started then (a zombie, a recycled pid: gone too)."""
        return not trust.is_our_process(self.pid, self.started)

    def said(self) -> str:
        return (f"restored the offline CPUs and kernel you had before a soak that ended without putting them "
                f"back (its pid {self.pid}, gone now: killed, or stopped by an error)")


def orphaned(sup) -> SoakHold | None:
    """The machine ``sup``'s hold, when the soak that left it is gone."""
    hold = sup.soak_hold
    return hold if hold is not None and hold.soak_gone() else None


def from_the_soak(sup, hold: SoakHold) -> bool:
    """Is the request being answered the soak's own (one it sent just before it was killed)? Any
    other client's that sets offline CPUs or a kernel is the user's choice, and replaces the hold."""
    return sup.handlers.client_pid == hold.pid


def drop_if_users_choice(sup) -> None:
    """A hotplug: after the soak is gone, the user's own offline set replaces the hold."""
    hold = orphaned(sup)
    if hold is not None and not from_the_soak(sup, hold):
        sup.soak_hold = None
