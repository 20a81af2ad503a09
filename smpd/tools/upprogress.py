"""`smpd up`'s progress on a terminal, while a big machine comes up.

A bring-up of thousands of CPUs takes seconds (4096 CPUs: 7-9 s on the 2-core host), and the
coordinator answers `up` only once every CPU is online. Meanwhile `up` reads the machine's
segment, attached as every command attaches it (smpd.machine.segment: its owner checked before
a byte is read), each time its wait for the answer ticks: how many CPU processes are forked
(their pid in their control block, which the coordinator writes as it adopts each) and how many
CPUs are online. It draws them on stderr (rich), transient: gone once the machine is up, or
once the bring-up failed. Only on a terminal, and only from SHOW_AFTER_S on: a small machine
comes up without it.
"""

from __future__ import annotations

import time

from smpd.errors import BadInput
from smpd.host import names
from smpd.machine import layout as L

SHOW_AFTER_S = 0.5  # a bring-up shorter than this draws nothing


class BringUpProgress:
    def __init__(self, name: str, ncpus: int, console, show_after_s: float = SHOW_AFTER_S):
        self.name, self.ncpus, self.console = name, ncpus, console
        self.show_at = time.monotonic() + show_after_s
        self.seg = None  # the machine's segment, once there to attach
        self.progress = None  # rich's Progress, once drawn
        self.tasks: tuple = ()

    def counts(self) -> tuple[int, int] | None:
        """(CPU processes forked, CPUs online), or None while the machine's segment cannot be read
        (not made yet, being made)."""
        if self.seg is None:
            import posix_ipc

            from smpd.machine.segment import Segment

            try:
                self.seg = Segment.attach(names.segment(self.name))
            except (posix_ipc.Error, BadInput, OSError):
                return None
        pids, i0, step = self.seg.cb_column("pid")
        hotplug, j0, jstep = self.seg.cb_column("hotplug")
        forked = pids[i0 + step:i0 + self.ncpus * step:step].tolist()
        online = hotplug[j0:j0 + self.ncpus * jstep:jstep].tolist()
        return len(forked) - forked.count(0), online.count(L.Hotplug.ONLINE)

    def tick(self) -> None:
        """Draw the counts now, once SHOW_AFTER_S have passed and the segment is there."""
        if time.monotonic() < self.show_at or (counts := self.counts()) is None:
            return
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True, auto_refresh=False,
                                     redirect_stdout=False, redirect_stderr=False)  # sys.stdout stays ours
            self.tasks = (self.progress.add_task("CPU processes forked", total=self.ncpus - 1),
                          self.progress.add_task("CPUs online", total=self.ncpus))
            self.progress.start()
        for task, done in zip(self.tasks, counts):
            self.progress.update(task, completed=done)
        self.progress.refresh()

    def close(self) -> None:
        """Erase what was drawn; let go of the segment."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.seg is not None:
            self.seg.close()
            self.seg = None
