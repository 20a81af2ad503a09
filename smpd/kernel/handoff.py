"""Where the compiled hot path leaves a CPU, and what it needs to know to take it there.

smpd/machine/_hotpath.c makes some of the kernel's steps inside a CPU's wait, with no
interpreter running: the acknowledgement of a kick in mwait_play_dead() and the way into
HLT (an Ack); an INIT, alone or followed by a SIPI (and a CPU_DOWN), through wait-for-SIPI
into running, or parked in mwait_play_dead() again, in a generation the Python path has
started this CPU in before (an Init). This mixin of smpd.kernel.cpu.Cpu hands the compiled
path what it needs (``_kick_ack``, ``_learn_start``) and takes the CPU on from the state the
compiled path left it in (``_init_taken``), at the wake-up that came next.
"""

from __future__ import annotations

import functools

from smpd.kernel.memmap import TEXT_PLAY_DEAD
from smpd.machine import hotpath, layout as L


class Woken(functools.partial):
    """A state to enter with a wake-up its predecessor's wait returned (the compiled path took what
    came before it): the mask holds that wake-up's IPI, so run() raises no byte for it again."""


class Handoff:
    """The compiled path's share of a CPU's states (see the module's docstring)."""

    def _kick_ack(self):
        """The compiled path's acknowledgement of a kick in mwait_play_dead() of the running map
        (None on a Python machine: mwait_play_dead()'s branch after mwait() acknowledges there)."""
        try:
            return self.kick_acks[self.map]
        except KeyError:
            a = self.kick_acks[self.map] = hotpath.ack(self.seg, self.cpu, self.map.mwait_cpu_dead_addr(self.cpu),
                                                       self._plan(TEXT_PLAY_DEAD).checks)
        return a

    def _learn_start(self) -> None:
        """start_secondary() started this CPU in its generation (not one that kernel parks at boot):
        from now on the compiled path may take its INIT and SIPI (and CPU_DOWN) into it (take_init),
        with smp_callin()'s clear of mwait_cpu_dead and, in the fix's kernels, the park's Ack."""
        if self.init_taker is not None:  # the entry smp_callin() built its map from
            self.init_taker.learn(self.started_in, self.map.mwait_cpu_dead_addr(self.cpu) - L.PHYS_BASE,
                                  None if self.map.boot.monitors_thread_info else self._kick_ack())

    def _init_taken(self, mask: int) -> Woken:
        """The compiled path took an INIT while this state waited (core.wait's ``init``):
        init_reset()'s stores and event and wait-for-SIPI's state are made; so, when a SIPI came
        with it, are start_secondary()'s and smp_callin()'s, in the generation the CPU records
        (cpu_gen), and, when a CPU_DOWN followed, play_dead()'s and mwait_play_dead()'s up to
        its MONITOR; and the acknowledgement. What is left is this process's own part of those;
        returned is the state to enter with ``mask``, the wake-up that came next."""
        state, self.init_ns, self.acked_ns = self.init_state, 0, 0
        self.armed_line = -1  # nothing was armed (the compiled path takes INIT only so)
        self.nmi_blocked = False
        if state == L.ExecState.WAIT_FOR_SIPI:
            return Woken(self.wait_for_sipi, woken_with=mask)
        self.started_in = self.init_entry  # the entry of the generation the take started it in
        self.map = self.gens.map_of(self.started_in)
        self.gen = self.map.gen
        if state == L.ExecState.RUNNING:
            return Woken(self.running, woken_with=mask)
        if state == L.ExecState.HLT:  # parked, then kicked: the compiled path halted it too
            return Woken(self.hlt, halted_with=mask)
        # armed: its mwait_cpu_dead line in that map (not a segment word's say-so)
        self.armed_line = (self.map.mwait_cpu_dead_addr(self.cpu) - L.PHYS_BASE) // L.LINE
        return Woken(self.mwait_play_dead, woken_with=mask)
