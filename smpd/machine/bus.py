"""The bus: the one path by which anything writes emulated memory, and by which CPUs are woken.

MWAIT is real here because of this module. A write that touches any byte of a
line some CPU has armed its monitor on raises that CPU's WAKE_WRITE byte (`mon_write`), even
when the written value equals the old one (the kernel's kick loop rewrites the
same control value every 5 us; the kexec copy writes whatever lands there).

Ordering (see smpd.sync). A CPU arms its monitor by storing its directory entry,
then fences, then sleeps or spins on its wake words. The bus stores the data, then
fences, then loads the directory. So either the bus sees the entry (and wakes the
CPU) or the CPU's fence came after the data was visible: the write happened
before MONITOR, and real hardware would not wake either.

Cost (bench/bench_machine.py measures it): a one-line write with no monitor is a
slice store, a fence and a directory load; with a monitor, add a byte store,
a second fence and, only when the CPU sleeps, a kill() of its doorbell signal.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import time
from typing import Iterable

from smpd.host.proc import PID_MAX
from smpd.machine import hotpath, layout as L
from smpd.machine.sync import fence

# Wakes a CPU process sleeping in sigwaitinfo (smpd.cpu). A standard signal, so a
# pending doorbell is one bit and never a growing queue; its default action is to be
# ignored, so a doorbell at a recycled pid harms nobody.
DOORBELL_SIGNAL = signal.SIGURG
@functools.lru_cache(maxsize=8)
def _unarmed(n: int) -> bytes:
    """``n`` directory entries, none armed: made at the first look at that many (a page's; the
    machine's whole directory, in the coordinator; a RAM write's pages), then kept."""
    return bytes(n * L.DIR_ENTRY)


_UNMONITORED_PAGE = _unarmed(L.LINES_PER_PAGE)  # a page's directory entries, none armed


def _none_armed(entries: memoryview) -> bool:
    """No monitor armed on these directory entries: their bytes compared with zeros (a memcmp,
    ~17 us over a 64-CPU machine's whole directory; bytes.count(0), a byte at a time, ~180)."""
    return entries.tobytes() == _unarmed(len(entries))


class Bus:
    def __init__(self, seg):
        geo = seg.geo
        self.seg = seg
        self.buf = seg.buf
        self.u16 = seg.u16
        self.u32 = seg.u32
        self.mem_off = geo.mem_off
        self.mem_len = geo.npages * L.PAGE
        self.dir_base = geo.dir_off // L.DIR_ENTRY
        self.ncpus = geo.ncpus
        self._wake_off = [geo.cb_off(c) + L.CB["wake"][0] for c in range(geo.ncpus)]
        self._write_off = [geo.cb_off(c) + L.CB["mon_write"][0] for c in range(geo.ncpus)]
        self._sleeping_idx = [(geo.cb_off(c) + L.CB["sleeping"][0]) // 4 for c in range(geo.ncpus)]
        self._pid_idx = [(geo.cb_off(c) + L.CB["pid"][0]) // 4 for c in range(geo.ncpus)]

    def any_monitor(self) -> bool:
        """Is a monitor armed on any line of emulated memory (an entry in the line directory)?"""
        return not _none_armed(self.u16[self.dir_base:self.dir_base + self.mem_len // L.LINE])

    def monitored_pages(self, pages: Iterable[int]) -> set[int]:
        """Those of ``pages`` (emulated page numbers) with a monitor armed on any of their lines."""
        d, per, base, npages = self.u16, L.LINES_PER_PAGE, self.dir_base, self.mem_len // L.PAGE
        return {p for p in pages
                if 0 <= p < npages and d[base + p * per:base + (p + 1) * per].tobytes() != _UNMONITORED_PAGE}

    def clear_left_monitor(self, cpu: int) -> None:
        """Clear the line-directory entry the dead process of ``cpu`` left armed, if it names it
        (its line is a word of the segment: any u32, so bounded here)."""
        seg = self.seg
        line = seg.cb(cpu, "mon_line")
        if seg.cb(cpu, "mon_armed") and line < self.mem_len // L.LINE and self.u16[self.dir_base + line] == cpu + 1:
            self.u16[self.dir_base + line] = 0

    @functools.cached_property
    def kicker(self):
        """The coordinator's kick loop (smpd.machine.hotpath): compiled, or its Python peer."""
        return hotpath.kicker(self.seg, DOORBELL_SIGNAL, self)

    def write(self, addr: int, data: bytes) -> int:
        """Store ``data`` at emulated physical ``addr``; returns how many monitors it woke."""
        off = self._check(addr, len(data))
        mo = self.mem_off + off
        self.buf[mo:mo + len(data)] = data
        fence()
        return self._wake_monitors(off, len(data))

    def write_pages(self, pages: Iterable[tuple[int, bytes]], woken: list | None = None) -> int:
        """Whole pages, each ``(addr, data)`` written as write(addr, data) writes it (its store, a
        fence, a look at its lines' monitors, which it wakes), one after the other as ``pages``
        yields them; returns how many monitors they woke, and appends to ``woken``, when given,
        (the line's address, the CPU, the page's time: after its store, before its wake-ups) for
        each. The same writes for ~2 us a page where write() takes ~3 here: its look at the
        page's 64 directory entries is one comparison of their bytes. On a machine of the compiled
        hot path the loop is its Kicker's (~2 us a page less)."""
        compiled = getattr(self.kicker, "write_pages", None)  # the Python peer has none: this loop is its
        if compiled is not None:
            return compiled(pages, L.PHYS_BASE, woken)
        d, buf, per = self.u16, self.buf, L.LINES_PER_PAGE
        n = 0
        for addr, data in pages:
            off = self._check(addr, len(data))
            if len(data) != L.PAGE or off % L.PAGE:
                raise ValueError(f"write_pages writes whole pages: {len(data)} bytes at {addr:#x}")
            mo = self.mem_off + off
            buf[mo:mo + L.PAGE] = data
            fence()
            first = self.dir_base + off // L.LINE
            if d[first:first + per].tobytes() != _UNMONITORED_PAGE:
                n += self._wake_monitors(off, L.PAGE, woken, time.monotonic_ns())
        return n

    def _check(self, addr: int, n: int) -> int:
        """The offset in emulated memory of a write of ``n`` bytes at ``addr``, which must lie in it."""
        off = addr - L.PHYS_BASE
        if off < 0 or n == 0 or off + n > self.mem_len:
            raise ValueError(
                f"bus write of {n} bytes at {addr:#x} is outside emulated memory "
                f"{L.PHYS_BASE:#x}..{L.PHYS_BASE + self.mem_len:#x}"
            )
        return off

    def _wake_monitors(self, off: int, n: int, woken: list | None = None, ns: int = 0) -> int:
        """After a store of ``n`` bytes at ``off`` and a fence: wake each monitor armed on their lines
        (named in ``woken`` with ``ns``, when given)."""
        first = self.dir_base + off // L.LINE
        last = self.dir_base + (off + n - 1) // L.LINE
        d = self.u16
        # An owner word names CPU owner-1; one beyond the machine's CPUs (a same-uid writer of the
        # segment could store any u16) names nobody, as in the compiled kick loop.
        if first == last:
            owner = d[first]
            if owner and owner <= self.ncpus:
                self.wake(owner - 1, L.WAKE_WRITE)
                if woken is not None:
                    woken.append((L.PHYS_BASE + (first - self.dir_base) * L.LINE, owner - 1, ns))
                return 1
            return 0
        owners = d[first:last + 1]
        if _none_armed(owners):
            return 0
        count = 0
        for i, owner in enumerate(owners):
            if owner and owner <= self.ncpus:
                self.wake(owner - 1, L.WAKE_WRITE)
                count += 1
                if woken is not None:
                    woken.append((L.PHYS_BASE + (first - self.dir_base + i) * L.LINE, owner - 1, ns))
        return count

    def write_u32(self, addr: int, value: int) -> int:
        return self.write(addr, struct.pack("<I", value))

    def wake(self, cpu: int, byte: int) -> None:
        """Raise one of ``cpu``'s wake bytes (L.WAKE_*: WAKE_WRITE is `mon_write`, the others
        bytes of `wake`) and, if it sleeps, ring its doorbell signal.

        `sleeping` is only ever set by a live CPU process; the coordinator clears it
        (and the pid) when it finds the process dead, so a recycled pid is not rung.
        """
        self.buf[self._write_off[cpu] if byte == L.WAKE_WRITE else self._wake_off[cpu] + byte] = 1
        fence()
        if self.u32[self._sleeping_idx[cpu]]:
            pid = self.u32[self._pid_idx[cpu]]
            if 0 < pid <= PID_MAX:  # a pid, never -1 or a process group (nor OverflowError)
                try:
                    os.kill(pid, DOORBELL_SIGNAL)
                except OSError:  # gone, or no longer ours: the coordinator will mark it GONE
                    pass
