"""Where each kernel generation keeps its memory: image, boot-time allocations, kexec segments.

Whether a parked CPU survives a kexec depends on one thing: whether any write made
before the new kernel starts that CPU lands on the line it monitors (DESIGN §1). So
every generation has a memory map of its own, computed here from the same rules a
real x86-64 kernel follows, and every outcome follows from addresses. Pure
functions of (sizes, seed, boot parameters): any process recomputes the same map.

The rules (one 4 KiB page is the unit; page 0 is CONFIG_PHYSICAL_START, 16 MiB):

* The image (text, then data with BSS and the early page tables) runs where it was
  put: a cold boot at LOAD_PHYSICAL_ADDR (page 0); a kexec'd kernel where the kexec
  loader placed it. ``kexec_file_load`` looks for holes top-down in System RAM
  (``kexec_locate_mem_hole``, ``top_down``): purgatory, boot parameters, then the
  kernel, each in the highest hole that fits, avoiding the crashkernel= region; a
  relocatable kernel without KASLR decompresses in place. With KASLR the
  decompressor picks a random slot instead (drawn here from the KASLR seed).
* memblock allocates top-down from the top of RAM, below what is reserved (the
  crashkernel= region, reserved first, at the very top; the kernel's own image):
  the direct map's page tables, then the per-CPU areas, which hold each CPU's
  ``struct mwait_cpu_dead`` on its own line.
* After memblock hands RAM to the buddy allocator, boot-time pages come lowest
  address first (since v5.10, memblock_free_all() puts pages at the free lists'
  tails): the idle task_structs (``fork_idle()`` in ``idle_threads_init()``, before
  any AP is started), whose first line holds ``thread_info->flags`` (THREAD_INFO_IN_TASK),
  then the idle stacks.
* What a generation does not write keeps whatever was there: an old kernel's pages
  survive wherever the new one does not put anything.

The consequence a kernel engineer will recognise: every kexec'd kernel is placed by
the same loader in the same RAM, so generation 3 puts its idle task_structs exactly
where generation 2 kept its own; the first kernel after a cold boot lived elsewhere
(its image low, its task_structs just above it). See ``docs`` in the README.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import TYPE_CHECKING

from smpd.errors import BadInput
from smpd.inputs import ascii_int
from smpd.machine.layout import LINE, LINES_PER_PAGE, PAGE, PHYS_BASE

if TYPE_CHECKING:
    import random


class Region(IntEnum):
    """What a page holds, by the kernel that wrote it (a page's tag names region and generation)."""

    FIRMWARE = 0  # never written by a kernel since power-on
    TEXT = 1
    DATA = 2  # .data, .bss, the early page tables
    PGTABLE = 3  # the direct map's page tables (memblock)
    PERCPU = 4  # per-CPU areas: mwait_cpu_dead (memblock)
    TASKS = 5  # idle task_structs: thread_info->flags on each one's first line (slab)
    STACK = 6  # idle stacks
    PURGATORY = 7  # the kexec loader's purgatory
    BOOTPARAMS = 8  # struct boot_params for the next kernel
    BZIMAGE = 9  # the compressed kernel, where it was loaded but does not run (KASLR)


# Named pages of the text region.
TEXT_PLAY_DEAD = 0  # mwait_play_dead() and the HLT loop
TEXT_NMI = 1  # the NMI handler
TEXT_MCE = 2  # the MCE handler
TEXT_IDT = 3  # the IDT
TEXT_NAMED = 4  # the text region holds at least these

# Line 0 of every page holds its tag; the others are the page's contents.
PERCPU_PER_PAGE = LINES_PER_PAGE - 1  # one mwait_cpu_dead line per CPU ("its own cache line")
TASK_LINES = 4  # lines of an idle task_struct modelled; line 0 is thread_info->flags
TASKS_PER_PAGE = (LINES_PER_PAGE - 1) // TASK_LINES
SEGMENT_ALIGN = 8  # pages: where a KASLR slot may start (2 MiB in the kernel, scaled)

FLAVOURS = ("pre-fix", "6.5", "6.6")
# The old --park names, kept as aliases: none = pre-fix, init = 6.5, hlt = 6.6.
PARK_ALIASES = {"none": "pre-fix", "init": "6.5", "hlt": "6.6"}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Sizes:
    """How big each part of a kernel is, in pages (config [memory]), and the RAM that holds them."""

    ncpus: int
    text: int = 32
    data: int = 320
    pgtables: int = 8
    stack_per_cpu: int = 4
    crash: int = 0  # the crashkernel= region; 0: none reserved
    ram: int = 0  # 0: the least RAM that holds two generations and the crash region

    def __post_init__(self):
        if self.ram == 0:
            object.__setattr__(self, "ram", self.ram_needed)

    @property
    def image(self) -> int:
        return self.text + self.data

    @property
    def percpu(self) -> int:
        return _ceil(self.ncpus, PERCPU_PER_PAGE)

    @property
    def tasks(self) -> int:
        return _ceil(self.ncpus, TASKS_PER_PAGE)

    @property
    def stacks(self) -> int:
        return self.ncpus * self.stack_per_cpu

    @property
    def memblock(self) -> int:
        return self.pgtables + self.percpu

    @property
    def slab(self) -> int:
        return self.tasks + self.stacks

    @property
    def crash_needed(self) -> int:
        """The crashkernel= size a crash kernel needs: its image and, with nr_cpus=1, one CPU's worth."""
        return self.image + self.pgtables + 1 + 1 + self.stack_per_cpu

    @property
    def ram_needed(self) -> int:
        # Two generations side by side (the cold-booted one low, a kexec'd one high), the loader's
        # two small segments, and the crash region at the top.
        return self.crash + 2 * (self.image + self.memblock + self.slab) + 2 + SEGMENT_ALIGN


@dataclass(frozen=True)
class Boot:
    """A generation's kernel: its flavour and the boot parameters it was started with."""

    flavour: str = "6.6"
    nosmt: bool = False  # SMT siblings (odd CPUs) are brought up once, then parked in mwait_play_dead()
    maxcpus: int | None = None  # CPUs from maxcpus on are not started at all
    kaslr: int | None = None  # KASLR seed; None: no KASLR (the default, as in the story)
    crash: bool = False  # a crash kernel (kdump): it runs inside the crashkernel= region

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown kernel flavour {self.flavour!r}")

    def started(self, cpu: int) -> bool:
        """Does this kernel start ``cpu`` at boot (INIT/SIPI)? CPU 0 is the boot CPU."""
        if self.crash:
            return cpu == 0  # kdump runs with nr_cpus=1
        return self.maxcpus is None or cpu < self.maxcpus

    def smt_sibling(self, cpu: int) -> bool:
        """With nosmt, a CPU the kernel keeps offline: an SMT sibling (in this machine's topology
        the odd CPUs), brought up once (at boot, or by a first cpu_up()) and parked in
        mwait_play_dead(); cpu_up() refuses it from then on (cpu_smt_allowed(), cpu_bootable() from
        v6.7: EPERM)."""
        return self.nosmt and cpu % 2 == 1

    def parks_at_boot(self, cpu: int) -> bool:
        """With nosmt the kernel brings each SMT sibling it starts up once and parks it in mwait_play_dead()."""
        return self.smt_sibling(cpu) and self.started(cpu)

    @property
    def monitors_thread_info(self) -> bool:
        return self.flavour == "pre-fix"

    def text(self) -> str:
        parts = [self.flavour] + (["nosmt"] if self.nosmt else []) + \
            ([f"maxcpus={self.maxcpus}"] if self.maxcpus is not None else []) + \
            ([f"kaslr={self.kaslr}"] if self.kaslr is not None else []) + (["crash"] if self.crash else [])
        return " ".join(parts)


class _Free:
    """The free page intervals of a window: memblock's top-down and the buddy's lowest-first."""

    def __init__(self, first: int, count: int, reserved: list[tuple[int, int]]):  # (first, count) each
        self.spans = [(first, first + count)]
        for r in reserved:
            self.take(*r)

    def take(self, first: int, count: int) -> None:
        lo, hi = first, first + count
        out = []
        for a, b in self.spans:
            if b <= lo or a >= hi:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo))
            if hi < b:
                out.append((hi, b))
        self.spans = out

    def top_down(self, n: int) -> int:
        for a, b in sorted(self.spans, reverse=True):
            if b - a >= n:
                self.take(b - n, n)
                return b - n
        raise MemoryError(n)

    def lowest(self, n: int) -> int:
        for a, b in sorted(self.spans):
            if b - a >= n:
                self.take(a, n)
                return a
        raise MemoryError(n)

    def slot(self, n: int, rng: random.Random) -> int:
        """A random aligned start of n free pages (KASLR's choose_random_location)."""
        slots = [s for a, b in self.spans for s in range(_ceil(a, SEGMENT_ALIGN) * SEGMENT_ALIGN, b - n + 1,
                                                          SEGMENT_ALIGN)]
        if not slots:
            raise MemoryError(n)
        s = rng.choice(slots)
        self.take(s, n)
        return s


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: smpd.kernel.generations caches them
class MemoryMap:
    """One generation's memory: which page holds what, by that kernel's own allocators."""

    gen: int
    boot: Boot
    sizes: Sizes
    regions: dict  # Region -> first page (each region is contiguous)
    window: tuple[int, int]  # (first, count): the RAM this kernel may use
    segments: tuple = ()  # what the kexec copy wrote: ((first, count, Region), ...)
    placement: str = ""  # how the image got where it runs, for the evidence

    # -- building ---------------------------------------------------------------

    @classmethod
    def build(cls, gen: int, boot: Boot, sizes: Sizes, load: int | None, segments: tuple = (),
              placement: str = "") -> "MemoryMap":
        """The map of a kernel whose image runs at page ``load`` (None: KASLR picks, from boot.kaslr)."""
        # A crash kernel knows only the crashkernel= region; any other kernel all RAM but that region.
        window = (sizes.ram - sizes.crash, sizes.crash) if boot.crash else (0, sizes.ram - sizes.crash)
        free = _Free(*window, [])
        if load is None:
            # The decompressor avoids what it was loaded with (choose_random_location()).
            loaded = _Free(*window, [(f, n) for f, n, _r in segments])
            import random  # here: the CPU processes' template imports no random (see _digest)

            load = loaded.slot(sizes.image, random.Random(_digest("kaslr", boot.kaslr, gen)))
            placement = (placement + "; " if placement else "") + f"KASLR (seed {boot.kaslr}) chose page {load}"
        free.take(load, sizes.image)
        regions = {Region.TEXT: load, Region.DATA: load + sizes.text}
        ncpus_here = 1 if boot.crash else sizes.ncpus
        regions[Region.PGTABLE] = free.top_down(sizes.pgtables)
        regions[Region.PERCPU] = free.top_down(_ceil(ncpus_here, PERCPU_PER_PAGE))
        regions[Region.TASKS] = free.lowest(_ceil(ncpus_here, TASKS_PER_PAGE))
        regions[Region.STACK] = free.lowest(ncpus_here * sizes.stack_per_cpu)
        return cls(gen, boot, sizes, regions, window, tuple(segments), placement)

    @cached_property
    def counts(self) -> dict:
        n = 1 if self.boot.crash else self.sizes.ncpus
        s = self.sizes
        return {Region.TEXT: s.text, Region.DATA: s.data, Region.PGTABLE: s.pgtables,
                Region.PERCPU: _ceil(n, PERCPU_PER_PAGE), Region.TASKS: _ceil(n, TASKS_PER_PAGE),
                Region.STACK: n * s.stack_per_cpu}

    # -- what is where ------------------------------------------------------------

    def page(self, region: Region, index: int = 0) -> int:
        assert 0 <= index < self.counts[region], (region, index)
        return self.regions[region] + index

    def region_of(self, page: int) -> tuple[Region, int] | None:
        """(region, index) of what this generation keeps at ``page``, or None (not its page): a look at
        each of its few regions (the last named wins, were two to overlap). A dict of all its pages,
        which each CPU process built at its first resume plan in a generation, made `smpd offline`
        quadratic: of 4095 CPUs, 33 s (each CPU process 12.5 ms of host CPU and 886 page faults);
        with this, 2.6 s (1.0 ms and 55)."""
        for region, first in reversed(self.regions.items()):
            if first <= page < first + self.counts[region]:
                return region, page - first
        return None

    def runs(self):
        """(region, first page, pages) of each of this generation's regions, in the order its boot
        writes them: the image, memblock's allocations (page tables, per-CPU areas), then the slab
        (tasks, stacks)."""
        for region in (Region.TEXT, Region.DATA, Region.PGTABLE, Region.PERCPU, Region.TASKS, Region.STACK):
            yield region, self.regions[region], self.counts[region]

    def pages(self):
        """(page, region, index) of every page this generation owns, in the order its boot writes them
        (``runs``)."""
        for region, first, count in self.runs():
            for i in range(count):
                yield first + i, region, i

    def mwait_cpu_dead_addr(self, cpu: int) -> int:
        """Physical address of ``cpu``'s struct mwait_cpu_dead (control at +0, status at +4)."""
        page = self.page(Region.PERCPU, cpu // PERCPU_PER_PAGE)
        return page_addr(page) + LINE * (1 + cpu % PERCPU_PER_PAGE)

    def thread_info_addr(self, cpu: int) -> int:
        """Physical address of ``cpu``'s idle task's thread_info->flags (the pre-fix MONITOR target)."""
        page = self.page(Region.TASKS, cpu // TASKS_PER_PAGE)
        return page_addr(page) + LINE * (1 + TASK_LINES * (cpu % TASKS_PER_PAGE))

    def monitor_addr(self, cpu: int) -> int:
        """The line mwait_play_dead() of this kernel arms MONITOR on, for ``cpu``."""
        return self.thread_info_addr(cpu) if self.boot.monitors_thread_info else self.mwait_cpu_dead_addr(cpu)

    def stack_pages_of(self, cpu: int) -> range:
        first = self.page(Region.STACK, cpu * self.sizes.stack_per_cpu)
        return range(first, first + self.sizes.stack_per_cpu)

    def pgtable_pages_of(self, cpu: int) -> tuple[int, int]:
        """The page-table pages that map the kernel text, and ``cpu``'s idle stack."""
        n = self.sizes.pgtables
        text_pt = self.page(Region.PGTABLE, 0)
        return (text_pt, text_pt) if n == 1 else (text_pt, self.page(Region.PGTABLE, 1 + cpu % (n - 1)))

    def text_page(self, n: int) -> int:
        return self.page(Region.TEXT, n)

    def symbol(self, addr: int) -> str:
        """A kernel-ish name, in this generation's map: 'mwait_cpu_dead[5].status', 'text+0x1040'."""
        if addr < PHYS_BASE:
            return hex(addr)
        page, off = divmod(addr - PHYS_BASE, PAGE)
        where = self.region_of(page)
        if where is None:
            return f"{addr:#x} (not generation {self.gen}'s)"
        region, index = where
        line, in_line = divmod(off, LINE)
        if region == Region.PERCPU and line >= 1:
            cpu = index * PERCPU_PER_PAGE + line - 1
            if cpu < self.counts[Region.PERCPU] * PERCPU_PER_PAGE and in_line < 8:
                return f"mwait_cpu_dead[{cpu}]" + {0: ".control", 4: ".status"}.get(in_line, f"+{in_line}")
        if region == Region.TASKS and line >= 1:
            cpu, task_line = divmod(line - 1, TASK_LINES)
            cpu += index * TASKS_PER_PAGE
            if task_line == 0 and cpu < self.sizes.ncpus:
                return f"thread_info[{cpu}].flags" + (f"+{in_line}" if in_line else "")
            return f"idle_task[{cpu}]+{(task_line * LINE + in_line):#x}"
        return f"{region.name.lower()}+{(index * PAGE + off):#x}"

    def resolve(self, target: str, ncpus: int, npages: int) -> int:
        """symbol()'s inverse, for `smpd poke`: '0x1004040', or a symbol of this map:
        'mwait_cpu_dead[5]', 'mwait_cpu_dead[5].status', 'thread_info[5]'. BadInput otherwise."""
        m = re.fullmatch(r"(mwait_cpu_dead|thread_info)\[([0-9]{1,5})\](\.(control|status|flags))?", target)
        if m:
            cpu = int(m.group(2))
            if cpu >= ncpus:
                raise BadInput(f"{target}: this machine has CPUs 0-{ncpus - 1}")
            if m.group(1) == "mwait_cpu_dead":
                if self.boot.monitors_thread_info:
                    raise BadInput(f"{target}: the running kernel, {self.boot.text()}, predates the fix and has "
                                   f"no struct mwait_cpu_dead; its parked CPUs monitor thread_info[N]")
                if m.group(4) == "flags":
                    raise BadInput(f"{target}: mwait_cpu_dead has fields control and status")
                return self.mwait_cpu_dead_addr(cpu) + (4 if m.group(4) == "status" else 0)
            if m.group(4) in ("control", "status"):
                raise BadInput(f"{target}: thread_info has the field flags")
            return self.thread_info_addr(cpu)
        addr = ascii_int(target, hex_ok=True)
        if addr is None:
            raise BadInput(f"'{target}' is not an address; expected a number like 0x1004040, "
                           f"mwait_cpu_dead[N][.control|.status] or thread_info[N]") from None
        end = PHYS_BASE + npages * PAGE
        if not PHYS_BASE <= addr <= end - 4 or addr % 4:
            raise BadInput(f"address {addr:#x} is outside emulated memory or not 4-byte aligned; "
                           f"accepted: {PHYS_BASE:#x}..{end - 4:#x}, multiples of 4")
        return addr

    def describe_page(self, page: int) -> str:
        where = self.region_of(page)
        return f"{where[0].name.lower()} page {where[1]}" if where else f"page {page}"

    def summary(self) -> dict:
        """The map in numbers, for status and reports: each region's first page and size."""
        return {"generation": self.gen, "kernel": self.boot.text(), "placement": self.placement,
                "regions": {r.name.lower(): {"first_page": self.regions[r], "pages": self.counts[r],
                                             "addr": hex(page_addr(self.regions[r]))} for r in self.regions},
                "segments": [{"first_page": f, "pages": n, "what": r.name.lower()} for f, n, r in self.segments]}


def page_addr(page: int) -> int:
    return PHYS_BASE + page * PAGE


def _digest(*parts) -> int:
    # hashlib and random are imported where they are used: the template every CPU process is
    # forked from imports this module, and each CPU process would run random's at-fork hook
    # (a reseed from urandom) and inherit OpenSSL's memory areas (smpd.daemon.template).
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


# -- the generations ---------------------------------------------------------------------------

def cold_boot(sizes: Sizes, boot: Boot) -> MemoryMap:
    """Generation 1: the bootloader put the image at LOAD_PHYSICAL_ADDR (or KASLR moved it)."""
    load = None if boot.kaslr is not None else 0
    return MemoryMap.build(1, boot, sizes, load, placement="cold boot: the bootloader loaded it at "
                                                          "LOAD_PHYSICAL_ADDR" if load == 0 else "cold boot")


def kexec_load(old: MemoryMap, boot: Boot) -> MemoryMap:
    """The next generation, as the old one's kexec_file_load() placed it (see the module's docstring).

    Its ``segments`` are what the kexec copy writes: purgatory, boot parameters, the kernel."""
    s = old.sizes
    if boot.crash:  # `kexec -p` loaded the crash kernel into the crashkernel= region at boot: no copy
        first = s.ram - s.crash
        return MemoryMap.build(old.gen + 1, boot, s, first,
                               placement="crash kernel: loaded into the crashkernel= region by kexec -p")
    free = _Free(0, s.ram - s.crash, [])  # the loader avoids only crashk_res and its own segments
    purgatory = free.top_down(1)
    params = free.top_down(1)
    kernel = free.top_down(s.image)
    segments = ((purgatory, 1, Region.PURGATORY), (params, 1, Region.BOOTPARAMS), (kernel, s.image, Region.BZIMAGE))
    if boot.kaslr is None:
        return MemoryMap.build(old.gen + 1, boot, s, kernel, segments,
                               placement="kexec_file_load: top-down hole; runs in place (no KASLR)")
    return MemoryMap.build(old.gen + 1, boot, s, None, segments, placement="kexec_file_load: top-down hole")
