"""What every page of emulated RAM holds: tagged 4 KiB pages whose contents derive from the seed.

Every page starts with a 16-byte tag (magic, kernel generation, region, index in
region), so anyone can tell in O(1) whose page it is: a generation's own (which
region, which page of it), or firmware's (generation 0: never written by a kernel
since power-on). The rest of a kernel's page is SHAKE-256 of (seed, generation, region,
index): deterministic, cheap to regenerate for verification, different for every
generation. Firmware's is a 48-byte BLAKE2b of (seed, page), repeated: no outcome depends
on it (only a kernel's pages are verified, and a CPU runs foreign bytes only in a page its
kernel had, which some kernel wrote since power-on; `smpd poke` shows its words as it would
any), and RAM is mostly firmware's: a 1024-CPU bring-up writes ~9400 of its pages, at ~2 us
each against ~19 us for a SHAKE-256 of 4 KiB. Per-CPU areas and idle task_structs are zero
after the tag, like the kernel's zero-initialised data (``mwait_cpu_dead`` starts as {0, 0},
an idle task's ``thread_info->flags`` as 0). Idle stacks are not, though the kernel allocates
a task stack zeroed (THREADINFO_GFP has __GFP_ZERO): copy_thread() writes a fork frame at its
top at once, and a CPU that has run leaves its frames there, where a woken CPU whose stack
page was overwritten returns (smpd.kernel.resume): the bytes it then runs are the new page's,
and a zero body would make every such return the same verdict.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterable, NamedTuple

from smpd.kernel.memmap import FLAVOURS, MemoryMap, Region, page_addr
from smpd.machine import layout as L

TAG = struct.Struct("<4sIHHI")
TAG_MAGIC = b"KPG1"
_ZERO_BODY = (Region.PERCPU, Region.TASKS)
_FIRMWARE_UNIT = 48  # bytes of hash a firmware page's body repeats: 85 of them after the 16-byte tag


class PageTag(NamedTuple):
    generation: int
    region: Region
    index: int


def _tag(generation: int, region: Region, index: int) -> tuple:
    """A page's tag, TAG's fields in its order (the reserved one 0)."""
    return TAG_MAGIC, generation, region, 0, index


def tag_bytes(generation: int, region: Region, index: int) -> bytes:
    return TAG.pack(*_tag(generation, region, index))


# A kernel page's image costs a SHAKE-256 of 4 KiB (~19 us), and a soak trial writes and verifies the
# same ones again and again (a reset's power-on and generation 1, the kexec's generation 2):
# the coordinator keeps them, up to KEPT_PAGES (keep_images; a CPU process, which computes none,
# keeps none). Not evicted: RAM is written
# in address order, where an LRU smaller than RAM would never hit.
KEPT_PAGES = 16384  # 64 MiB
_kept: dict[tuple[int, int, Region, int], bytes] = {}
_keeping = False


def keep_images() -> None:
    """From now on, page_image() keeps what it computes (up to KEPT_PAGES pages)."""
    global _keeping
    _keeping = True


def page_image(seed: int, generation: int, region: Region, index: int) -> bytes:
    key = (seed, generation, region, index)
    image = _kept.get(key)
    if image is None:
        image = _image(seed, generation, region, index)
        if _keeping and len(_kept) < KEPT_PAGES:
            _kept[key] = image
    return image


_regions: dict[tuple[int, int, Region, int], bytes] = {}
_region_pages = 0  # pages _regions holds, which KEPT_PAGES bounds as it bounds _kept


def region_image(seed: int, generation: int, region: Region, count: int) -> bytes:
    """The images of a region's first ``count`` pages, back to back: a generation's region is
    consecutive pages of RAM, which one comparison then verifies (Relocation.verify: ~2 us a page
    one by one, 623 pages a kexec at 64 CPUs). Kept as page_image keeps pages, up to KEPT_PAGES."""
    global _region_pages
    key = (seed, generation, region, count)
    blob = _regions.get(key)
    if blob is None:
        blob = b"".join(page_image(seed, generation, region, i) for i in range(count))
        if _keeping and _region_pages + count <= KEPT_PAGES:
            _regions[key] = blob
            _region_pages += count
    return blob


_views: dict[tuple, dict[int, tuple[int, memoryview]]] = {}


def page_views(seed: int, generation: int, runs: tuple[tuple[Region, int, int], ...]) -> dict | None:
    """{page: (its address, its image)} for ``runs``, each (region, first page, pages): page
    ``first + i`` holds the region's page ``i``. The images are views into region_image()'s, so
    what Bus.write_pages writes comes from a dict, not a page_image() each (~0.06 ms against
    ~0.38 for the 623 pages of a 64-CPU kernel's boot). Kept while region_image() keeps every
    region named (then these views hold nothing it does not); None when two runs share a page
    (the caller writes each page's image in order, and the last wins)."""
    key = (seed, generation, runs)
    views = _views.get(key)
    if views is not None:
        return views
    views = {}
    for region, first, count in runs:
        mv = memoryview(region_image(seed, generation, region, count))
        for i in range(count):
            views[first + i] = (page_addr(first + i), mv[i * L.PAGE:(i + 1) * L.PAGE])
    if len(views) != sum(count for _r, _f, count in runs):
        return None
    if all((seed, generation, region, count) in _regions for region, _f, count in runs):
        _views[key] = views
    return views


def _image(seed: int, generation: int, region: Region, index: int) -> bytes:
    """A page's image, computed (``page_image`` keeps what it computes)."""
    return tag_bytes(generation, region, index) + _body(seed, generation, region, index)


_ZEROS = bytes(L.PAGE - TAG.size)


def _body(seed: int, generation: int, region: Region, index: int) -> bytes:
    """What follows a page's tag (the module's docstring)."""
    import hashlib  # here: the CPU processes import this module, and compute no image

    if region in _ZERO_BODY:
        return _ZEROS
    if generation == 0:
        return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=_FIRMWARE_UNIT).digest() * (
            (L.PAGE - TAG.size) // _FIRMWARE_UNIT)
    return hashlib.shake_256(f"{seed}:{generation}:{region.name}:{index}".encode()).digest(L.PAGE - TAG.size)


def _images_into(buf: bytearray, seed: int, pages: Iterable[tuple[int, Region, int]]) -> None:
    """Each of ``pages`` (generation, region, index) as _image() computes it, back to back into ``buf``,
    without a bytes object of each (then their join, which took ~90 ms more for a 1024-CPU bring-up's
    ~9400 pages, mostly page faults on the memory each new object took)."""
    at, tag, body = 0, TAG.size, L.PAGE - TAG.size
    for generation, region, index in pages:
        TAG.pack_into(buf, at, *_tag(generation, region, index))
        buf[at + tag:at + tag + body] = _body(seed, generation, region, index)
        at += L.PAGE


def write_pages(bus, seed: int, generation: int, pages: Iterable[tuple[int, Region, int]]) -> int:
    """Write generation ``generation``'s pages through the bus; returns how many monitors they woke."""
    woke = 0
    for page, region, index in pages:
        woke += bus.write(page_addr(page), page_image(seed, generation, region, index))
    return woke


def power_on(bus, geo: L.Geometry, seed: int) -> None:
    """RAM at power-on: firmware's bytes (generation 0) on every page, page by page in address order."""
    write_pages(bus, seed, 0, ((p, Region.FIRMWARE, p) for p in range(geo.npages)))


RAM_CHUNK = 1024  # pages booted_ram() writes at once when it does not write RAM whole (4 MiB)
_booted_ram: dict[tuple, bytearray | None] = {}  # (seed, pages, the map's parts) -> all of RAM (None: booted once)


def booted_ram(bus, geo: L.Geometry, seed: int, m: MemoryMap) -> None:
    """RAM after power-on with kernel ``m`` booted into it (``power_on`` with every page ``m``
    writes left out, then ``boot_kernel``), when nothing can tell the order of the writes: no
    monitor armed, no AP started. Every page is then firmware's or m's, so RAM is written as it
    ends up, RAM_CHUNK pages at a time, each chunk's images made in one buffer: at 1024 CPUs
    ~135 ms of the coordinator's CPU for ~9400 pages (~220 ms as one bytes object of each page's
    image, then their join; page by page, through ``page_image``'s cache, a 4096-CPU bring-up
    spent ~1.5 s on a bus write each of its 34544 pages). From the second power cycle of the
    same seed and kernel on (a soak's resets), RAM is one write of an image kept whole, while
    RAM fits KEPT_PAGES: a trial's reset at 64 CPUs spent ~7.5 ms writing it page by page. The
    bring-up, which has none, makes none."""
    # By value: each power cycle builds generation 1's map anew (maps compare by identity). Not by
    # flavour: no page differs between the three kernels' (a soak's reset boots each in turn), so
    # the boot is keyed as the first flavour's, with every other parameter its own.
    key = (seed, geo.npages, m.gen, dataclasses.replace(m.boot, flavour=FLAVOURS[0]), m.sizes,
           tuple(m.regions.items()), m.window, m.segments)
    ram = _booted_ram.get(key)
    if ram is None:
        own = {page: (m.gen, region, index) for page, region, index in m.pages()}  # the last write wins

        def images(first: int, count: int) -> Iterable[tuple[int, Region, int]]:
            return (own.get(p) or (0, Region.FIRMWARE, p) for p in range(first, first + count))

        if not (_keeping and key in _booted_ram and geo.npages <= KEPT_PAGES):
            if _keeping:  # one machine per coordinator: its seed, generation 1, and whether it booted once
                _booted_ram.clear()
                _booted_ram[key] = None
            chunk = bytearray(min(RAM_CHUNK, geo.npages) * L.PAGE)
            for first in range(0, geo.npages, RAM_CHUNK):
                count = min(RAM_CHUNK, geo.npages - first)
                _images_into(chunk, seed, images(first, count))
                bus.write(page_addr(first), memoryview(chunk)[:count * L.PAGE])
            return
        ram = _booted_ram[key] = bytearray(geo.npages * L.PAGE)
        _images_into(ram, seed, images(0, geo.npages))
    bus.write(page_addr(0), ram)


def boot_kernel(bus, seed: int, m: MemoryMap) -> int:
    """A kernel's own writes until it starts the APs: its image (decompressed, BSS cleared), then
    memblock's allocations, then the slab's: every page of its map, in that order (MemoryMap.pages)."""
    return write_pages(bus, seed, m.gen, m.pages())


def read_tag(seg, page: int) -> PageTag | None:
    """The tag of an emulated page, or None when line 0 holds no valid tag."""
    magic, gen, region, _flags, index = TAG.unpack_from(seg.buf, seg.geo.mem_off + page * L.PAGE)
    if magic != TAG_MAGIC or region not in Region._value2member_map_:
        return None
    return PageTag(gen, Region(region), index)


def is_own_page(seg, m: MemoryMap, page: int) -> bool:
    """O(1): does ``page`` still hold what generation ``m.gen`` put there?"""
    where = m.region_of(page)
    return where is not None and read_tag(seg, page) == PageTag(m.gen, *where)
