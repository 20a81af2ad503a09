"""Progress on a terminal while a big machine comes up (`smpd up`), kexecs or resets.

A bring-up of thousands of CPUs takes seconds (4096 CPUs: 6-9 s on the 2-core host), and the
coordinator answers `up` only once every CPU is online; a kexec of 4096 parked CPUs takes 10 s,
most of it the new kernel starting each AP. Meanwhile the command reads the machine's segment,
attached as every command attaches it (smpd.machine.segment: its owner checked before a byte is
read), each time its wait for the answer ticks. For `up`: how many CPU processes are forked
(their pid in their control block, which the coordinator writes as it adopts each), then how
many APs are online. For `kexec`, `chain` and `reset`: how many APs are online in the generation
the header names (the old one until the new kernel boots, then the new one's, as its smp_init()
starts them; generation 1's again at a reset).
It draws that on stderr (rich), transient: gone once the answer comes. Only on a terminal, and
only from SHOW_AFTER_S on: a small machine draws nothing. The segment of a machine coming up
exists only once its coordinator has started (~1 s into a bring-up here), so the first draw
comes then.
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
        self.task = None
        self.lost = False  # its terminal went away: the bring-up goes on, undrawn

    def _attached(self) -> bool:
        """Is the machine's segment attached (attached now if it can be: not while it is not made
        yet, or being made)?"""
        if self.seg is None:
            import posix_ipc

            from smpd.machine.segment import Segment

            try:
                self.seg = Segment.attach(names.segment(self.name))
            except (posix_ipc.Error, BadInput, OSError):
                return False
        return True

    def _values(self, field: str) -> list[int]:
        """A control-block word of each CPU, 0 to the last the segment and ``ncpus`` both have."""
        words, i0, step = self.seg.cb_column(field)
        return words[i0:i0 + min(self.ncpus, self.seg.geo.ncpus) * step:step].tolist()

    def counts(self) -> tuple[int, int] | None:
        """(CPU processes forked, CPUs online), or None while the machine's segment cannot be read."""
        if not self._attached():
            return None
        forked = self._values("pid")[1:]
        return len(forked) - forked.count(0), self._values("hotplug").count(L.Hotplug.ONLINE)

    def said(self, counts: tuple[int, int]) -> tuple[str, int]:
        """What to draw of ``counts``: its description and how many of the APs are done."""
        forked, online = counts
        return ("CPU processes forked", forked) if forked < self.ncpus - 1 else ("APs online", max(0, online - 1))

    def tick(self) -> None:
        """Draw the counts now, once SHOW_AFTER_S have passed and the segment is there: the CPU
        processes forked, then, once all are, the APs online (their SIPIs come after the last
        fork). A terminal that can no longer be written ends the drawing, not the bring-up."""
        if self.lost or time.monotonic() < self.show_at or (counts := self.counts()) is None:
            return
        aps = self.ncpus - 1
        what, done = self.said(counts)
        try:
            if self.progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

                self.progress = Progress(TextColumn("{task.description:<21}"), BarColumn(), MofNCompleteColumn(),
                                         console=self.console, transient=True, auto_refresh=False,
                                         redirect_stdout=False, redirect_stderr=False)  # sys.stdout stays ours
                self.task = self.progress.add_task(what, total=aps)
                self.progress.start()
            self.progress.update(self.task, description=what, completed=done)
            self.progress.refresh()
        except OSError:  # EIO: the terminal is gone (a closed window whose SIGHUP was ignored)
            self.lost = True
            self._erase()

    def close(self) -> None:
        """Erase what was drawn; let go of the segment."""
        try:
            self._erase()
        finally:
            if self.seg is not None:
                self.seg.close()
                self.seg = None

    def _erase(self) -> None:
        progress, self.progress = self.progress, None
        if progress is not None:
            try:
                progress.stop()
            except OSError:  # nothing to erase on a terminal that is gone
                pass


class GenerationProgress(BringUpProgress):
    """`smpd kexec`'s, `chain`'s and `reset`'s: the APs online in the generation the header names
    (CPU 0 aside)."""

    def counts(self) -> tuple[int, int] | None:
        """(the generation the header names, its APs online), or None while the segment cannot be read."""
        if not self._attached():
            return None
        gen = self.seg.hdr("generation")
        aps = zip(self._values("cpu_gen")[1:], self._values("hotplug")[1:])
        return gen, sum(1 for g, h in aps if g == gen and h == L.Hotplug.ONLINE)

    def said(self, counts: tuple[int, int]) -> tuple[str, int]:
        gen, online = counts
        return f"generation {gen}: APs online", online
