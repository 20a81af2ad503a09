"""Where the compiled hot path leaves a CPU, and what it needs to know to take it there.

smpd/machine/_hotpath.c makes some of the kernel's steps inside a CPU's wait, with no
interpreter running: the acknowledgement of a kick in mwait_play_dead() and the way into
HLT (an Ack); an INIT, alone or followed by a SIPI (and a CPU_DOWN), through wait-for-SIPI
into running, or parked in mwait_play_dead() again, in a generation the Python path has
started this CPU in before, or generation 1 as the template found it before the CPU's process
ran, a CPU_DOWN alone from running into mwait_play_dead() there, and a REBOOT alone from running
through stop_this_cpu() into HLT (an Init). This mixin of smpd.kernel.cpu.Cpu hands the
compiled path what it needs (``_kick_ack``, ``_learn_start``, ``learn_boot``) and takes the CPU
on from the state the compiled path left it in (``_init_taken``), at the wake-up that came next.
"""

from __future__ import annotations

import functools

from smpd.kernel.memmap import TEXT_PLAY_DEAD, MemoryMap
from smpd.machine import hotpath, layout as L


class Woken(functools.partial):
    """A state to enter with a wake-up its predecessor's wait returned (the compiled path took what
    came before it): the mask holds that wake-up's IPI, so run() raises no byte for it again."""


class Handoff:
    """The compiled path's share of a CPU's states (see the module's docstring)."""

    def _kick_ack(self, m: MemoryMap | None = None):
        """The compiled path's acknowledgement of a kick in mwait_play_dead() of map ``m`` (the
        running map unless given); None on a Python machine: mwait_play_dead()'s branch after
        mwait() acknowledges there."""
        m = self.map if m is None else m
        try:
            return self.kick_acks[m]
        except KeyError:
            a = self.kick_acks[m] = hotpath.ack(self.seg, self.cpu, m.mwait_cpu_dead_addr(self.cpu),
                                                self._plan(TEXT_PLAY_DEAD, m).checks)
        return a

    def _learn_start(self) -> None:
        """start_secondary() started this CPU in its generation (not one that kernel parks at boot):
        from now on the compiled path may take its INIT and SIPI (and CPU_DOWN) into it (take_init):
        in the fix's kernels with smp_callin()'s clear of mwait_cpu_dead and the park's Ack; in the
        pre-fix kernel, parked on its thread_info line with no kick to answer."""
        self._learn(self.started_in, self.map)  # the entry smp_callin() built its map from

    def learn_boot(self, entry: bytes, m: MemoryMap) -> None:
        """Before this CPU's process runs (smpd.daemon.template builds the CPU there): the compiled
        path may take its first INIT and SIPI (and CPU_DOWN) into generation ``m``, built from
        ``entry`` as the table held it, as it takes every later one in a generation
        start_secondary() has run in (``_learn_start``); not where that kernel parks this CPU
        once up (a nosmt sibling: play_dead() is the Python path's). take_init() compares the
        entry with the table's at each SIPI: into any other generation, or into this one
        rewritten since (Kexec.become), the SIPI is the Python path's. A CPU process then runs
        no Python from its first wait until the next wake-up after the bring-up: at 1024 CPUs,
        ~375 -> ~225 page faults and ~2.0 -> ~1.0 ms of host CPU each."""
        if not m.boot.smt_sibling(self.cpu):
            self._learn(entry, m)

    def _learn(self, entry: bytes, m: MemoryMap) -> None:
        if self.init_taker is not None:
            self.init_taker.learn(entry, m.monitor_addr(self.cpu) - L.PHYS_BASE,
                                  None if m.boot.monitors_thread_info else self._kick_ack(m))

    def _init_taken(self, mask: int) -> Woken:
        """The compiled path took an INIT while this state waited (core.wait's ``init``):
        init_reset()'s stores and event and wait-for-SIPI's state are made; so, when a SIPI came
        with it, are start_secondary()'s and smp_callin()'s, in the generation the CPU records
        (cpu_gen), and, when a CPU_DOWN followed, play_dead()'s and mwait_play_dead()'s up to
        its MONITOR; and the acknowledgement. What is left is this process's own part of those;
        returned is the state to enter with ``mask``, the wake-up that came next."""
        state, self.init_ns, self.acked_ns = self.init_state, 0, 0
        self.armed_line = -1  # disarmed, if MWAIT's MONITOR was (the compiled path counted that wake-up)
        self.nmi_blocked = False
        if state == L.ExecState.WAIT_FOR_SIPI:
            return Woken(self.wait_for_sipi, woken_with=mask)
        self.started_in = self.init_entry  # the entry of the generation the take started it in
        self.map = self.gens.map_of(self.started_in)
        self.gen = self.map.gen
        if state == L.ExecState.RUNNING:
            return Woken(self.running, woken_with=mask)
        if state == L.ExecState.HLT:  # kicked once parked, or stopped by REBOOT: the compiled path halted it
            return Woken(self.hlt, halted_with=mask)
        # armed: the line that kernel's mwait_play_dead() watches in that map (not a segment word's say-so)
        self.armed_line = (self.map.monitor_addr(self.cpu) - L.PHYS_BASE) // L.LINE
        return Woken(self.mwait_play_dead, woken_with=mask)
