"""The emulated kernel image: tagged 4 KiB pages whose contents derive from the machine seed.

Every page starts with a 16-byte tag (magic, kernel generation, region, index in
region), so anyone can tell in O(1) whose page it is: the old kernel's, the new
kernel's, or neither (foreign bytes, a torn copy). The rest of a text, page-table
or stack page is SHAKE-256 of (seed, generation, region, index): deterministic,
cheap to regenerate for verification, and different for every generation. Per-CPU
data pages are zero after the tag, like the kernel's zero-initialised per-CPU
variables (``mwait_cpu_dead`` starts as {0, 0}).
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from smpd.machine import layout as L

TAG = struct.Struct("<4sIHHI")
TAG_MAGIC = b"KPG1"


class PageTag(NamedTuple):
    generation: int
    region: L.Region
    index: int


def page_image(seed: int, generation: int, region: L.Region, index: int) -> bytes:
    tag = TAG.pack(TAG_MAGIC, generation, region, 0, index)
    if region == L.Region.PERCPU:
        return tag + bytes(L.PAGE - TAG.size)
    body = hashlib.shake_256(f"{seed}:{generation}:{region.name}:{index}".encode()).digest(L.PAGE - TAG.size)
    return tag + body


def load_kernel(bus, geo: L.Geometry, seed: int, generation: int) -> None:
    """Write a whole kernel image of ``generation`` into emulated memory, through the bus."""
    for page in range(geo.npages):
        region, index = geo.region_of(page)
        bus.write(L.PHYS_BASE + page * L.PAGE, page_image(seed, generation, region, index))


def read_tag(seg, page: int) -> PageTag | None:
    """The tag of an emulated page, or None when line 0 holds no valid tag."""
    magic, gen, region, _flags, index = TAG.unpack_from(seg.buf, seg.geo.mem_off + page * L.PAGE)
    if magic != TAG_MAGIC or region not in L.Region._value2member_map_:
        return None
    return PageTag(gen, L.Region(region), index)
