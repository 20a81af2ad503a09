"""A kernel starting its APs (smpd.kernel.boot.start_aps), against CPU processes of this test's
own over a real segment: INIT, then SIPI, in one mailbox message to each.

An MCE that reaches a CPU between its INIT and its SIPI shuts it down (INIT cleared CR4.MCE), and
the SIPI finds it no longer in wait-for-SIPI: it ignores it, and never reports in. The race is
made certain here: that CPU's process sends itself the MCE right after it takes INIT.
"""

import contextlib
import dataclasses
import os
import signal
import time

import pytest

from conftest import HOT_PATHS, hot_paths, scratch_segment, wait_until
from smpd import config
from smpd.errors import SmpdError
from smpd.host.proc import die_with_parent
from smpd.kernel import boot as kboot, cpu as kcpu, generations, image, kick as kick_mod, memmap
from smpd.kernel.handoff import Handoff
from smpd.machine import events, layout as L
from smpd.machine.bus import Bus
from smpd.machine.core import IPI_IGNORED, install_interrupt_handlers
from smpd.machine.mailbox import Mailbox

NCPUS = 4
VICTIM = 2  # the CPU the MCE reaches between INIT and SIPI
DOWN = 3  # a CPU the boot takes offline again (CPU_DOWN after its SIPI, in the same message)


class _Port:
    """What start_aps needs of a coordinator: the segment, the mailbox, whether a CPU lives."""

    def __init__(self, seg, bus, pids: dict[int, int]):
        self.seg, self.pids = seg, pids
        self.mailbox = Mailbox(seg, bus, self.cpus_alive, lambda cpu: None)

    def cpu_alive(self, cpu: int) -> bool:
        return os.waitpid(self.pids[cpu], os.WNOHANG) == (0, 0)

    def cpus_alive(self, cpus) -> set[int]:
        return {c for c in cpus if self.cpu_alive(c)}

    def ipi_wait(self, cpus, cmd, timeout_s, then=()):
        return self.mailbox.send_and_wait(cpus, cmd, timeout_s, then)


def _cpu_process(seg, bus, cpu: int, signals: dict[str, int], child=None) -> int:
    """CPU ``cpu``'s process, forked from this one; ``child`` runs in it first (a test's patch). It
    starts in wait-for-SIPI, stored first, and its pid goes in its control block, as the coordinator
    has a CPU process forked and adopts it (smpd.daemon.template, smpd.daemon.supervisor)."""
    seg.set_cb(cpu, "state", L.ExecState.WAIT_FOR_SIPI)
    seg.set_cb(cpu, "hotplug", L.Hotplug.OFFLINE)
    pid = os.fork()
    if pid:
        seg.set_cb(cpu, "pid", pid)
        return pid
    try:
        if child is not None:
            child()
        if cpu == VICTIM:
            init_reset = kcpu.Cpu.init_reset

            def init_then_mce(self):
                nxt = init_reset(self)
                os.kill(os.getpid(), signals["mce"])  # before the SIPI that follows in the message
                return nxt

            kcpu.Cpu.init_reset = init_then_mce
        die_with_parent(os.getppid())
        install_interrupt_handlers(signals)  # as the template does before it forks
        kcpu.cpu_main(kcpu.Cpu(seg, bus, cpu, signals), None)
    finally:
        os._exit(70)


@contextlib.contextmanager
def _machine_segment(tmp_path, label: str, hot_path: L.HotPath = L.HotPath.PYTHON, watch: L.Watch = L.Watch.ADAPTIVE):
    """(config, segment) of an NCPUS machine of this test's own: the segment sized and its header
    written as `smpd up` writes them (seed 7, the Python hot path and the adaptive watch unless
    ``hot_path``, ``watch``), with no coordinator or CPU."""
    conf = tmp_path / "boot.toml"
    conf.write_text(f"[machine]\ncpus = {NCPUS}\n")
    cfg = config.load(conf)
    sizes = cfg.sizes()
    with scratch_segment(label, L.Geometry(NCPUS, sizes.ram)) as seg:
        for field, value in (("ram_pages", sizes.ram), ("crash_pages", sizes.crash), ("seed", 7),
                             ("watch", watch), ("hot_path", hot_path),
                             ("text_pages", sizes.text), ("data_pages", sizes.data),
                             ("pgtable_pages", sizes.pgtables), ("stack_pages_per_cpu", sizes.stack_per_cpu)):
            seg.set_hdr(field, value)
        yield cfg, seg


@pytest.fixture
def powered_on(tmp_path):
    """A segment with generation 1 in RAM and a process per AP, in wait-for-SIPI."""
    with _machine_segment(tmp_path, "boot") as (cfg, seg):
        pids: dict[int, int] = {}
        try:
            bus = Bus(seg)
            gen1 = kboot.power_on(seg, bus, cfg.boot())
            for cpu in range(1, NCPUS):
                pids[cpu] = _cpu_process(seg, bus, cpu, cfg.signals())
            yield _Port(seg, bus, pids), gen1
        finally:
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def test_a_cpu_an_mce_reaches_between_init_and_sipi_ignores_the_sipi_and_is_not_started(powered_on):
    port, gen1 = powered_on
    r = kboot.start_aps(port, gen1, list(range(1, NCPUS)), 5.0, offline=[DOWN])
    assert r["missing"] == []
    assert r["sipi_ignored"] == {VICTIM: "SHUTDOWN, fault MCE_SHUTDOWN"}
    assert sorted(r["started"]) == [1, DOWN]
    seg = port.seg
    assert seg.cb(VICTIM, "state") == L.ExecState.SHUTDOWN and seg.cb(VICTIM, "hotplug") == L.Hotplug.OFFLINE
    assert seg.cb(DOWN, "state") == L.ExecState.MWAIT  # its CPU_DOWN came after a SIPI it took
    assert seg.cb(1, "state") == L.ExecState.RUNNING
    with pytest.raises(SmpdError, match=r"bring-up: CPU 2 \(SHUTDOWN, fault MCE_SHUTDOWN\) did not take its SIPI"):
        kboot.require_sipi_taken(r, "bring-up")


def test_booted_ram_in_one_write_or_in_chunks_is_power_on_then_the_kernels_own_writes(tmp_path, monkeypatch):
    """With no monitor armed and no AP started, RAM is written as it ends up (smpd.kernel.image.booted_ram):
    RAM_CHUNK pages at a time at a first power cycle, then whole from the image kept, or in chunks again
    when too big to keep, it must hold exactly what firmware's bytes page by page, then the booting
    kernel's own writes, leave."""
    with _machine_segment(tmp_path, "ram") as (cfg, seg):
        bus = Bus(seg)
        m = kboot.load_first(seg, cfg.boot())
        mem = slice(seg.geo.mem_off, seg.geo.mem_off + seg.geo.npages * L.PAGE)

        def ram_after(write) -> bytes:
            seg.buf[mem] = bytes(seg.geo.npages * L.PAGE)
            write()
            return bytes(seg.buf[mem])

        by_page = ram_after(lambda: (image.power_on(bus, seg.geo, 7), image.boot_kernel(bus, 7, m)))
        monkeypatch.setattr(image, "_keeping", True)
        monkeypatch.setattr(image, "_booted_ram", {})
        monkeypatch.setattr(image, "RAM_CHUNK", 7)  # the last chunk a short one
        assert seg.geo.npages % 7
        assert ram_after(lambda: image.booted_ram(bus, seg.geo, 7, m)) == by_page  # in chunks
        assert list(image._booted_ram.values()) == [None]
        assert ram_after(lambda: image.booted_ram(bus, seg.geo, 7, m)) == by_page  # whole, made and kept
        assert ram_after(lambda: image.booted_ram(bus, seg.geo, 7, m)) == by_page  # whole, as kept
        assert [len(ram) for ram in image._booted_ram.values()] == [len(by_page)]
        monkeypatch.setattr(image, "_booted_ram", {})
        monkeypatch.setattr(image, "KEPT_PAGES", seg.geo.npages - 1)
        for _cycle in range(2):
            assert ram_after(lambda: image.booted_ram(bus, seg.geo, 7, m)) == by_page  # in chunks, twice
        assert list(image._booted_ram.values()) == [None]
        assert by_page.count(image.TAG_MAGIC) >= seg.geo.npages  # every page was written


def test_a_reset_clears_its_fields_of_each_control_block_and_nothing_else():
    """The reset clears a CPU's fault, kick stamp, pending and held interrupts and generation
    (smpd.daemon.kernel_ops, in a few stores of adjacent fields): each of those reads 0 after,
    and every other byte of that control block, and of its neighbours', is as it was."""
    from smpd.daemon.kernel_ops import _RESET_CLEARS

    fields = ("fault", "fault_page", "fault_addr", "fault_value", "fault_cause", "fault_cause_arg", "fault_ns",
              "fault_gen", "stray_stores", "kick_seen_ns", "nmi_pending", "smi_pending", "mce_pending", "nmi_held",
              "smi_held", "mce_held", "cpu_gen")
    assert L.cb_ranges(fields) == _RESET_CLEARS
    with scratch_segment("clear") as seg:
        cbs = slice(L.CB_OFF + L.CB_SIZE, L.CB_OFF + 4 * L.CB_SIZE)  # CPUs 1-3
        seg.buf[cbs] = b"\xa5" * (cbs.stop - cbs.start)
        seg.clear_cb(2, _RESET_CLEARS)
        assert all(seg.cb(2, f) == 0 for f in fields)
        covered = {L.CB[f][0] + i for f in fields for i in range(L.CB[f][1].size)}
        after = bytes(seg.buf[cbs])
        for cpu in (1, 2, 3):
            block = after[(cpu - 1) * L.CB_SIZE:cpu * L.CB_SIZE]
            kept = [b for i, b in enumerate(block) if cpu != 2 or i not in covered]
            assert kept == [0xA5] * len(kept), f"CPU {cpu}"
        assert seg.cb(2, "pid") and seg.cb(2, "mbox_seq") and seg.cb(2, "init_count")  # not a reset's to clear


@contextlib.contextmanager
def _cpu1_running(tmp_path, label: str, hot_path: str, watch: str = "adaptive", child=None, budget_ns: int = 0,
                  spurious_per_s: float = 0.0, kernel: str | None = None):
    """(config, segment, port, pid) with generation 1 booted (as ``kernel``, when given) and CPU 1's
    process of this test's own started by it, online and idle (`running`), on that hot path and
    watch (and adaptive spin budget and spurious MWAIT wake-ups, when given); ``child`` runs first
    in that process; killed after."""
    with _machine_segment(tmp_path, label, L.HotPath[hot_path.upper()], L.Watch[watch.upper()]) as (cfg, seg):
        bus = Bus(seg)
        boot = cfg.boot() if kernel is None else dataclasses.replace(cfg.boot(), flavour=kernel)
        gen1 = kboot.power_on(seg, bus, boot)
        seg.set_hdr("spin_budget_ns", budget_ns)
        seg.set_hdr("spurious_per_s", spurious_per_s)
        pid = _cpu_process(seg, bus, 1, cfg.signals(), child)
        try:
            port = _Port(seg, bus, {1: pid})
            assert kboot.start_aps(port, gen1, [1], 5.0)["started"] == [1]
            assert seg.cb(1, "state") == L.ExecState.RUNNING
            yield cfg, seg, port, pid
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_an_init_alone_to_a_running_cpu_leaves_it_in_wait_for_sipi_where_an_nmi_is_held(tmp_path, hot_path):
    """A power cycle's first message, INIT alone, to an online idle CPU: the compiled path takes it
    without the interpreter (smpd/machine/_hotpath.c, take_init), the Python path in init_reset;
    either way the CPU counts, logs and acknowledges it and is in wait-for-SIPI, where the NMI that
    comes next is held, not taken, until a SIPI starts the CPU again."""
    with _cpu1_running(tmp_path, f"init-{hot_path}", hot_path) as (cfg, seg, port, pid):
        mark = seg.cb(1, "ev_head")
        results, missing = port.ipi_wait([1], L.Ipi.INIT, 5.0)
        assert (results, missing) == ({1: 0}, [])
        assert (seg.cb(1, "state"), seg.cb(1, "hotplug")) == (L.ExecState.WAIT_FOR_SIPI, L.Hotplug.OFFLINE)
        assert seg.cb(1, "init_count") == 2  # start_aps' INIT, then this one
        assert [code for _ns, code, _arg in events.read_since(seg, 1, mark)[0]] == [L.Ev.INIT]
        os.kill(pid, cfg.signals()["nmi"])
        wait_until(lambda: seg.cb(1, "nmi_held") == 1, what="the NMI held in wait-for-SIPI")
        assert (seg.cb(1, "nmi_taken"), seg.cb(1, "nmi_pending")) == (0, 1)
        assert port.ipi_wait([1], L.Ipi.SIPI, 5.0) == ({1: 0}, [])
        wait_until(lambda: seg.cb(1, "nmi_taken") == 1, what="the held NMI taken once the SIPI started the CPU")
        assert seg.cb(1, "state") == L.ExecState.RUNNING


@pytest.mark.parametrize("state", ["running", "hlt"])
@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_an_nmi_that_comes_before_an_init_alone_is_taken_before_it(tmp_path, case, state):
    """An NMI signalled to an idle (or halted) CPU before an INIT alone reaches it is taken first,
    in the kernel it runs, and the INIT after it, on either hot path and watch: here both are there
    when the CPU looks (its process stopped while they arrive; the kernel delivers the signal
    before it runs again). The compiled wait must leave such an INIT to Python (take_init: an
    interrupt not taken yet)."""
    watch, hot_path = case
    with _cpu1_running(tmp_path, f"nmi-init-{watch}-{hot_path}-{state}", hot_path, watch) as (cfg, seg, port, pid):
        if state == "hlt":  # stop_other_cpus()'s REBOOT vector: halted for good, online no more
            assert port.ipi_wait([1], L.Ipi.REBOOT, 5.0) == ({1: 0}, [])
            wait_until(lambda: seg.cb(1, "state") == L.ExecState.HLT, what="REBOOT halting the CPU")
        mark = seg.cb(1, "ev_head")
        os.kill(pid, signal.SIGSTOP)
        try:
            os.kill(pid, cfg.signals()["nmi"])
            seq = port.mailbox.send(1, L.Ipi.INIT)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: seg.cb(1, "mbox_ack") == seq, what="the INIT's acknowledgement")
        assert (seg.cb(1, "nmi_taken"), seg.cb(1, "nmi_held")) == (1, 0)
        codes = [code for _ns, code, _arg in events.read_since(seg, 1, mark)[0]]
        assert codes.index(L.Ev.INTERRUPT) < codes.index(L.Ev.INIT), codes
        assert seg.cb(1, "state") == L.ExecState.WAIT_FOR_SIPI


def _codes_since(seg, mark: int) -> list[tuple[int, L.Ev]]:
    return [(ns, code) for ns, code, _arg in events.read_since(seg, 1, mark)[0]]


def _start(port, seg, then: tuple[L.Ipi, ...]) -> list[tuple[int, L.Ev]]:
    """INIT, then ``then``, to CPU 1 in one message, acknowledged; the events it logged for it."""
    mark = seg.cb(1, "ev_head")
    assert port.ipi_wait([1], L.Ipi.INIT, 5.0, then=then) == ({1: 0}, [])
    return _codes_since(seg, mark)


def _halted(seg) -> bool:
    """CPU 1 in HLT, its way there logged (the Python path logs HLT after the state)."""
    head = seg.cb(1, "ev_head")
    return seg.cb(1, "state") == L.ExecState.HLT and bool(head) and \
        events.read_since(seg, 1, head - 1)[0][-1][1] == L.Ev.HLT


def _in_one_step(logged: list[tuple[int, L.Ev]]) -> bool:
    """Were these events logged in one step, at one clock read (the compiled path's take_init, with
    no interpreter between them; the Python path reads the clock for each, microseconds apart)?"""
    return len({ns for ns, _code in logged if _code in (L.Ev.INIT, L.Ev.SIPI)}) == 1


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_init_and_sipi_restart_a_cpu_in_the_generation_the_header_names_where_it_then_runs(tmp_path, hot_path):
    """A kernel starting an AP it started before (INIT then SIPI in one message, to a CPU online in
    an earlier kernel): init_reset(), start_secondary(), smp_callin() in the generation the header
    names, running. The compiled path takes it once the CPU has been started in that generation by
    the Python path (Init.learn); a generation it never ran is the Python path's. Either way the
    CPU counts, logs and acknowledges each IPI, clears the fix's mwait_cpu_dead, and then runs in
    that generation's memory: an NMI's handler finds its pages (a CPU left with the last map would
    resume in pages that kernel never wrote: a fault)."""
    with _cpu1_running(tmp_path, f"restart-{hot_path}", hot_path) as (cfg, seg, port, pid):
        gen1 = kboot.current(seg)
        gen2 = memmap.kexec_load(gen1, gen1.boot)
        generations.record(seg, gen2)
        compiled = hot_path == "c"
        for gen, first_time in ((2, True), (2, False), (1, False)):
            seg.set_hdr("generation", gen)
            m = gen2 if gen == 2 else gen1
            Bus(seg).write(m.mwait_cpu_dead_addr(1), L.CPUDEAD_MWAIT_KEXEC_HLT.to_bytes(4, "little") * 2)
            before = seg.cb(1, "sipi_count"), seg.cb(1, "init_count")
            logged = _start(port, seg, (L.Ipi.SIPI,))
            assert [code for _ns, code in logged] == [L.Ev.INIT, L.Ev.SIPI]
            assert _in_one_step(logged) == (compiled and not first_time), logged
            assert (seg.cb(1, "sipi_count"), seg.cb(1, "init_count")) == (before[0] + 1, before[1] + 1)
            assert (seg.cb(1, "state"), seg.cb(1, "hotplug"), seg.cb(1, "cpu_gen")) == \
                (L.ExecState.RUNNING, L.Hotplug.ONLINE, gen)
            md = m.mwait_cpu_dead_addr(1)
            assert (seg.mem_u32(md), seg.mem_u32(md + 4)) == (0, 0)  # smp_callin(): the fix's clear
        os.kill(pid, cfg.signals()["nmi"])
        wait_until(lambda: seg.cb(1, "nmi_taken") == 1, what="the NMI taken in generation 1")
        assert (seg.cb(1, "fault"), seg.cb(1, "state")) == (L.Fault.NONE, L.ExecState.RUNNING)


@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_init_sipi_and_cpu_down_park_a_cpu_where_the_kick_then_finds_it(tmp_path, case):
    """A reset that leaves a CPU offline sends it INIT, SIPI and CPU_DOWN in one message: it starts,
    goes offline through play_dead(), and parks in the fix's mwait_play_dead() (status and control
    CPUDEAD_MWAIT_WAIT, MONITOR armed on the line) before it acknowledges; the compiled path takes
    all of it in a generation it knows, and goes on waiting as MWAIT, where the kick is
    acknowledged and the CPU halts, as on the Python path."""
    watch, hot_path = case
    with _cpu1_running(tmp_path, f"park-{watch}-{hot_path}", hot_path, watch) as (cfg, seg, port, pid):
        logged = _parked_by(port, seg, L.Ipi.INIT, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
        assert [code for _ns, code in logged] == [L.Ev.INIT, L.Ev.SIPI, L.Ev.OFFLINE]
        assert _in_one_step(logged) == (hot_path == "c"), logged
        _kicked_into_hlt_then_nmi(cfg, seg, pid)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_an_nmi_held_in_wait_for_sipi_is_taken_once_init_and_sipi_start_the_cpu(tmp_path, hot_path):
    """smp_callin() delivers what wait-for-SIPI held: the compiled path leaves such a start to the
    Python path, which takes the NMI once the CPU runs."""
    with _cpu1_running(tmp_path, f"held-{hot_path}", hot_path) as (cfg, seg, port, pid):
        assert port.ipi_wait([1], L.Ipi.INIT, 5.0) == ({1: 0}, [])
        os.kill(pid, cfg.signals()["nmi"])
        wait_until(lambda: seg.cb(1, "nmi_pending") == 1, what="the NMI held in wait-for-SIPI")
        _start(port, seg, (L.Ipi.SIPI,))
        wait_until(lambda: seg.cb(1, "nmi_taken") == 1, what="the held NMI taken once the CPU runs")
        assert (seg.cb(1, "state"), seg.cb(1, "nmi_pending")) == (L.ExecState.RUNNING, 0)


@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_kicked_cpus_start_and_park_again_round_after_round(tmp_path, case):
    """A soak's CPU, round after round: parked, kicked into HLT, then INIT and SIPI from the new
    kernel (running), or INIT, SIPI and CPU_DOWN from a reset (parked again), and kicked again.
    The compiled path answers the kick and then takes what follows in HLT in the same wait (a
    loop, not a deeper call each round); each round leaves what the Python path leaves."""
    watch, hot_path = case
    with _cpu1_running(tmp_path, f"rounds-{watch}-{hot_path}", hot_path, watch) as (cfg, seg, port, pid):
        md = kboot.current(seg).mwait_cpu_dead_addr(1)
        bus = Bus(seg)
        _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
        for round_ in range(6):
            assert kick_mod.kick_one(seg, bus, 1, md, 5000, 1_000_000)["acknowledged"], round_
            wait_until(lambda: _halted(seg), what="the kicked CPU in HLT")
            park = round_ % 2 == 0
            logged = _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN) if park else (L.Ipi.SIPI,))
            assert [code for _ns, code in logged] == [L.Ev.INIT, L.Ev.SIPI] + ([L.Ev.OFFLINE] if park else [])
            assert _in_one_step(logged) == (hot_path == "c"), (round_, logged)
            assert seg.cb(1, "state") == (L.ExecState.MWAIT if park else L.ExecState.RUNNING)
            if not park:  # parked again through the Python path's own CPU_DOWN
                assert port.ipi_wait([1], L.Ipi.CPU_DOWN, 5.0) == ({1: 0}, [])
            assert (seg.cb(1, "state"), seg.mem_u32(md + 4)) == (L.ExecState.MWAIT, L.CPUDEAD_MWAIT_WAIT)
        os.kill(pid, cfg.signals()["nmi"])  # in MWAIT: the handler returns into the loop, parked
        wait_until(lambda: seg.cb(1, "nmi_taken") == 1, what="the NMI in MWAIT")
        wait_until(lambda: seg.cb(1, "mon_armed") == 1, what="MONITOR armed again")
        assert (seg.cb(1, "fault"), seg.cb(1, "state"), seg.cb(1, "wake_write")) == (L.Fault.NONE, L.ExecState.MWAIT, 6)


def _parked_by(port, seg, cmd: L.Ipi, then: tuple[L.Ipi, ...] = ()) -> list[tuple[int, L.Ev]]:
    """``cmd`` (and ``then``) to CPU 1 in one message, acknowledged: CPU 1 parked in the fix's
    mwait_play_dead() of the running generation (status and control CPUDEAD_MWAIT_WAIT, MONITOR
    armed on the line, one more entry); the events it logged for it."""
    md = kboot.current(seg).mwait_cpu_dead_addr(1)
    entries, mark = seg.cb(1, "mwait_entries"), seg.cb(1, "ev_head")
    assert port.ipi_wait([1], cmd, 5.0, then=then) == ({1: 0}, [])
    assert (seg.cb(1, "state"), seg.cb(1, "hotplug")) == (L.ExecState.MWAIT, L.Hotplug.OFFLINE)
    assert seg.cb(1, "mwait_entries") == entries + 1
    line = (md - L.PHYS_BASE) // L.LINE
    assert (seg.cb(1, "mon_armed"), seg.cb(1, "mon_line")) == (1, line)
    assert _monitor_owner(seg, line) == 2  # CPU 1's MONITOR
    assert (seg.mem_u32(md), seg.mem_u32(md + 4)) == (L.CPUDEAD_MWAIT_WAIT,) * 2
    return _codes_since(seg, mark)


def _kicked_into_hlt_then_nmi(cfg, seg, pid: int) -> None:
    """CPU 1, parked, acknowledges a kick and halts, its MONITOR disarmed; an NMI then ends HLT,
    whose Python loop takes it in generation 1."""
    md = kboot.current(seg).mwait_cpu_dead_addr(1)
    line = (md - L.PHYS_BASE) // L.LINE
    mark = seg.cb(1, "ev_head")
    r = kick_mod.kick_one(seg, Bus(seg), 1, md, 5000, 1_000_000)
    assert r["acknowledged"], r
    wait_until(lambda: _halted(seg), what="the kicked CPU in HLT")
    assert [code for _ns, code in _codes_since(seg, mark)] == [L.Ev.WAKE_WRITE, L.Ev.KICK_SEEN, L.Ev.HLT]
    assert (seg.cb(1, "mon_armed"), _monitor_owner(seg, line)) == (0, 0)
    os.kill(pid, cfg.signals()["nmi"])
    wait_until(lambda: seg.cb(1, "nmi_taken") == 1, what="the NMI ending HLT")
    assert (seg.cb(1, "fault"), seg.cb(1, "state")) == (L.Fault.NONE, L.ExecState.HLT)


def _monitor_owner(seg, line: int) -> int:
    """The line directory's entry for emulated ``line``: CPU N's MONITOR armed there is N+1; 0, none."""
    return seg.u16[seg.geo.dir_off // L.DIR_ENTRY + line]


def _only_c_may(state: str, hot_path: str, after: int = 0):
    """The ``child`` of a CPU process in which, on the compiled path, the Python path's ``state``
    ends the process (once it has run ``after`` times): what the test then sees the CPU do, the C
    did."""
    def child(cpu=kcpu.Cpu):
        if hot_path == "c":
            runs = [getattr(cpu, state)] * after

            def run_or_end(self, *args, **kwargs):
                if not runs:
                    os._exit(71)
                return runs.pop()(self, *args, **kwargs)
            setattr(cpu, state, run_or_end)
    return child


def _rewritten_as_pre_fix(seg, m: memmap.MemoryMap) -> None:
    """What `smpd kexec --kernel pre-fix` does to the running generation ``m`` (Kexec.become): its
    entry recorded again as the pre-fix kernel's, in the same place."""
    generations.record(seg, memmap.MemoryMap.build(m.gen, memmap.Boot("pre-fix"), m.sizes,
                                                   m.regions[memmap.Region.TEXT], m.segments, m.placement))


@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_a_cpu_down_alone_parks_a_running_cpu_where_the_kick_then_finds_it(tmp_path, case):
    """`smpd offline`'s message, CPU_DOWN alone, to an online idle CPU: play_dead() into the fix's
    mwait_play_dead(), parked before it acknowledges. The compiled path takes it without the
    interpreter in a generation the CPU knows, as the table holds it now (here play_dead() in the
    CPU's Python ends its process, so the CPU parks only if the C took it), and goes on waiting as
    MWAIT, where the kick is acknowledged; the Python path parks the same way."""
    watch, hot_path = case

    with _cpu1_running(tmp_path, f"down-{watch}-{hot_path}", hot_path, watch,
                       child=_only_c_may("play_dead", hot_path)) as (cfg, seg, port, pid):
        assert [code for _ns, code in _parked_by(port, seg, L.Ipi.CPU_DOWN)] == [L.Ev.OFFLINE]
        _kicked_into_hlt_then_nmi(cfg, seg, pid)


@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_a_reboot_alone_halts_a_running_cpu_through_stop_this_cpu(tmp_path, case):
    """native_stop_other_cpus()'s REBOOT vector to a CPU still online: stop_this_cpu() (its event,
    offline), then HLT (its event), acknowledged. The compiled path takes it without the
    interpreter in a generation the CPU knows (here stop_this_cpu() in the CPU's Python ends its
    process, so the CPU halts only if the C took it), and goes on waiting as HLT: an NMI then ends
    HLT and is taken in the Python loop, which halts again; an INIT and a SIPI start it again."""
    watch, hot_path = case

    with _cpu1_running(tmp_path, f"reboot-{watch}-{hot_path}", hot_path, watch,
                       child=_only_c_may("stop_this_cpu", hot_path)) as (cfg, seg, port, pid):
        mark, activity = seg.cb(1, "ev_head"), seg.cb(1, "activity")
        assert port.ipi_wait([1], L.Ipi.REBOOT, 5.0) == ({1: 0}, [])
        assert (seg.cb(1, "state"), seg.cb(1, "hotplug"), seg.cb(1, "mon_armed")) == \
            (L.ExecState.HLT, L.Hotplug.OFFLINE, 0)
        assert [code for _ns, code in _codes_since(seg, mark)] == [L.Ev.REBOOT, L.Ev.HLT]
        assert seg.cb(1, "activity") == activity + 1  # one wake-up's worth: the REBOOT's
        os.kill(pid, cfg.signals()["nmi"])
        wait_until(lambda: seg.cb(1, "nmi_taken") == 1, what="the NMI ending HLT")
        assert (seg.cb(1, "fault"), seg.cb(1, "state"), seg.cb(1, "hotplug")) == \
            (L.Fault.NONE, L.ExecState.HLT, L.Hotplug.OFFLINE)
        assert port.ipi_wait([1], L.Ipi.REBOOT, 5.0) == ({1: IPI_IGNORED}, [])  # halted: nothing to stop
        assert [code for _ns, code in _start(port, seg, (L.Ipi.SIPI,))] == [L.Ev.INIT, L.Ev.SIPI]
        assert (seg.cb(1, "state"), seg.cb(1, "hotplug")) == (L.ExecState.RUNNING, L.Hotplug.ONLINE)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_cpu_down_to_a_cpu_in_wait_for_sipi_is_acknowledged_as_ignored(tmp_path, hot_path):
    """A CPU in wait-for-SIPI executes nothing: a CPU_DOWN there is answered as ignored on both
    paths (the compiled path takes a CPU_DOWN alone only from running), and the CPU stays put."""
    with _cpu1_running(tmp_path, f"down-wfs-{hot_path}", hot_path) as (cfg, seg, port, pid):
        assert port.ipi_wait([1], L.Ipi.INIT, 5.0) == ({1: 0}, [])
        assert port.ipi_wait([1], L.Ipi.CPU_DOWN, 5.0) == ({1: IPI_IGNORED}, [])
        assert (seg.cb(1, "state"), seg.cb(1, "hotplug"), seg.cb(1, "mon_armed")) == \
            (L.ExecState.WAIT_FOR_SIPI, L.Hotplug.OFFLINE, 0)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_cpu_down_alone_parks_where_the_running_generation_says_now(tmp_path, hot_path):
    """mwait_play_dead() reads its kernel's flavour from the generation table when it parks (`smpd
    kexec --kernel pre-fix` rewrites the running generation's entry: Kexec.become): a CPU running
    generation 1, rewritten to the pre-fix kernel since it started, parks on its idle task's
    thread_info line, never on the fix's mwait_cpu_dead line it learnt; the compiled path leaves
    that CPU_DOWN to the Python path."""
    with _cpu1_running(tmp_path, f"down-rewritten-{hot_path}", hot_path) as (cfg, seg, port, pid):
        _rewritten_as_pre_fix(seg, kboot.current(seg))
        assert port.ipi_wait([1], L.Ipi.CPU_DOWN, 5.0) == ({1: 0}, [])
        assert (seg.cb(1, "state"), seg.cb(1, "hotplug")) == (L.ExecState.MWAIT, L.Hotplug.OFFLINE)
        assert seg.cb(1, "mon_line") == (kboot.current(seg).thread_info_addr(1) - L.PHYS_BASE) // L.LINE


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_the_pre_fix_kernel_parks_its_cpu_on_the_thread_info_line_where_a_write_wakes_it(tmp_path, hot_path):
    """A reset into the pre-fix kernel (`smpd reset --kernel pre-fix`, a soak's trial of it): INIT
    alone, then INIT, SIPI and CPU_DOWN, park the CPU in that kernel's mwait_play_dead(), on its
    idle task's thread_info line, with no struct mwait_cpu_dead to write; the compiled path takes
    the second message once the CPU has run that generation (Init.learn), and a CPU_DOWN alone
    from running too. A write to the line then wakes the CPU into the Python loop, which checks
    its pages and waits on the line again, as the pre-fix kernel does."""
    with _cpu1_running(tmp_path, f"prefix-park-{hot_path}", hot_path) as (cfg, seg, port, pid):
        gen2 = memmap.kexec_load(kboot.current(seg), memmap.Boot("pre-fix"))
        generations.record(seg, gen2)
        seg.set_hdr("generation", 2)
        image.boot_kernel(Bus(seg), seg.hdr("seed"), gen2)  # its pages, which the CPU's resume checks
        md, ti = gen2.mwait_cpu_dead_addr(1), gen2.thread_info_addr(1)
        line = (ti - L.PHYS_BASE) // L.LINE
        untouched = seg.mem_u32(md), seg.mem_u32(md + 4)

        def parked_on_thread_info() -> None:
            assert (seg.cb(1, "state"), seg.cb(1, "hotplug"), seg.cb(1, "cpu_gen")) == \
                (L.ExecState.MWAIT, L.Hotplug.OFFLINE, 2)
            assert (seg.cb(1, "mon_armed"), seg.cb(1, "mon_line")) == (1, line)
            assert _monitor_owner(seg, line) == 2  # CPU 1's MONITOR
            assert (seg.mem_u32(md), seg.mem_u32(md + 4)) == untouched

        for first_time in (True, False):
            assert port.ipi_wait([1], L.Ipi.INIT, 5.0) == ({1: 0}, [])
            entries = seg.cb(1, "mwait_entries")
            logged = _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
            assert [code for _ns, code in logged] == [L.Ev.INIT, L.Ev.SIPI, L.Ev.OFFLINE]
            assert _in_one_step(logged) == (hot_path == "c" and not first_time), logged
            assert seg.cb(1, "mwait_entries") == entries + 1
            parked_on_thread_info()
        assert port.ipi_wait([1], L.Ipi.INIT, 5.0) == ({1: 0}, [])
        _start(port, seg, (L.Ipi.SIPI,))
        assert port.ipi_wait([1], L.Ipi.CPU_DOWN, 5.0) == ({1: 0}, [])
        parked_on_thread_info()
        woken, mark = seg.cb(1, "wake_write"), seg.cb(1, "ev_head")
        assert Bus(seg).write_u32(ti, seg.mem_u32(ti)) == 1  # a store to thread_info->flags: one monitor woken
        wait_until(lambda: seg.cb(1, "wake_write") == woken + 1 and seg.cb(1, "mon_armed") == 1,
                   what="the write's wake-up taken, MONITOR armed again")
        assert [code for _ns, code in _codes_since(seg, mark)] == [L.Ev.WAKE_WRITE]
        assert seg.cb(1, "fault") == L.Fault.NONE
        parked_on_thread_info()


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_cpu_down_alone_parks_a_pre_fix_kernels_cpu_on_its_thread_info_line(tmp_path, hot_path):
    """`smpd offline` on a machine booted as the pre-fix kernel: the compiled path takes the CPU_DOWN
    into that kernel's park too (here play_dead() in the CPU's Python ends its process, so the CPU
    parks only if the C took it), on the thread_info line, nothing written to mwait_cpu_dead."""
    with _cpu1_running(tmp_path, f"prefix-down-{hot_path}", hot_path, child=_only_c_may("play_dead", hot_path),
                       kernel="pre-fix") as (cfg, seg, port, pid):
        m = kboot.current(seg)
        md = m.mwait_cpu_dead_addr(1)
        untouched = seg.mem_u32(md), seg.mem_u32(md + 4)
        assert port.ipi_wait([1], L.Ipi.CPU_DOWN, 5.0) == ({1: 0}, [])
        assert (seg.cb(1, "state"), seg.cb(1, "hotplug"), seg.cb(1, "mon_armed")) == \
            (L.ExecState.MWAIT, L.Hotplug.OFFLINE, 1)
        assert seg.cb(1, "mon_line") == (m.thread_info_addr(1) - L.PHYS_BASE) // L.LINE
        assert (seg.mem_u32(md), seg.mem_u32(md + 4)) == untouched


@pytest.mark.parametrize("kernel", ["6.6", "pre-fix"])
@pytest.mark.parametrize("case", hot_paths("adaptive", "spin"))
def test_an_init_ends_a_parked_cpus_mwait_its_monitor_disarmed_and_its_wake_up_counted(tmp_path, case, kernel):
    """A kexec'd kernel starting its APs (INIT, SIPI) finds a pre-fix kernel's offline CPUs still
    parked in MWAIT, and a reset's INIT alone finds any kernel's so. The IPI ends MWAIT
    (mwait_exit(): the monitor disarmed, the IPI's wake-up counted), then init_reset(): the CPU
    runs again, or waits for SIPI, and a store to the line it watched wakes nobody. The compiled
    path takes it without the interpreter (here init_reset() in the CPU's Python ends its process
    after the first start, from power-on, so the CPU gets there only if the C took it), leaving
    what the Python path leaves."""
    watch, hot_path = case
    with _cpu1_running(tmp_path, f"init-parked-{watch}-{hot_path}-{kernel}", hot_path, watch,
                       child=_only_c_may("init_reset", hot_path, after=1), kernel=kernel) as (cfg, seg, port, pid):
        watched = kboot.current(seg).monitor_addr(1)
        line = (watched - L.PHYS_BASE) // L.LINE
        for then, state in (((L.Ipi.SIPI,), L.ExecState.RUNNING), ((), L.ExecState.WAIT_FOR_SIPI)):
            _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
            assert (seg.cb(1, "state"), seg.cb(1, "mon_armed"), seg.cb(1, "mon_line")) == (L.ExecState.MWAIT, 1, line)
            assert _monitor_owner(seg, line) == 2  # CPU 1's MONITOR
            woken = seg.cb(1, "wake_ipi"), seg.cb(1, "wake_write")
            logged = _start(port, seg, then)
            assert [code for _ns, code in logged] == [L.Ev.INIT, L.Ev.SIPI][:1 + len(then)]
            if then:
                assert _in_one_step(logged) == (hot_path == "c"), logged
            assert (seg.cb(1, "state"), seg.cb(1, "mon_armed"), _monitor_owner(seg, line)) == (state, 0, 0)
            assert (seg.cb(1, "wake_ipi"), seg.cb(1, "wake_write")) == (woken[0] + 1, woken[1])
            assert Bus(seg).write_u32(watched, seg.mem_u32(watched)) == 0  # nobody watches it now
        assert seg.cb(1, "fault") == L.Fault.NONE


DEAD = {"triple fault": (L.ExecState.SHUTDOWN, L.Fault.TRIPLE_FAULT),
        "foreign halt": (L.ExecState.HLT, L.Fault.FOREIGN_HALT)}


def _dead_by(port, seg, how: str = "triple fault") -> None:
    """CPU 1, running, parked, then woken by a write with its page tables overwritten (a triple
    fault: SHUTDOWN), or its loop's text page overwritten by bytes that decode to a halt (it
    executes them: FOREIGN_HALT, halted in foreign bytes)."""
    m = kboot.current(seg)
    _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
    bus = Bus(seg)
    if how == "triple fault":
        bus.write(memmap.page_addr(m.pgtable_pages_of(1)[0]), bytes(16))  # its page tables' tag, gone
    else:
        text = memmap.page_addr(m.text_page(memmap.TEXT_PLAY_DEAD))
        bus.write(text, bytes(16))  # the page's tag, gone
        bus.write(text + 64 + 8, bytes([3]) + bytes(7))  # where CPU 1 resumes: b0 % 4 == 3, a halt
    assert bus.write_u32(m.mwait_cpu_dead_addr(1), L.CPUDEAD_MWAIT_WAIT) == 1  # wakes it
    state, fault = DEAD[how]
    wait_until(lambda: seg.cb(1, "fault") == fault, what=how)
    wait_until(lambda: seg.cb(1, "state") == state, what=f"the {how}'s state")


def _started_again(port, seg, hot_path: str) -> None:
    """INIT and SIPI start CPU 1 again, in generation 1, in one step on the compiled path."""
    logged = _start(port, seg, (L.Ipi.SIPI,))
    assert [code for _ns, code in logged] == [L.Ev.INIT, L.Ev.SIPI]
    assert _in_one_step(logged) == (hot_path == "c"), logged
    assert (seg.cb(1, "state"), seg.cb(1, "hotplug"), seg.cb(1, "cpu_gen")) == \
        (L.ExecState.RUNNING, L.Hotplug.ONLINE, 1)


@pytest.mark.parametrize("how", DEAD)
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_init_and_sipi_start_a_dead_cpu(tmp_path, hot_path, how):
    """A dead CPU executes nothing until INIT: SHUTDOWN (here the triple fault of a parked CPU
    woken by a write, its page tables overwritten), or halted in foreign bytes (its loop's text
    overwritten by a halt); INIT and SIPI then start it again. The compiled path takes them
    there too (init_reset() in the CPU's Python ends its process after the first start, from
    power-on), as the Python path does."""
    with _cpu1_running(tmp_path, f"dead-{hot_path}-{how[0]}", hot_path,
                       child=_only_c_may("init_reset", hot_path, after=1)) as (cfg, seg, port, pid):
        _dead_by(port, seg, how)
        _started_again(port, seg, hot_path)


@pytest.mark.parametrize("how", DEAD)
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_dead_cpu_holds_each_interrupt_that_reaches_it_and_stays_dead_until_init(tmp_path, hot_path, how):
    """A CPU in SHUTDOWN executes no handler: an NMI, SMI or MCE that reaches it is counted held,
    not taken, and latched nowhere (wait-for-SIPI's pending latch is for a CPU that will run
    again); the CPU stays where it was until INIT and SIPI start it. The compiled path holds
    those that come while it sleeps without the interpreter (here the Python path's
    _drain_pending() ends the CPU's process), as the Python path does."""
    with _cpu1_running(tmp_path, f"dead-irq-{hot_path}-{how[0]}", hot_path,
                       child=_only_c_may("_drain_pending", hot_path)) as (cfg, seg, port, pid):
        _dead_by(port, seg, how)
        for kind in ("nmi", "smi", "mce"):
            wait_until(lambda: seg.cb(1, "sleeping") == 1, what="the dead CPU asleep")
            activity = seg.cb(1, "activity")
            os.kill(pid, cfg.signals()[kind])
            wait_until(lambda: seg.cb(1, f"{kind}_held") == 1, what=f"the {kind.upper()} held")
            assert (seg.cb(1, f"{kind}_taken"), seg.cb(1, f"{kind}_pending")) == (0, 0)
            assert (seg.cb(1, "state"), seg.cb(1, "fault")) == DEAD[how]
            wait_until(lambda: seg.cb(1, "activity") == activity + 1, what="one wake-up's worth of activity")
        _started_again(port, seg, hot_path)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_dead_cpu_that_an_init_puts_in_wait_for_sipi_latches_the_next_nmi_there(tmp_path, hot_path):
    """Out of the dead end, interrupts are the new state's: an INIT alone takes a CPU in SHUTDOWN
    to wait-for-SIPI, where an NMI is held and latched pending (taken once a SIPI starts the CPU),
    not held as a dead CPU holds it."""
    with _cpu1_running(tmp_path, f"dead-wfs-{hot_path}", hot_path) as (cfg, seg, port, pid):
        _dead_by(port, seg)
        assert port.ipi_wait([1], L.Ipi.INIT, 5.0) == ({1: 0}, [])
        wait_until(lambda: seg.cb(1, "sleeping") == 1, what="the CPU asleep in wait-for-SIPI")
        os.kill(pid, cfg.signals()["nmi"])
        wait_until(lambda: seg.cb(1, "nmi_pending") == 1, what="the NMI latched in wait-for-SIPI")
        assert (seg.cb(1, "nmi_held"), seg.cb(1, "state")) == (1, L.ExecState.WAIT_FOR_SIPI)


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_cpu_learns_the_generation_its_map_was_built_from_not_what_the_table_holds_later(tmp_path, hot_path):
    """`smpd kexec --kernel pre-fix` (Kexec.become) rewrites the running generation's entry once the
    CPUs it started have acknowledged; a CPU that learnt the entry then (after smp_callin() built
    its map) would have paired the pre-fix entry with the fix's mwait_cpu_dead, and the compiled
    path would park it on that line. Here the rewrite lands in that window: the next INIT, SIPI
    and CPU_DOWN park the CPU as the pre-fix kernel does, on its idle task's thread_info line."""
    def rewrite_first(cpu=kcpu.Cpu, learn=Handoff._learn_start):
        def rewritten(self):
            _rewritten_as_pre_fix(self.seg, self.gens.current())
            return learn(self)
        cpu._learn_start = rewritten

    with _cpu1_running(tmp_path, f"learn-{hot_path}", hot_path, child=rewrite_first) as (cfg, seg, port, pid):
        wait_until(lambda: kboot.current(seg).boot.monitors_thread_info, what="the rewrite, after the SIPI's ack")
        m = kboot.current(seg)
        _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
        assert seg.cb(1, "state") == L.ExecState.MWAIT
        assert seg.cb(1, "mon_line") == (m.thread_info_addr(1) - L.PHYS_BASE) // L.LINE


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_after_a_message_taken_asleep_the_cpu_spins_its_budget_again_before_it_sleeps(tmp_path, hot_path):
    """Adaptive: each wait spins the budget, then sleeps. A CPU asleep in `running` that is sent
    INIT, SIPI and CPU_DOWN parks and waits in MWAIT as the Python path's next wait does: spinning
    first (a kick then finds it awake), not asleep at once."""
    with _cpu1_running(tmp_path, f"budget-{hot_path}", hot_path, budget_ns=1_000_000_000) as (cfg, seg, port, pid):
        wait_until(lambda: seg.cb(1, "sleeping") == 1, what="CPU 1 asleep after its budget")
        _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
        time.sleep(0.05)
        assert (seg.cb(1, "state"), seg.cb(1, "sleeping")) == (L.ExecState.MWAIT, 0)
        wait_until(lambda: seg.cb(1, "sleeping") == 1, what="asleep again once the budget is spent")


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_a_cpu_parked_again_after_a_kick_still_wakes_spuriously_in_mwait(tmp_path, hot_path):
    """Spurious MWAIT wake-ups (``spurious_per_s``) go on for a CPU that was kicked into HLT and
    then parked again by a reset's INIT, SIPI and CPU_DOWN, which the compiled path takes in the
    same wait as the kick (HLT's wait has no spurious wake-up; the park's wait has its own)."""
    with _cpu1_running(tmp_path, f"spurious-{hot_path}", hot_path, spurious_per_s=50.0) as (cfg, seg, port, pid):
        md = kboot.current(seg).mwait_cpu_dead_addr(1)
        _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
        assert kick_mod.kick_one(seg, Bus(seg), 1, md, 5000, 1_000_000)["acknowledged"]
        wait_until(lambda: _halted(seg), what="the kicked CPU in HLT")
        _start(port, seg, (L.Ipi.SIPI, L.Ipi.CPU_DOWN))
        before = seg.cb(1, "wake_spurious")
        wait_until(lambda: seg.cb(1, "wake_spurious") >= before + 3, what="spurious wake-ups in MWAIT again")
        assert seg.cb(1, "state") == L.ExecState.MWAIT


@pytest.mark.parametrize("slot, says", [
    (bytes(8), "returned to address 0 (its return slot zeroed): #PF"),
    (bytes([4]) + bytes(7), "invalid opcode: #UD"),  # b0 % 4 == 0, not zero
], ids=["zeroed", "op-0"])
def test_a_return_into_a_zeroed_slot_is_said_as_a_return_to_address_0(tmp_path, slot, says):
    """A woken CPU whose stack page the next kernel overwrote returns through the slot it finds
    there (smpd.kernel.resume). Eight zero bytes, as a zeroed page of the new kernel holds, are a
    return to address 0 (a #PF, a triple fault), not an invalid opcode: the verdict is the same
    triple fault, and its detail says which of the two the CPU met."""
    from smpd.kernel.resume import ResumePlan, resume

    with _machine_segment(tmp_path, "slot") as (cfg, seg):
        bus = Bus(seg)
        m = kboot.power_on(seg, bus, cfg.boot())
        plan = ResumePlan(seg, m, 1, memmap.TEXT_PLAY_DEAD)
        stack = memmap.page_addr(m.stack_pages_of(1)[-1])
        bus.write(stack, image.tag_bytes(m.gen + 1, memmap.Region.PERCPU, 0))  # the next kernel's page now
        bus.write(stack + plan.stack_entry, slot)
        verdict = resume(seg, bus, plan)
        assert verdict.fault == L.Fault.TRIPLE_FAULT and verdict.detail.startswith(says), verdict
