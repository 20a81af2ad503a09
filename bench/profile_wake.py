"""The CPU's wake-up path, step by step: where a kick's microseconds go.

    python bench/profile_wake.py [--rounds N]

The Python hot path's (`--hot-path python`; the compiled one answers a kick in C). One
process plays both sides on a private segment (no machine needed): MONITOR,
the kick's bus write, then each step a woken CPU in mwait_play_dead() runs before
and after it acknowledges. Prints the mean cost of each step over N rounds. The
steps between "wait" and "control+ack" are the latency a kick pays on top of the
cache-line transfers (compare `smpd bench kick` and its hardware floor).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smpd import config  # noqa: E402
from smpd.host import names, trust  # noqa: E402
from smpd.kernel import boot as kboot  # noqa: E402
from smpd.kernel.cpu import Cpu  # noqa: E402
from smpd.kernel.memmap import TEXT_PLAY_DEAD  # noqa: E402
from smpd.machine import events, layout as L  # noqa: E402
from smpd.machine.bus import Bus  # noqa: E402
from smpd.machine.segment import Segment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20000, help="wake-ups to time [20000]")
    N = ap.parse_args().rounds
    cfg = config.load()
    sizes = cfg.sizes()
    geo = L.Geometry(2, sizes.ram)
    seg = Segment.create(names.segment(f"profile-wake-{os.getpid()}"), geo, os.getpid(), trust.start_ticks(os.getpid()))
    try:
        for field, value in (("ram_pages", sizes.ram), ("crash_pages", sizes.crash), ("seed", 1),
                             ("watch", L.Watch.SPIN), ("hot_path", L.HotPath.PYTHON),
                             ("text_pages", sizes.text), ("data_pages", sizes.data),
                             ("pgtable_pages", sizes.pgtables), ("stack_pages_per_cpu", sizes.stack_per_cpu)):
            seg.set_hdr(field, value)
        bus = Bus(seg)
        gen1 = kboot.power_on(seg, bus, cfg.boot())  # generation 1 in RAM, as a CPU process finds it
        cpu = Cpu(seg, bus, 1, cfg.signals())
        cpu.gen, cpu.map = 1, gen1
        md = gen1.mwait_cpu_dead_addr(1)
        md_mem = seg.mem_off(md)
        line = (md - L.PHYS_BASE) // L.LINE
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
            cpu.resume(TEXT_PLAY_DEAD, L.Ev.WAKE_WRITE, line)
            g = time.perf_counter_ns()
            if struct.unpack_from("<I", seg.buf, md_mem)[0] == L.CPUDEAD_MWAIT_KEXEC_HLT:
                cpu.u64[cpu.i_kick_seen] = time.monotonic_ns()
                bus.write(md + 4, hlt)
            h = time.perf_counter_ns()
            events.log(seg, 1, L.Ev.WAKE_WRITE, line)
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
