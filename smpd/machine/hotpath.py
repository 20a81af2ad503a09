"""Which hot path a machine runs: the compiled one (smpd.machine._hotpath) or the pure Python loops.

A kick is two cache-line moves (control out, status back), and the host's floor
for that is ~120 ns here (smpd.hwfloor). In Python each side pays for its
interpreter between the moves: the woken CPU's path from its wake word to the
acknowledgement took ~3 us warm, and ~55 us when the process had slept and its
interpreter's memory was cache-cold (63 CPU processes on 2 cores), so a kick
measured CPython more than the protocol. smpd/_hotpath.c runs the same steps on
the same segment in C: the CPU's watch loop with its sleep and, in
mwait_play_dead(), the path through the acknowledgement; and the coordinator's
smp_kick_mwait_play_dead() loop for one CPU. Everything else stays in Python.

``hot_path`` (config ``[watch] hot_path``, ``smpd up --hot-path``):

* ``auto`` — the compiled path when the extension is built (pip builds it when a
  C compiler exists), else the Python loops; ``smpd up`` says which and why;
* ``c`` — the compiled path, or a clear error when it is not built;
* ``python`` — the pure Python loops (the reference, and the fallback).

The choice is the machine's (a header word): its coordinator and CPUs agree.
"""

from __future__ import annotations

from smpd.errors import BadInput
from smpd.machine import layout as L, pyhotpath

try:
    from smpd.machine import _hotpath
    WHY_NOT: str | None = None
except ImportError as e:  # built without a C compiler: the Python loops run instead
    _hotpath = None
    WHY_NOT = f"the compiled module smpd.machine._hotpath is not built ({e}); `pip install -e .` builds it when a C compiler exists"

def choose(asked: str) -> tuple[str, str]:
    """The hot path to run for ``asked`` (one of smpd.config.HOT_PATHS), and why, for `smpd up` to print."""
    if asked == "python":
        return "python", "python (asked for)"
    if _hotpath is None:
        if asked == "c":
            raise BadInput(f"hot path 'c' is unavailable: {WHY_NOT}. Accepted: auto, python.")
        return "python", f"python ({WHY_NOT})"
    return "c", "c (asked for)" if asked == "c" else "c (auto: the compiled module is built)"


def compiled(seg) -> bool:
    return seg.hdr("hot_path") == L.HotPath.C


def waiter(seg, cpu: int, irq_signals, doorbell: int):
    """CPU ``cpu``'s watch loop: the compiled one, or its Python peer (smpd.machine.pyhotpath)."""
    if not compiled(seg):
        return pyhotpath.Waiter(seg, cpu, irq_signals, doorbell, spin_yields=bool(seg.hdr("spin_yields")))
    return _hotpath.Waiter(seg.buf, **_fields(seg.geo.cb_off(cpu), _WAITER_FIELDS),
                           irq_signals=sorted(irq_signals), doorbell=doorbell, spin_yields=bool(seg.hdr("spin_yields")))


# Each compiled object's keywords that take a field of its CPU's control block, as that field's
# offset in a block: a CPU's are its block's offset plus these (_fields), made once, where each
# was asked of the segment by name (a Cpu the template builds, 62-64 -> 48-55 us, alternated).
def _offsets(**fields: str) -> dict[str, int]:
    return {key: L.CB[field][0] for key, field in fields.items()}


_WAITER_FIELDS = _offsets(wake="wake", write="mon_write", sleeping="sleeping", watch="mon_watch",
                          sleep_core="sleep_core", woke="woke_ns")
_ACK_FIELDS = _offsets(seen="kick_seen_ns", armed="mon_armed", wake_write="wake_write", activity="activity",
                       busy="busy", state="state", ev_head="ev_head")
_INIT_FIELDS = _offsets(armed="mon_armed", **{name: name for name in (
    "mbox_seq", "mbox_cmd", "mbox_arg", "mbox_ack", "mbox_result", "init_count", "state", "hotplug", "activity",
    "busy", "ev_head", "sipi_count", "cpu_gen", "nmi_pending", "smi_pending", "mwait_entries", "mon_line",
    "wake_write", "wake_ipi")})


def _fields(block: int, fields: dict[str, int]) -> dict[str, int]:
    """``fields`` (keyword -> offset in a control block) of the block at ``block`` (Geometry.cb_off):
    byte offsets in the segment."""
    return {key: block + off for key, off in fields.items()}


def ack(seg, cpu: int, md: int, checks) -> object | None:
    """None on a Python machine (smpd.kernel.cpu acknowledges there); else what CPU ``cpu`` checks and stores to acknowledge a kick in the compiled path, and
    what it records on its way into HLT (the stores smpd.kernel.cpu makes on that way).

    ``md`` is the physical address of its struct mwait_cpu_dead (in its kernel's map);
    ``checks`` are a smpd.kernel.resume.ResumePlan's (page, kind, u64 index, lo, hi):
    the tags the resume of mwait_play_dead() must find, in order.
    """
    if not compiled(seg):
        return None
    geo = seg.geo
    md_off = geo.mem_off + md - L.PHYS_BASE
    line = (md - L.PHYS_BASE) // L.LINE
    block = geo.cb_off(cpu)
    return _hotpath.Ack(control=md_off, status=md_off + 4, **_fields(block, _ACK_FIELDS),
                        dir_entry=geo.dir_off + line * L.DIR_ENTRY,
                        tags=[(i * 8, lo, hi) for _page, _kind, i, lo, hi in checks],
                        kexec_hlt=L.CPUDEAD_MWAIT_KEXEC_HLT, ev_ring=block + L.EV_OFF, line=line,
                        state_hlt=L.ExecState.HLT, ev_slots=L.EV_SLOTS, ev_wake_write=L.Ev.WAKE_WRITE,
                        ev_kick_seen=L.Ev.KICK_SEEN, ev_hlt=L.Ev.HLT, ev_entry=L.EV_ENTRY.size)


def init_taker(seg, cpu: int, bus, spin_ns: int, signals: dict[str, int]) -> object | None:
    """None on a Python machine; else what CPU ``cpu``'s compiled wait needs to take an INIT, and
    the SIPI and CPU_DOWN that may follow it, or a CPU_DOWN or REBOOT alone
    (smpd/machine/_hotpath.c, take_init): its mailbox, mon_armed, what mwait_exit(), init_reset(),
    wait-for-SIPI, start_secondary(), smp_callin(), play_dead(), stop_this_cpu() and hlt() store
    (smpd.kernel.cpu), where; the header's generation table; and ``bus``'s compiled Kicker (one
    for every CPU a process builds), for smp_callin()'s and mwait_play_dead()'s writes. Which
    generations it may start the CPU in, it learns (Init.learn). ``spin_ns``: what its waits spin
    before they sleep (Waiter.wait's; -1: a spin watch), for the wait after a take. ``signals``
    (kind -> signal): a dead CPU's wait (Init.dead) counts each held in its `*_held`."""
    if not compiled(seg):
        return None
    block = seg.geo.cb_off(cpu)
    init = _hotpath.Init(**_fields(block, _INIT_FIELDS),
                         ev_ring=block + L.EV_OFF, cmd_init=L.Ipi.INIT,
                         state_wait_for_sipi=L.ExecState.WAIT_FOR_SIPI, hotplug_offline=L.Hotplug.OFFLINE,
                         ev_init=L.Ev.INIT, ev_slots=L.EV_SLOTS, ev_entry=L.EV_ENTRY.size, ipi_byte=L.WAKE_IPI,
                         hdr_generation=L.HEADER["generation"][0], gen_table=L.GEN_OFF,
                         gen_entry=L.GEN_ENTRY.size, gen_slots=L.GEN_SLOTS, cpu=cpu,
                         cmd_sipi=L.Ipi.SIPI, cmd_cpu_down=L.Ipi.CPU_DOWN, state_running=L.ExecState.RUNNING,
                         state_mwait=L.ExecState.MWAIT, hotplug_online=L.Hotplug.ONLINE, ev_sipi=L.Ev.SIPI,
                         ev_offline=L.Ev.OFFLINE, mwait_wait=L.CPUDEAD_MWAIT_WAIT, cmd_reboot=L.Ipi.REBOOT,
                         state_hlt=L.ExecState.HLT, ev_reboot=L.Ev.REBOOT, ev_hlt=L.Ev.HLT, spin_ns=spin_ns,
                         bus=bus.kicker)
    for kind, sig in signals.items():
        init.holds(sig, seg.cb_byte(cpu, f"{kind}_held", 0))
    return init


def kicker(seg, doorbell: int, bus):
    """The coordinator's kick loop: the compiled one, or its Python peer writing through ``bus``."""
    if not compiled(seg):
        return pyhotpath.Kicker(seg, bus, spin_yields=bool(seg.hdr("spin_yields")))
    geo = seg.geo
    return _hotpath.Kicker(seg.buf, mem_off=geo.mem_off, mem_len=geo.npages * L.PAGE, dir_off=geo.dir_off,
                           cb_off=L.CB_OFF, cb_size=L.CB_SIZE, cb_write=L.CB["mon_write"][0],
                           cb_sleeping=L.CB["sleeping"][0], cb_pid=L.CB["pid"][0], cb_watch=L.CB["mon_watch"][0],
                           ncpus=geo.ncpus,
                           doorbell=doorbell, line=L.LINE, dir_entry=L.DIR_ENTRY,
                           spin_yields=bool(seg.hdr("spin_yields")))


WOKE, TIMEOUT, SIGNAL = pyhotpath.WOKE, pyhotpath.TIMEOUT, pyhotpath.SIGNAL  # Waiter.wait's codes
if _hotpath is not None:
    assert (_hotpath.WOKE, _hotpath.TIMEOUT, _hotpath.SIGNAL) == (WOKE, TIMEOUT, SIGNAL)
    assert _hotpath.PAGE_BYTES == L.PAGE  # Kicker.write_pages stores whole pages of this size
