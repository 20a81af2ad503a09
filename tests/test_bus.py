"""The bus's looks at the line directory, over a real segment (no CPU processes needed: the
directory's entries are what a CPU's MONITOR stores)."""

import os

import pytest

from conftest import run_name
from smpd.host import names, trust
from smpd.machine import layout as L
from smpd.machine.bus import Bus
from smpd.machine.segment import Segment


@pytest.fixture
def seg():
    s = Segment.create(names.segment(run_name("bus")), L.Geometry(4, 16), os.getpid(), trust.start_ticks(os.getpid()))
    try:
        yield s
    finally:
        s.close()
        s.unlink()


def _arm(seg, page: int, line: int, cpu: int) -> None:
    seg.u16[seg.geo.dir_off // L.DIR_ENTRY + page * L.LINES_PER_PAGE + line] = cpu + 1


def test_the_monitored_pages_are_those_with_a_monitor_on_any_line(seg):
    bus = Bus(seg)
    npages = bus.mem_len // L.PAGE
    assert bus.monitored_pages(range(npages)) == set()
    _arm(seg, 0, 0, 1)  # the first line of the first page
    _arm(seg, 5, L.LINES_PER_PAGE - 1, 2)  # the last line of a page
    _arm(seg, npages - 1, 17, 3)  # the last page
    assert bus.monitored_pages(range(npages)) == {0, 5, npages - 1}
    assert bus.monitored_pages([4, 5, 6]) == {5}  # only those asked about
    assert bus.monitored_pages(iter([6, 0])) == {0}  # any iterable, once
    # The same answer as a look at each line's entry.
    d, base = seg.u16, seg.geo.dir_off // L.DIR_ENTRY
    assert bus.monitored_pages(range(npages)) == {
        p for p in range(npages) if any(d[base + p * L.LINES_PER_PAGE + i] for i in range(L.LINES_PER_PAGE))}


def test_a_run_of_pages_is_stored_and_wakes_as_one_write_of_them_all(seg):
    """write_pages(addr, pages) is write(addr, b"".join(pages)) without the joined copy: the same
    bytes land, and the same monitors are woken, each named with the line the run hit."""
    bus = Bus(seg)
    pages = [bytes([k + 1]) * L.PAGE for k in range(3)]
    _arm(seg, 3, 2, 1)  # a line of the run's second page
    _arm(seg, 5, 0, 2)  # the page after the run: not written, not woken
    woken = []
    assert bus.write_pages(L.PHYS_BASE + 2 * L.PAGE, pages, woken) == 1
    assert woken == [(L.PHYS_BASE + 3 * L.PAGE + 2 * L.LINE, 1)]
    off = seg.geo.mem_off + 2 * L.PAGE
    assert seg.buf[off:off + 3 * L.PAGE].tobytes() == b"".join(pages)
    assert seg.wake_raised(1) and not seg.wake_raised(2)
    seg.set_cb(1, "mon_write", 0)
    joined = []
    assert bus.write(L.PHYS_BASE + 2 * L.PAGE, b"".join(pages), joined) == 1 and joined == woken
    with pytest.raises(ValueError, match="pages of 4096 bytes"):
        bus.write_pages(L.PHYS_BASE, [bytes(100)])
    with pytest.raises(ValueError, match="outside emulated memory"):
        bus.write_pages(L.PHYS_BASE + bus.mem_len - L.PAGE, pages)
