"""The bus's looks at the line directory, over a real segment (no CPU processes needed: the
directory's entries are what a CPU's MONITOR stores)."""

import pytest

from conftest import HOT_PATHS, scratch_segment
from smpd.machine import layout as L
from smpd.machine.bus import Bus


@pytest.fixture
def seg():
    with scratch_segment("bus") as s:
        yield s


@pytest.fixture(params=HOT_PATHS)
def either(request):
    """A segment of either hot path: the bus's page writes are its Kicker's loop on a compiled one."""
    with scratch_segment("bus") as s:
        s.set_hdr("hot_path", L.HotPath.C if request.param == "c" else L.HotPath.PYTHON)
        yield s


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


def test_pages_are_written_as_write_writes_each_one_after_the_other(either):
    """write_pages(pages) is write(addr, data) of each page in turn: the same bytes land and the same
    monitors are woken, each named with the line its page's write hit and that write's time; a
    monitor armed between two pages' writes is woken by the later page only if it is on it."""
    seg = either
    bus = Bus(seg)
    pages = [(L.PHYS_BASE + p * L.PAGE, bytes([p]) * L.PAGE) for p in (2, 3, 4)]
    _arm(seg, 3, 2, 1)  # a line of the second page
    _arm(seg, 5, 0, 2)  # a page not written: not woken
    _arm(seg, 4, 9, seg.geo.ncpus)  # an owner beyond the machine's CPUs (a forged entry) names nobody

    def arming():  # CPU 3 arms on page 2 once page 2 is written: that write came before its MONITOR
        for k, page in enumerate(pages):
            yield page
            if k == 0:
                _arm(seg, 2, 5, 3)

    woken = []
    assert bus.write_pages(arming(), woken) == 1
    assert [(addr, cpu) for addr, cpu, _ns in woken] == [(L.PHYS_BASE + 3 * L.PAGE + 2 * L.LINE, 1)]
    assert woken[0][2] > 0
    for addr, data in pages:
        off = seg.geo.mem_off + addr - L.PHYS_BASE
        assert seg.buf[off:off + L.PAGE].tobytes() == data
    assert seg.wake_raised(1) and not seg.wake_raised(2) and not seg.wake_raised(3)
    seg.set_cb(1, "mon_write", 0)
    assert bus.write_pages(pages) == 2  # page 2's monitor too, armed before this write
    assert sum(bus.write(addr, data) for addr, data in pages) == 2  # as write() of each
    with pytest.raises(ValueError, match="whole pages"):
        bus.write_pages([(L.PHYS_BASE, bytes(100))])
    with pytest.raises(ValueError, match="whole pages"):
        bus.write_pages([(L.PHYS_BASE + 64, bytes(L.PAGE))])
    with pytest.raises(ValueError, match="outside emulated memory"):
        bus.write_pages([(L.PHYS_BASE + bus.mem_len, bytes(L.PAGE))])


def test_page_writes_fail_alike_on_either_hot_path(either):
    """The compiled page writes raise what the Python loop raises, word for word, and an item that
    is no (addr, data) pair is an error, not a crash."""
    seg = either
    bus = Bus(seg)
    bad = [([(L.PHYS_BASE + bus.mem_len, bytes(L.PAGE))], ValueError,
            f"bus write of {L.PAGE} bytes at {L.PHYS_BASE + bus.mem_len:#x} is outside emulated memory "
            f"{L.PHYS_BASE:#x}..{L.PHYS_BASE + bus.mem_len:#x}"),
           ([(L.PHYS_BASE, bytes(100))], ValueError, f"write_pages writes whole pages: 100 bytes at {L.PHYS_BASE:#x}"),
           ([(L.PHYS_BASE + 64, bytes(L.PAGE))], ValueError,
            f"write_pages writes whole pages: {L.PAGE} bytes at {L.PHYS_BASE + 64:#x}")]
    for pages, kind, message in bad:
        with pytest.raises(kind) as err:
            bus.write_pages(pages)
        assert str(err.value) == message
    for addr in (0, -L.PAGE, 2**64):  # Python's own hex() of any int
        with pytest.raises(ValueError) as err:
            bus.write_pages([(addr, bytes(L.PAGE))])
        assert str(err.value).startswith(f"bus write of {L.PAGE} bytes at {addr:#x} is outside"), err.value
    for item in [(L.PHYS_BASE,), (L.PHYS_BASE, bytes(L.PAGE), 0), 7]:
        with pytest.raises((ValueError, TypeError)):
            bus.write_pages([item])


def test_page_writes_take_any_pair_and_any_list_of_the_woken(either):
    """(addr, data) may be a list that Python run during the write empties (its data's __len__),
    and the woken may be anything with append: as the Python loop takes them."""
    import collections

    seg = either
    bus = Bus(seg)
    _arm(seg, 1, 0, 1)

    class Emptying(bytearray):
        def __len__(self):
            pair[1] = None  # the pair's hold on this data goes: the write's own must keep it
            return L.PAGE

    pair = [L.PHYS_BASE + L.PAGE, Emptying(b"\x05" * L.PAGE)]
    woken = collections.deque()
    assert bus.write_pages([pair], woken) == 1
    assert [(a, cpu) for a, cpu, _ns in woken] == [(L.PHYS_BASE + L.PAGE, 1)]
    assert seg.buf[seg.geo.mem_off + L.PAGE] == 5


def test_a_page_copied_from_the_segment_itself_lands_whole(either):
    """A page's data may be a view of the segment, overlapping where it goes: it lands as a copy
    made before the store would (memmove, as a memoryview's assignment), not smeared."""
    seg = either
    bus = Bus(seg)
    base = seg.geo.mem_off
    seg.buf[base:base + 3 * L.PAGE] = bytes(range(256)) * (3 * L.PAGE // 256)
    for delta in (-64, -1, 8, 2048):
        want = seg.buf[base + L.PAGE + delta:base + 2 * L.PAGE + delta].tobytes()
        bus.write_pages([(L.PHYS_BASE + L.PAGE, seg.buf[base + L.PAGE + delta:base + 2 * L.PAGE + delta])])
        assert seg.buf[base + L.PAGE:base + 2 * L.PAGE].tobytes() == want, delta


def test_python_run_inside_a_page_write_may_write_pages_too(either):
    """Python runs in the middle of a compiled page write (a woken entry's allocation may collect
    garbage, and a collection's callbacks are Python): a page write made there must not pull the
    segment from under the outer one (it once crashed the interpreter)."""
    import gc

    seg = either
    bus = Bus(seg)
    for line in range(L.LINES_PER_PAGE):
        _arm(seg, 1, line, 1)
    inner = {"busy": False, "writes": 0}

    def collecting(phase, _info):
        if phase == "start" and not inner["busy"]:
            inner["busy"] = True
            try:
                bus.write_pages([(L.PHYS_BASE, bytes(L.PAGE))])
                inner["writes"] += 1
            finally:
                inner["busy"] = False

    threshold = gc.get_threshold()
    gc.callbacks.append(collecting)
    gc.set_threshold(1)
    try:
        for _ in range(50):
            woken: list = []
            assert bus.write_pages([(L.PHYS_BASE + L.PAGE, b"\x07" * L.PAGE)], woken) == L.LINES_PER_PAGE
            assert len(woken) == L.LINES_PER_PAGE
    finally:
        gc.callbacks.remove(collecting)
        gc.set_threshold(*threshold)
    assert inner["writes"] > 0  # the collections did run, and wrote, inside the outer writes
    assert seg.buf[seg.geo.mem_off + L.PAGE] == 7
