"""The CPU's wake-up path, step by step: where a kick's microseconds go.

    python bench/profile_wake.py

One process plays both sides on a private segment (no machine needed): MONITOR,
the kick's bus write, then each step a woken CPU in mwait_play_dead() runs before
and after it acknowledges. Prints the mean cost of each step over N rounds. The
steps between "wait" and "control+ack" are the latency a kick pays on top of the
cache-line transfers (compare `smpd bench kick` and its hardware floor).
"""

from __future__ import annotations

import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smpd import config
from smpd.machine import events, layout as L  # noqa: E402
from smpd.machine.bus import Bus  # noqa: E402
from smpd.kernel.cpu import Cpu  # noqa: E402
from smpd.kernel.image import load_kernel  # noqa: E402
from smpd.machine.segment import Segment  # noqa: E402

N = 20000


def main() -> None:
    geo = L.Geometry(4, 32, 8, 4)
    seg = Segment.create(f"/smpd-profile-{os.getpid()}", geo, os.getpid(), 0.0)
    try:
        seg.set_hdr("watch", L.Watch.SPIN)
        seg.set_hdr("generation", 1)
        bus = Bus(seg)
        load_kernel(bus, geo, 1, 1)
        seg.set_cb(1, "pid", os.getpid())
        cpu = Cpu(seg, bus, 1, config.load().signals())
        cpu.gen = 1
        md = geo.mwait_cpu_dead_addr(1)
        hlt = struct.pack("<I", L.CPUDEAD_MWAIT_KEXEC_HLT)
        steps = ("monitor", "kick bus write", "wait (consume)", "disarm+count", "irq/ipi check",
                 "resume page checks", "control+ack", "events (after ack)")
        t = dict.fromkeys(steps, 0)
        for _ in range(N):
            a = time.perf_counter_ns()
            cpu.monitor(md)
            b = time.perf_counter_ns()
            bus.write(md, hlt)
            c = time.perf_counter_ns()
            mask = cpu.wait()
            d = time.perf_counter_ns()
            cpu.disarm()
            cpu._count_wake(mask)
            e = time.perf_counter_ns()
            cpu._interrupts_then_ipis(mask)
            f = time.perf_counter_ns()
            cpu.resume(L.TEXT_PLAY_DEAD, L.Ev.WAKE_WRITE, 0)
            g = time.perf_counter_ns()
            if struct.unpack_from("<I", seg.buf, cpu.md_mem)[0] == L.CPUDEAD_MWAIT_KEXEC_HLT:
                cpu.u64[cpu.i_kick_seen] = time.monotonic_ns()
                bus.write(md + 4, hlt)
            h = time.perf_counter_ns()
            events.log(seg, 1, L.Ev.WAKE_WRITE, 0)
            events.log(seg, 1, L.Ev.KICK_SEEN)
            i = time.perf_counter_ns()
            for step, dt in zip(steps, (b - a, c - b, d - c, e - d, f - e, g - f, h - g, i - h)):
                t[step] += dt
        for step in steps:
            print(f"{step:<22} {t[step] / N:8.0f} ns")
        path = sum(t[s] for s in steps[2:7]) / N
        print(f"{'woken CPU to ack':<22} {path:8.0f} ns  (wait .. control+ack)")
        del bus, cpu
    finally:
        seg.close()
        seg.unlink()


if __name__ == "__main__":
    main()
