"""Each generation's memory map, as pure functions (smpd.kernel.memmap): no process, milliseconds.

These are the facts the kexec outcomes follow from: where each kernel puts its image
and its allocations, and which write of the next kernel reaches which line.
"""

import re

import pytest

from smpd.kernel.memmap import (PERCPU_PER_PAGE, TASKS_PER_PAGE, Boot, Region, Sizes, cold_boot, kexec_load,
                                page_addr)
from smpd.machine.layout import LINE, PAGE, PHYS_BASE


def sizes(ncpus=16, **kw):
    base = Sizes(ncpus, **kw)
    return Sizes(ncpus, base.text, base.data, base.pgtables, base.stack_per_cpu, crash=base.crash_needed)


def chain(boot: Boot, n: int, s: Sizes | None = None):
    s = s or sizes()
    maps = [cold_boot(s, boot)]
    for _ in range(n):
        maps.append(kexec_load(maps[-1], boot))
    return maps


def written(new) -> list[int]:
    """Every page the kexec into ``new`` writes before it starts an AP, in order: the copy's
    segments, then the new kernel's own image and allocations."""
    return [f + i for f, n, _r in new.segments for i in range(n)] + [p for p, _r, _i in new.pages()]


def first_hit(old, new, cpu: int) -> tuple[int, str] | None:
    """(order of the write, what it is) of the first write that reaches ``cpu``'s monitored line."""
    page = (old.monitor_addr(cpu) - PHYS_BASE) // PAGE
    for n, p in enumerate(written(new)):
        if p == page:
            where = new.region_of(p)
            return n, (where[0].name.lower() if where else "segment")
    return None


def test_a_cold_boot_runs_at_load_physical_addr_with_memblock_on_top_and_the_slab_above_the_image():
    s = sizes()
    g1 = cold_boot(s, Boot())
    assert g1.regions[Region.TEXT] == 0 and g1.regions[Region.DATA] == s.text
    assert g1.regions[Region.PGTABLE] + s.pgtables == s.ram - s.crash  # the top, below the crash region
    assert g1.regions[Region.PERCPU] < g1.regions[Region.PGTABLE]
    assert g1.regions[Region.TASKS] == s.image  # lowest free page: right above the image
    assert g1.regions[Region.STACK] == s.image + s.tasks


def test_kexec_file_load_places_the_next_kernel_top_down_and_it_runs_there():
    s = sizes()
    g1, g2 = chain(Boot(), 1, s)
    segs = {r: (f, n) for f, n, r in g2.segments}
    top = s.ram - s.crash
    assert segs[Region.PURGATORY] == (top - 1, 1) and segs[Region.BOOTPARAMS] == (top - 2, 1)
    assert segs[Region.BZIMAGE] == (top - 2 - s.image, s.image)
    assert g2.regions[Region.TEXT] == top - 2 - s.image  # decompressed in place (no KASLR)
    assert g2.regions[Region.TASKS] == 0  # lowest first: where generation 1's image was


def test_every_kexecd_kernel_is_placed_alike_so_its_allocations_land_on_its_predecessors():
    g1, g2, g3, g4 = chain(Boot(flavour="pre-fix", nosmt=True), 3)
    assert g2.regions == g3.regions == g4.regions
    assert g1.regions != g2.regions


def test_cover_letter_the_first_kexec_survives_and_the_second_wakes_every_parked_sibling():
    g1, g2, g3 = chain(Boot(flavour="pre-fix", nosmt=True), 2)
    siblings = range(1, 16, 2)
    assert all(first_hit(g1, g2, c) is None for c in siblings)  # link 1: nothing reaches gen 1's task_structs
    hits = [first_hit(g2, g3, c) for c in siblings]
    assert all(h is not None and h[1] == "tasks" for h in hits)  # link 2: gen 3's fork_idle() writes them
    assert g3.symbol(g2.thread_info_addr(1)) == "thread_info[1].flags"


def test_the_fix_moves_the_monitored_line_into_the_per_cpu_area():
    g1, g2 = chain(Boot(flavour="6.6"), 1)
    assert g1.monitor_addr(3) == g1.mwait_cpu_dead_addr(3)
    assert g1.symbol(g1.mwait_cpu_dead_addr(3) + 4) == "mwait_cpu_dead[3].status"
    # The copy reaches generation 1's per-CPU area (top of RAM): a CPU the kick left in MWAIT wakes.
    hit = first_hit(g1, g2, 3)
    assert hit is not None and hit[0] < sum(n for _f, n, _r in g2.segments)  # a write of the copy itself


def test_lines_of_one_map_never_coincide():
    g = cold_boot(sizes(ncpus=200), Boot())
    lines = [g.mwait_cpu_dead_addr(c) // LINE for c in range(200)] + [g.thread_info_addr(c) // LINE
                                                                       for c in range(200)]
    assert len(set(lines)) == len(lines)
    assert g.counts[Region.PERCPU] == -(-200 // PERCPU_PER_PAGE) and g.counts[Region.TASKS] == -(-200 // TASKS_PER_PAGE)


@pytest.mark.parametrize("boot", [Boot(), Boot(kaslr=3), Boot(flavour="pre-fix", crash=True)])
def test_region_of_names_exactly_the_pages_a_generation_keeps(boot):
    """region_of(page) over all of RAM, for a cold boot, a KASLR one and a crash kernel: each page
    of each region is (region, its index there), and every other page is no generation's page."""
    s = sizes(ncpus=40)
    m = cold_boot(s, boot) if not boot.crash else kexec_load(cold_boot(s, Boot(flavour="pre-fix")), boot)
    want = {first + i: (region, i) for region, first in m.regions.items() for i in range(m.counts[region])}
    assert len(want) == sum(m.counts.values())  # the regions do not overlap
    assert {p: m.region_of(p) for p in range(s.ram + 1)} == {p: want.get(p) for p in range(s.ram + 1)}


def test_a_crash_kernel_lives_in_the_crashkernel_region_and_writes_nothing_outside_it():
    s = sizes()
    g1 = cold_boot(s, Boot(flavour="pre-fix", nosmt=True))
    crash = kexec_load(g1, Boot(flavour="pre-fix", crash=True))
    lo, hi = s.ram - s.crash, s.ram
    assert crash.segments == () and all(lo <= p < hi for p, _r, _i in crash.pages())
    assert all(first_hit(g1, crash, c) is None for c in range(1, 16))


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_kaslr_moves_only_where_the_image_runs_and_is_a_function_of_its_seed(seed):
    s = sizes()
    a = cold_boot(s, Boot(kaslr=seed))
    assert a.regions == cold_boot(s, Boot(kaslr=seed)).regions  # any process rebuilds the same map
    assert a.counts == cold_boot(s, Boot()).counts
    assert 0 <= a.regions[Region.TEXT] <= s.ram - s.crash - s.image


def test_kaslr_changes_which_write_wakes_a_parked_cpu():
    """Only the memory map changes (the KASLR seed); the first write that reaches CPU 1's line changes."""
    hits = {}
    for seed in range(40):
        g1, g2, g3 = chain(Boot(flavour="pre-fix", nosmt=True, kaslr=seed), 2)
        hits[seed] = first_hit(g2, g3, 1)
    assert len({h[1] if h else None for h in hits.values()}) > 1, hits


def test_sizes_hold_two_generations_and_the_crash_region():
    s = sizes(ncpus=64)
    assert s.ram == s.ram_needed >= s.crash + 2 * (s.image + s.memblock + s.slab)
    assert page_addr(0) == PHYS_BASE


def test_boot_parameters_say_which_cpus_a_kernel_starts_and_parks():
    b = Boot(nosmt=True, maxcpus=6)
    assert [c for c in range(8) if b.started(c)] == [0, 1, 2, 3, 4, 5]
    assert [c for c in range(8) if b.parks_at_boot(c)] == [1, 3, 5]
    assert [c for c in range(8) if Boot(crash=True).started(c)] == [0]
    assert Boot(flavour="pre-fix", nosmt=True, maxcpus=6, kaslr=3).text() == "pre-fix nosmt maxcpus=6 kaslr=3"


def test_resolve_is_the_inverse_of_symbol():
    s = sizes(ncpus=16)
    fixed, prefix = cold_boot(s, Boot()), cold_boot(s, Boot(flavour="pre-fix"))
    npages = s.ram
    for cpu in (0, 5, 15):
        for field, off in (("", 0), (".control", 0), (".status", 4)):
            addr = fixed.resolve(f"mwait_cpu_dead[{cpu}]{field}", 16, npages)
            assert addr == fixed.mwait_cpu_dead_addr(cpu) + off
            assert fixed.symbol(addr) == f"mwait_cpu_dead[{cpu}]{field or '.control'}"
        addr = prefix.resolve(f"thread_info[{cpu}]", 16, npages)
        assert prefix.symbol(addr) == f"thread_info[{cpu}].flags"
    assert fixed.resolve(hex(PHYS_BASE + 4), 16, npages) == PHYS_BASE + 4
    from smpd.errors import BadInput
    for bad, says in (("mwait_cpu_dead[16]", "CPUs 0-15"), ("thread_info[1].status", "field flags"),
                      ("0x3", "outside emulated memory"), ("nonsense", "is not an address")):
        with pytest.raises(BadInput, match=re.escape(says)):
            fixed.resolve(bad, 16, npages)
    with pytest.raises(BadInput, match="predates the fix"):
        prefix.resolve("mwait_cpu_dead[1]", 16, npages)
