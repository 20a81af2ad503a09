"""The kernel generations a machine has run since power-on, as its segment records them.

Generation 1 is the cold-booted kernel; each kexec starts the next. Every process
(the coordinator, each CPU) needs the memory map of the generation it runs: a CPU
that a later kernel never started (``maxcpus``, a crash kernel's ``nr_cpus=1``) still
runs, or sits parked in, the code and memory of its own. So the header's second page
holds one entry per generation (smpd.machine.layout GEN_ENTRY): its kernel (flavour,
boot parameters) and where its image runs; the map itself is recomputed from that
(smpd.kernel.memmap), the same in every process, and cached.
"""

from __future__ import annotations

import struct

from smpd.kernel.memmap import FLAVOURS, Boot, MemoryMap, Region, Sizes
from smpd.machine import layout as L

_NOSMT, _CRASH = 1, 2
_GEN_WORD = struct.Struct("<I")  # an entry's first field: its generation


def sizes_of(seg) -> Sizes:
    return Sizes(ncpus=seg.geo.ncpus, text=seg.hdr("text_pages"), data=seg.hdr("data_pages"),
                 pgtables=seg.hdr("pgtable_pages"), stack_per_cpu=seg.hdr("stack_pages_per_cpu"),
                 crash=seg.hdr("crash_pages"), ram=seg.hdr("ram_pages"))


def _slot_off(slot: int) -> int:
    return L.GEN_OFF + slot * L.GEN_ENTRY.size


def _recorded(seg, slot: int) -> int:
    """The generation slot ``slot`` holds (0: none yet)."""
    return _GEN_WORD.unpack_from(seg.buf, _slot_off(slot))[0]


def _slot_of(seg, gen: int) -> int | None:
    """The slot holding generation ``gen``: most often slot gen % GEN_SLOTS, where ``record`` tries first."""
    first = gen % L.GEN_SLOTS
    for k in range(L.GEN_SLOTS):
        slot = (first + k) % L.GEN_SLOTS
        if _recorded(seg, slot) == gen:
            return slot
    return None


def in_use(seg) -> set[int]:
    """The generations something still runs: the current one (CPU 0's), and each CPU's, which a later
    kernel may never have started (maxcpus, a crash kernel's nr_cpus=1). 0: a CPU in none yet."""
    return ({seg.hdr("generation")} | {seg.cb(cpu, "cpu_gen") for cpu in range(1, seg.geo.ncpus)}) - {0}


def record(seg, m: MemoryMap) -> None:
    """Write generation ``m.gen``'s entry (its map can then be rebuilt anywhere): over its own, or in
    the first slot from gen % GEN_SLOTS on that holds a generation nothing runs any more. A CPU
    left in a generation any number of kexecs old so keeps its map; only GEN_SLOTS generations in
    use at once would leave no slot (a kexec is refused then, before it starts: smpd.daemon.kernel_ops)."""
    slot = _slot_of(seg, m.gen)
    if slot is None:
        busy = in_use(seg)
        slot = next(s for s in ((m.gen + k) % L.GEN_SLOTS for k in range(L.GEN_SLOTS))
                    if _recorded(seg, s) not in busy)
    b = m.boot
    segs = list(m.segments) + [(0, 0, Region.FIRMWARE)] * (3 - len(m.segments))
    flat = [v for first, count, region in segs for v in (first, count, int(region))]
    L.GEN_ENTRY.pack_into(seg.buf, _slot_off(slot), m.gen, FLAVOURS.index(b.flavour),
                          (_NOSMT if b.nosmt else 0) | (_CRASH if b.crash else 0),
                          0 if b.maxcpus is None else b.maxcpus + 1, 0 if b.kaslr is None else b.kaslr + 1,
                          m.regions[Region.TEXT], *flat)


class Generations:
    """The memory maps of a machine's generations, rebuilt from its header and cached."""

    def __init__(self, seg):
        self.seg = seg
        self.sizes = sizes_of(seg)
        self._maps: dict[tuple, MemoryMap] = {}

    def boot(self, gen: int) -> Boot:
        return self.map(gen).boot

    def _slot(self, gen: int) -> int:
        slot = _slot_of(self.seg, gen)
        if slot is None:
            raise LookupError(f"generation {gen} is not recorded (the table keeps {L.GEN_SLOTS}, "
                              f"those something runs first)")
        return slot

    def entry(self, gen: int) -> bytes:
        """Generation ``gen``'s entry in the table, its bytes as recorded (its map derives from them)."""
        off = _slot_off(self._slot(gen))
        return bytes(self.seg.buf[off:off + L.GEN_ENTRY.size])

    def map(self, gen: int) -> MemoryMap:
        return self._built(L.GEN_ENTRY.unpack_from(self.seg.buf, _slot_off(self._slot(gen))))

    def map_of(self, entry: bytes) -> MemoryMap:
        """The map a generation's entry, as ``entry`` read it, describes (whatever the table holds now)."""
        return self._built(L.GEN_ENTRY.unpack(entry))

    def _built(self, raw: tuple) -> MemoryMap:
        m = self._maps.get(raw)
        if m is None:
            _gen, flavour, flags, maxcpus, kaslr, load, *flat = raw
            boot = Boot(FLAVOURS[flavour], nosmt=bool(flags & _NOSMT), maxcpus=maxcpus - 1 if maxcpus else None,
                        kaslr=kaslr - 1 if kaslr else None, crash=bool(flags & _CRASH))
            segments = tuple((flat[i], flat[i + 1], Region(flat[i + 2])) for i in range(0, 9, 3) if flat[i + 1])
            m = self._maps[raw] = MemoryMap.build(_gen, boot, self.sizes, load, segments)
        return m

    def current(self) -> MemoryMap:
        return self.map(self.seg.hdr("generation"))

    def of_cpu(self, cpu: int) -> MemoryMap:
        """The map of the generation ``cpu`` runs (the one that last started it). CPU 0, the
        kexec CPU, always runs the current one."""
        gen = self.seg.cb(cpu, "cpu_gen") if cpu else 0
        return self.map(gen or self.seg.hdr("generation"))
