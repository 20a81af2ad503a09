"""relocate_kernel() and the new kernel's own writes: every byte a kexec puts in memory.

The copy writes the new kernel's segments where the loader placed them, in the
scenario's order; the new kernel then decompresses, clears its BSS, builds its page
tables and makes its early allocations, each page a bus write at an address of its
own memory map (smpd.kernel.memmap). A write that wakes a monitor is recorded with
the line it hit: the evidence the maps explain. verify() compares the new kernel's
memory with what it wrote, once what the writes woke has settled.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from typing import Callable

from smpd.kernel import generations as gens_mod, image
from smpd.kernel.generations import Generations
from smpd.kernel.memmap import MemoryMap, Region, page_addr
from smpd.machine import layout as L

MAX_WAKING = 64  # waking writes recorded per kexec (a 4096-CPU machine could have thousands)


class Relocation:
    """The writes of one kexec into ``new``: the copy (unless a crash kernel was loaded at boot)
    and the new kernel's boot. ``log(what, kind)`` is the kexec's timeline."""

    def __init__(self, seg, bus, gens: Generations, new: MemoryMap, order: str, rng: random.Random,
                 log: Callable[..., None]):
        self.seg, self.bus, self.gens, self.new = seg, bus, gens, new
        self.order, self.rng, self.log = order, rng, log
        self.copy_woke = self.boot_woke = 0
        self.copy_info: dict = {}
        self.waking: list[dict] = []  # the writes that woke a monitor, and whose line they hit

    def copy_pages(self) -> list[tuple[int, Region, int]]:
        """What relocate_kernel() writes: each segment's pages, in the scenario's order."""
        pages = [(first + i, region, i) for first, count, region in self.new.segments for i in range(count)]
        order = self.order
        if order == "random":
            self.rng.shuffle(pages)
        elif order in ("monitored-first", "monitored-last"):
            hot = self.bus.monitored_pages(p for p, _r, _i in pages)
            first = [x for x in pages if x[0] in hot]
            rest = [x for x in pages if x[0] not in hot]
            pages = first + rest if order == "monitored-first" else rest + first
        return pages

    def write_pages(self, pages: list[tuple[int, Region, int]], seed: int, who: str,
                    runs: tuple[tuple[Region, int, int], ...], during: Callable[[], None] | None = None) -> int:
        """The new kernel's ``pages`` (page, region, index), in that order, each a write through the
        bus (smpd.machine.bus.Bus.write_pages: page by page, its image looked up just before it
        lands, in image.page_views of ``runs``, the (region, first page, pages) they come from);
        returns how many monitors they woke. ``during`` runs once, before the write of the middle
        page. A write that wakes a monitor is recorded with the line it hit (which write hit
        which line: the evidence the maps explain)."""
        half = len(pages) // 2
        woke = 0
        gen = self.new.gen
        views = image.page_views(seed, gen, runs)
        for k, part in enumerate((pages[:half], pages[half:]) if during is not None and pages else (pages,)):
            if k == 1:
                during()
            woken: list[tuple[int, int, int]] = []
            woke += self.bus.write_pages((views[p] for p, _r, _i in part) if views is not None else
                                         ((page_addr(p), image.page_image(seed, gen, r, i)) for p, r, i in part),
                                         woken)
            if woken:
                self._record_waking(part, woken, who)
        return woke

    def _record_waking(self, pages: list[tuple[int, Region, int]], woken: list[tuple[int, int, int]], who: str) -> None:
        where = {p: (r, i) for p, r, i in pages}
        for addr, cpu, at in woken[:max(0, MAX_WAKING - len(self.waking))]:
            page = (addr - L.PHYS_BASE) // L.PAGE
            region, index = where[page]
            what = f"{who}: {region.name.lower()} page {index} at {page_addr(page):#x}"
            self.waking.append({"cpu": cpu, "write": what, "line": self.gens.of_cpu(cpu).symbol(addr), "addr": addr})
            self.log(f"{what} writes CPU{cpu}'s monitored line ({self.waking[-1]['line']})", "waking_write", at)

    def copy(self, during, crash: bool) -> None:
        """machine_kexec() -> relocate_kernel(): the new kernel's segments over whatever is there."""
        if crash:
            self.log("kdump: the crash kernel was loaded into the crashkernel= region at boot (kexec -p): "
                     "nothing to copy")
            during()
            self.copy_info = {"pages": 0}
            return
        pages = self.copy_pages()
        self.copy_info = {"pages": len(pages), "segments": [
            {"first_page": f, "pages": n, "what": r.name.lower(), "addr": hex(page_addr(f))}
            for f, n, r in self.new.segments],
            "order_digest": hashlib.sha256(struct.pack(f"<{len(pages)}I", *(p for p, _r, _i in pages))).hexdigest()[:16]}
        seed = self.seg.hdr("seed")
        t0 = time.monotonic_ns()
        self.log(f"copy: {len(pages)} pages of generation {self.new.gen}'s segments, order {self.order} ("
                 + ", ".join(f"{r.name.lower()} at {page_addr(f):#x}" for f, _n, r in self.new.segments) + ")")
        self.copy_woke = self.write_pages(pages, seed, "the copy",
                                          tuple((r, f, n) for f, n, r in self.new.segments), during)
        self.log(f"copy done in {(time.monotonic_ns() - t0) / 1e6:.1f} ms; its writes woke {self.copy_woke} monitors")

    def new_kernel_boot(self) -> None:
        """The jump: the new kernel's own writes until it starts the APs (smpd.kernel.image.boot_kernel)."""
        gens_mod.record(self.seg, self.new)
        t0 = time.monotonic_ns()
        seed = self.seg.hdr("seed")
        self.boot_woke = self.write_pages(list(self.new.pages()), seed, f"generation {self.new.gen}'s boot",
                                          tuple(self.new.runs()))
        r = self.new.regions
        self.log(f"generation {self.new.gen} boots ({self.new.placement}): image at {page_addr(r[Region.TEXT]):#x}, "
                 f"page tables and per-CPU areas (memblock, top-down) at {page_addr(r[Region.PGTABLE]):#x} and "
                 f"{page_addr(r[Region.PERCPU]):#x}, idle task_structs and stacks (lowest first) at "
                 f"{page_addr(r[Region.TASKS]):#x}; {(time.monotonic_ns() - t0) / 1e6:.1f} ms, its writes woke "
                 f"{self.boot_woke} monitors")

    def verify(self) -> list[dict]:
        """Compare the new kernel's memory (image and allocations) with what it wrote, once every CPU
        the writes woke has settled and before the APs run: a stray store that landed there is
        corruption; one a later write covered left no trace."""
        seed, gen = self.seg.hdr("seed"), self.new.gen
        bad: list[dict] = []
        for region, first, count in self.new.runs():  # a region's pages are consecutive: one compare
            want = image.region_image(seed, gen, region, count)
            off = self.seg.geo.mem_off + first * L.PAGE
            have = self.seg.buf[off:off + count * L.PAGE].tobytes()  # bytes == bytes is a memcmp; a memoryview's is not
            if have == want:
                continue
            for at in range(0, len(want), L.PAGE):  # then the pages that differ, word by word
                if have[at:at + L.PAGE] == want[at:at + L.PAGE]:
                    continue
                for w in range(at, at + L.PAGE, 4):
                    if have[w:w + 4] != want[w:w + 4]:
                        addr = page_addr(first) + w
                        bad.append({"addr": addr, "symbol": self.new.symbol(addr),
                                    "value": struct.unpack_from("<I", have, w)[0],
                                    "expected": struct.unpack_from("<I", want, w)[0]})
        self.log(f"generation {self.new.gen}: memory verification " + (f"found {len(bad)} corrupted words" if bad
                                                                       else "clean"))
        return bad
