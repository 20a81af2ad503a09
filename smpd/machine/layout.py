"""The shared segment's geometry: where every word lives, and why it lives there.

One POSIX shared-memory segment, two planes that never mix (DESIGN.md §3):

    +---------------------------+  0
    | header           (4 KiB)  |  observation plane: what the machine is
    +---------------------------+  CB_OFF
    | control block × ncpus     |  observation plane: one per CPU, 4 cache lines
    +---------------------------+  dir_off
    | line directory × nlines   |  observation plane: which CPU monitors each line
    +---------------------------+  mem_off (4 KiB aligned)
    | emulated physical memory  |  the old kernel: text, page tables, per-CPU data,
    |                           |  idle stacks; written only through smpd.bus
    +---------------------------+

Nothing here is pickled: every field is a fixed-offset little-endian word, read and
written in place through memoryviews by whichever process owns it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

LAYOUT_VERSION = 10  # 10: woke_ns (a timing stamp only); 9: mon_watch; 8: the monitor's write flag on its own line (mon_write); 7: process identities in clock ticks
MAGIC = b"SMPDSEG\x00"

LINE = 64  # bytes in a cache line: the MONITOR granularity of the x86 parts we emulate
PAGE = 4096
LINES_PER_PAGE = PAGE // LINE
# Emulated physical addresses start at the x86-64 default CONFIG_PHYSICAL_START
# (16 MiB) so that addresses read like a kernel engineer expects.
PHYS_BASE = 0x1000000

# The kernel's constants (arch/x86/kernel/smpboot.c).
CPUDEAD_MWAIT_WAIT = 0xDEADBEEF
CPUDEAD_MWAIT_KEXEC_HLT = 0x4A17DEAD


class ExecState(IntEnum):
    """What a CPU is executing (DESIGN.md §4)."""

    OFF = 0  # no process forked for it yet: a segment just made (Template.fork stores WAIT_FOR_SIPI first)
    RUNNING = 1
    MWAIT = 2
    HLT = 3
    WAIT_FOR_SIPI = 4
    SHUTDOWN = 5
    GONE = 6  # the process died: an emulator fault, never an emulated one


class Hotplug(IntEnum):
    OFFLINE = 0
    ONLINE = 1


class MachineState(IntEnum):
    CREATING = 0
    BOOTING = 1
    UP = 2
    STOPPING = 3
    KEXECED = 4  # a kexec ran: a later generation runs; `smpd reset` power-cycles to generation 1
    ENDED = 5  # a kexec ended the machine (a triple fault, a shutdown, a hang): only `smpd reset` goes on


class Watch(IntEnum):
    SPIN = 0
    ADAPTIVE = 1


class HotPath(IntEnum):  # smpd.hotpath
    PYTHON = 0
    C = 1


# IPI mailbox commands (coordinator -> CPU). INIT and SIPI are the platform's
# startup IPIs; CPU_DOWN asks an online CPU to run the offline path (play_dead).
# 4 was POWER_OFF: `smpd down` now SIGKILLs the CPU processes (the power cut).
class Ipi(IntEnum):
    NONE = 0
    INIT = 1
    SIPI = 2
    CPU_DOWN = 3
    REBOOT = 5  # stop_other_cpus(): the CPU runs stop_this_cpu() into its HLT loop
    # `smpd bench kick` only: a kicked CPU in HLT re-enters mwait_play_dead() (status and
    # control back to CPUDEAD_MWAIT_WAIT), so the next round kicks the real path again.
    # No kernel does this; INIT/SIPI/offline would too, at a hundred times the cost.
    # A CPU that has not left mwait_play_dead() yet (its kick blew the budget, and it
    # wakes with the REPARK already posted) starts mwait_play_dead() over, so the
    # next round's kick finds it parked, not in HLT from a late acknowledgement.
    REPARK = 6
    NMI_STOP = 7  # the NMI shootdown (stop_other_cpus()'s fallback, crash_smp_send_stop()): halt with NMIs blocked


class Fault(IntEnum):
    """What a CPU ran into when it resumed in memory that is no longer its kernel's."""

    NONE = 0
    TRIPLE_FAULT = 1  # page fault or #UD whose delivery failed: the CPU shuts down
    STRAY_STORE = 2  # it executed foreign bytes that stored to memory (and went on)
    FOREIGN_HALT = 3  # it executed foreign bytes into a halt or a tight loop
    MCE_SHUTDOWN = 4  # an MCE reached it in wait-for-SIPI: the machine goes down
    SMM_HANG = 5  # an SMI while CPUs sat in INIT: the firmware waited for them in SMM forever


# A CPU's faults that end the machine: a triple fault resets the platform, an MCE in INIT shuts it
# down. (A hang in SMM ends it too, but is the firmware's, not one CPU's: smpd.kernel.kexec.)
ENDING_FAULTS = (Fault.TRIPLE_FAULT, Fault.MCE_SHUTDOWN)


class Ev(IntEnum):
    """Events a CPU logs in its ring (smpd.events); arg is given per code."""

    WAKE_WRITE = 1  # arg: the monitored line
    INTERRUPT = 2  # arg: 1 nmi, 2 smi, 3 mce
    HELD = 3  # arg: as INTERRUPT; held pending in wait-for-SIPI
    KICK_SEEN = 4  # mwait_play_dead() read control == CPUDEAD_MWAIT_KEXEC_HLT
    HLT = 5  # entered a HLT loop
    INIT = 6
    SIPI = 7
    REBOOT = 8  # stop_this_cpu()
    BAD_PAGE = 9  # arg: the page it touched that is not its kernel's
    TRIPLE_FAULT = 10  # arg: page
    STRAY_STORE = 11  # arg: address written
    FOREIGN_HALT = 12  # arg: page
    MCE_SHUTDOWN = 13
    SPURIOUS = 14
    OFFLINE = 15  # play_dead()
    SMM = 16  # SMI taken: SMM entry and RSM
    NMI_STOP = 17  # halted by the NMI shootdown (crash_nmi_callback() / the stop NMI handler)


class Irq(IntEnum):
    """The interrupts smpd injects as signals; the value is the code events carry."""

    NMI = 1
    SMI = 2
    MCE = 3

    @property
    def kind(self) -> str:
        """The lower-case name of config keys, --inject and counters ("nmi_taken")."""
        return self.name.lower()


# Their kinds, and the order a CPU takes them in when several are pending.
IRQ_KINDS = tuple(i.kind for i in (Irq.MCE, Irq.NMI, Irq.SMI))
IRQ_CODE = {i.kind: int(i) for i in Irq}
# What INIT (WAIT_FOR_SIPI) holds pending; an MCE it cannot hold (MCE_SHUTDOWN).
HELD_IN_INIT = (Irq.NMI.kind, Irq.SMI.kind)


# --- the header -----------------------------------------------------------

# (name, struct format). Offsets are computed in order; the header is one page.
_HEADER_FIELDS = [
    ("magic", "8s"),
    ("layout_version", "I"),
    ("ncpus", "I"),
    ("state", "I"),
    ("watch", "I"),
    ("coordinator_pid", "I"),
    ("janitor_pid", "I"),
    ("coordinator_start", "Q"),  # its start, clock ticks since boot (smpd.host.trust.start_ticks): with the pid, its identity
    ("coordinator_sid", "I"),  # its session, inherited by every CPU process (smpd.trust)
    ("generation", "I"),  # kernel generation: 1 = the old kernel
    ("nlines", "I"),
    ("npages", "I"),
    ("mem_off", "I"),
    ("dir_off", "I"),
    ("seg_size", "Q"),
    ("seed", "Q"),
    ("boot_ns", "Q"),  # CLOCK_MONOTONIC ns when the coordinator started
    ("bringup_ns", "Q"),  # time from the first SIPI to the last CPU online
    ("boot_wall", "d"),
    ("spin_budget_ns", "Q"),
    ("spurious_per_s", "d"),
    ("authkey", "32s"),  # HMAC key of the control channel; the segment is 0600
    ("channel", "32s"),  # random token in the channel's socket name (smpd.names): unguessable
    ("name", "32s"),
    ("pin", "16s"),
    ("watch_reason", "200s"),
    # Emulated RAM and the sizes every generation's memory map derives from (smpd.kernel.memmap).
    ("ram_pages", "I"), ("text_pages", "I"), ("data_pages", "I"), ("pgtable_pages", "I"),
    ("stack_pages_per_cpu", "I"), ("crash_pages", "I"),
    ("smi_auto_halt_restart", "I"),  # [firmware]: RSM returns into HLT, nothing is fetched
    ("smm_hangs_in_init", "I"),  # [firmware]: an SMI while CPUs sit in INIT hangs SMM (bugzilla 217995)
    ("kexec_count", "I"),
    ("respawns", "I"),  # CPU processes replaced after they died (emulator faults)
    ("hot_path", "I"),  # HotPath: the compiled watch/kick loops or the Python ones
    ("hot_path_reason", "200s"),
    # watch spin with more processes (CPUs + coordinator) than host cores: the spin loops
    # (both hot paths) and the kick's udelay yield their core between polls.
    ("spin_yields", "I"),
]


def _offsets(fields: list[tuple[str, str]]) -> dict[str, tuple[int, struct.Struct]]:
    out, off = {}, 0
    for name, fmt in fields:
        s = struct.Struct("<" + fmt)
        # natural alignment for the numeric fields
        align = min(s.size, 8) if fmt[-1] not in "s" else 1
        off = (off + align - 1) // align * align
        out[name] = (off, s)
        off += s.size
    return out


HEADER = _offsets(_HEADER_FIELDS)
# The header's second page: one entry per kernel generation, enough to rebuild its memory map in
# any process (smpd.kernel.generations). Slot gen % GEN_SLOTS, or the next whose generation nothing
# runs any more: a CPU a later kernel never started keeps its map however many kexecs old.
GEN_SLOTS = 64
GEN_ENTRY = struct.Struct("<IBBHQI" + "III" * 3)  # gen, flavour, flags, maxcpus+1, kaslr+1, load, 3 x segment
GEN_OFF = PAGE
HEADER_SIZE = 2 * PAGE
assert max(o + s.size for o, s in HEADER.values()) <= GEN_OFF
assert GEN_OFF + GEN_SLOTS * GEN_ENTRY.size <= HEADER_SIZE

# --- the per-CPU control block --------------------------------------------
#
# Nine cache lines per CPU, each written mostly by one side (line 8: the bus and
# the CPU, see below), so that a CPU
# watching its wake words shares their host cache lines with nobody but its wakers.
CB_SIZE = 9 * LINE
CB_OFF = HEADER_SIZE

# What wakes a CPU is one byte per kind of waker, so that concurrent wakers never
# lose each other's bits (byte stores are atomic; a read-modify-write of a shared
# word would not be). The CPU's watch loop loads two words, and a wake mask has
# one byte of each kind in this order:
WAKE_WRITE = 0  # the bus wrote the line this CPU monitors: `mon_write`, line 8
WAKE_IRQ = 1  # an interrupt signal (NMI, SMI, MCE) arrived: byte 1 of `wake`
WAKE_IPI = 2  # the coordinator posted to the mailbox: byte 2 of `wake`
WAKE_TIMER = 3  # the CPU's own timer (spin budget or spurious wake-up): byte 3 of `wake`
# Line 0, the hot line: `wake` (its byte 0 unused). A write's byte is on another
# line (line 8) because the woken CPU reads `wake` on its way to acknowledging a
# kick (did an interrupt come with it?): the bus's stores then never move the line
# that read needs, and a kick costs the cache lines of struct mwait_cpu_dead alone
# (smpd/machine/_hotpath.c, bench/bench_kick.py). `sleeping` is on the bus's line
# too: the bus reads it (after a fence) right after its store to `mon_write`, to
# decide whether the CPU's doorbell signal is owed, and finds it in its own cache.
_CB_FIELDS = [
    ("wake", 0, "I"),
    # Line 1: CPU-owned state, read by observers (status).
    ("pid", 64, "I"),
    ("core", 68, "i"),  # pinned host core, -1 when not pinned
    ("hotplug", 72, "I"),
    ("state", 76, "I"),
    ("mon_armed", 80, "I"),
    ("mon_line", 84, "I"),  # emulated line index the monitor is armed on
    ("mwait_entries", 88, "Q"),  # times the CPU entered mwait_play_dead()
    ("wake_write", 96, "Q"),  # wake-ups by kind, counted by the CPU itself
    ("wake_irq", 104, "Q"),
    ("wake_ipi", 112, "Q"),
    ("wake_spurious", 120, "Q"),
    # Line 2: interrupt accounting, by kind (nmi, smi, mce), written by the CPU.
    ("nmi_taken", 128, "I"), ("nmi_pending", 132, "I"), ("nmi_held", 136, "I"),
    ("smi_taken", 140, "I"), ("smi_pending", 144, "I"), ("smi_held", 148, "I"),
    ("mce_taken", 152, "I"), ("mce_pending", 156, "I"), ("mce_held", 160, "I"),
    ("init_count", 164, "I"),
    ("sipi_count", 168, "I"),
    ("sleep_core", 172, "I"),  # the host core it went to sleep on (sched_getcpu), valid while `sleeping`
    ("start_ticks", 176, "Q"),  # its process's start, clock ticks since boot: with the pid, its identity
    ("woke_ns", 184, "Q"),  # CLOCK_MONOTONIC ns when its doorbell last ended a sleep: running again (smpd.kernel.kick)
    # Line 3: the IPI mailbox. The coordinator writes cmd and arg, then bumps
    # seq; the CPU handles it, writes result, then sets ack = seq.
    ("mbox_seq", 192, "I"),
    ("mbox_cmd", 196, "I"),
    ("mbox_arg", 200, "Q"),  # the Ipis that follow cmd in the same message, one a byte from the low one; 0 ends
    ("mbox_ack", 208, "I"),
    ("mbox_result", 212, "I"),
    # Line 4: what happened to the CPU in the kexec path, written by the CPU.
    ("kick_seen_ns", 256, "Q"),  # CLOCK_MONOTONIC ns when it saw CPUDEAD_MWAIT_KEXEC_HLT
    ("fault", 264, "I"),  # Fault
    ("fault_page", 268, "I"),  # the page that decided it
    ("fault_addr", 272, "I"),  # first stray store's address
    ("fault_value", 276, "I"),
    ("fault_cause", 280, "I"),  # what resumed it: Ev code (WAKE_WRITE, INTERRUPT, ...)
    ("fault_cause_arg", 284, "I"),
    ("fault_ns", 288, "Q"),
    ("stray_stores", 296, "I"),
    ("cpu_gen", 300, "I"),  # the kernel generation this CPU was started in
    ("activity", 304, "I"),  # bumped at every return from wait(): settle detection
    ("busy", 308, "I"),  # 1 between a wake-up and the next wait
    ("ev_head", 312, "I"),  # events logged so far; the ring keeps the last EV_SLOTS
    ("fault_gen", 316, "I"),  # the generation whose map fault_page was judged in (0: cpu_gen's)
    # Lines 5-7: the event ring, EV_SLOTS entries of (ns u64, code u32, arg u32).
    # Line 8, the bus's line. `mon_write`, the monitor's trigger: the bus raises its
    # byte 0 when it writes the line this CPU monitors (WAKE_WRITE); the CPU clears it.
    # `sleeping`: set while the CPU sleeps in sigwaitinfo (see smpd.machine.bus).
    ("mon_write", 512, "I"),
    ("sleeping", 516, "I"),
    # `mon_watch`: 1 while the CPU spins in mwait_play_dead() watching its control word itself
    # (the compiled Waiter with an Ack): the kicker looks for its answer before the rest of the
    # bus's rule (smpd/machine/_hotpath.c).
    ("mon_watch", 520, "I"),
]
EV_OFF = 320
EV_SLOTS = 12
EV_ENTRY = struct.Struct("<QII")
CB = {name: (off, struct.Struct("<" + fmt)) for name, off, fmt in _CB_FIELDS}
assert max(o + s.size for o, s in CB.values() if o < EV_OFF) <= EV_OFF
assert EV_OFF + EV_SLOTS * EV_ENTRY.size <= CB["mon_write"][0] < CB_SIZE
assert CB["mon_write"][0] // LINE == CB["sleeping"][0] // LINE != CB["wake"][0] // LINE  # see above


def cb_ranges(fields) -> tuple[tuple[int, int], ...]:
    """The control-block byte ranges (offset, length) that ``fields`` cover, adjacent ones merged:
    for clearing many fields of a CPU in a few stores."""
    out: list[list[int]] = []
    for off, size in sorted((CB[f][0], CB[f][1].size) for f in fields):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += size
        else:
            out.append([off, size])
    return tuple((off, n) for off, n in out)


# The directory: one u16 per emulated line, 0 = unmonitored, else cpu + 1.
# Invariant: a CPU arms its monitor only on a line that is its own in its kernel's memory
# map (its mwait_cpu_dead line, or its idle task's thread_info->flags line), and no two
# CPUs' lines coincide within a map, so each entry has one writer. (Two CPUs of different
# generations could in principle monitor one line; a kexec'd kernel starts every CPU it
# keeps, so only CPUs it never starts keep an old line: see smpd.kernel.generations.)
# The bus reads it to find whom a write wakes.
# A mailbox message: ``cmd``, then up to MBOX_FOLLOWERS IPIs in ``mbox_arg``, one a byte from the low one.
MBOX_FOLLOWERS = 8


def mbox_arg(then) -> int:
    """``mbox_arg`` for the IPIs ``then`` (at most MBOX_FOLLOWERS) that follow a message's cmd."""
    return sum(int(ipi) << (8 * i) for i, ipi in enumerate(then))


def mbox_follower(arg: int, part: int) -> int:
    """The Ipi value of a message's ``part``-th IPI after its cmd (1 = the first; 0: none there)."""
    return (arg >> (8 * (part - 1))) & 0xFF if 1 <= part <= MBOX_FOLLOWERS else 0


DIR_ENTRY = 2

def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Geometry:
    """Every offset of one segment, derived from the CPU count and the emulated RAM's size.

    What the RAM holds, and where, is each kernel generation's business (smpd.kernel.memmap).
    """

    ncpus: int
    ram_pages: int

    @property
    def npages(self) -> int:
        return self.ram_pages

    @cached_property
    def nlines(self) -> int:
        return self.npages * LINES_PER_PAGE

    @cached_property
    def dir_off(self) -> int:
        return _align(CB_OFF + self.ncpus * CB_SIZE, LINE)

    @cached_property
    def mem_off(self) -> int:
        return _align(self.dir_off + self.nlines * DIR_ENTRY, PAGE)

    @cached_property
    def size(self) -> int:
        return self.mem_off + self.npages * PAGE

    def cb_off(self, cpu: int) -> int:
        return CB_OFF + cpu * CB_SIZE

    @staticmethod
    def line_addr(line: int) -> int:
        return PHYS_BASE + line * LINE

    @staticmethod
    def addr_line(addr: int) -> int:
        return (addr - PHYS_BASE) // LINE

    def in_ram(self, addr: int, n: int = 1) -> bool:
        return PHYS_BASE <= addr and addr + n <= PHYS_BASE + self.npages * PAGE
