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

LAYOUT_VERSION = 5
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

    OFF = 0  # process not started yet (before the first SIPI)
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
    KEXECED = 4  # a kexec ran: `smpd reset` returns the machine to the old kernel


class Watch(IntEnum):
    SPIN = 0
    ADAPTIVE = 1


class HotPath(IntEnum):  # smpd.hotpath
    PYTHON = 0
    C = 1


class Region(IntEnum):
    TEXT = 1
    PGTABLE = 2
    PERCPU = 3
    STACK = 4


# IPI mailbox commands (coordinator -> CPU). INIT and SIPI are the platform's
# startup IPIs; CPU_DOWN asks an online CPU to run the offline path (play_dead);
# POWER_OFF ends the CPU process (the emulator's switch, not an emulated event).
class Ipi(IntEnum):
    NONE = 0
    INIT = 1
    SIPI = 2
    CPU_DOWN = 3
    POWER_OFF = 4
    REBOOT = 5  # stop_other_cpus(): the CPU runs stop_this_cpu() into its HLT loop
    # `smpd bench kick` only: a kicked CPU in HLT re-enters mwait_play_dead() (status and
    # control back to CPUDEAD_MWAIT_WAIT), so the next round kicks the real path again.
    # No kernel does this; INIT/SIPI/offline would too, at a hundred times the cost.
    # A CPU that has not left mwait_play_dead() yet (its kick blew the budget, and it
    # wakes with the REPARK already posted) starts mwait_play_dead() over, so the
    # next round's kick finds it parked, not in HLT from a late acknowledgement.
    REPARK = 6


class MonitorTarget(IntEnum):
    """Which line mwait_play_dead() arms MONITOR on: the old kernel's flavour."""

    MWAIT_CPU_DEAD = 0  # the fix: a dedicated per-CPU line nothing else writes
    THREAD_INFO = 1  # before the fix: the idle task's thread_info->flags, ordinary memory


class Fault(IntEnum):
    """What a CPU ran into when it resumed in memory that is no longer its kernel's."""

    NONE = 0
    TRIPLE_FAULT = 1  # page fault or #UD whose delivery failed: the CPU shuts down
    STRAY_STORE = 2  # it executed foreign bytes that stored to memory (and went on)
    FOREIGN_HALT = 3  # it executed foreign bytes into a halt or a tight loop
    MCE_SHUTDOWN = 4  # an MCE reached it in wait-for-SIPI: the machine goes down


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


# Kinds of interrupt, in the order a CPU takes them when several are pending.
IRQ_KINDS = ("mce", "nmi", "smi")
IRQ_CODE = {"nmi": 1, "smi": 2, "mce": 3}


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
    ("coordinator_ctime", "d"),  # psutil create_time: pid identity for stale checks
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
    # Regions of emulated memory, as page ranges: first page, page count.
    ("text_first", "I"), ("text_pages", "I"),
    ("pgtable_first", "I"), ("pgtable_pages", "I"),
    ("percpu_first", "I"), ("percpu_pages", "I"),
    ("stack_first", "I"), ("stack_pages", "I"),
    ("stack_pages_per_cpu", "I"),
    ("monitor_target", "I"),  # MonitorTarget: what mwait_play_dead() monitors
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
HEADER_SIZE = PAGE
assert max(o + s.size for o, s in HEADER.values()) <= HEADER_SIZE

# --- the per-CPU control block --------------------------------------------
#
# Four cache lines per CPU, each written mostly by one side, so that a CPU
# watching its wake word shares its host cache line with nobody but its wakers.
CB_SIZE = 8 * LINE
CB_OFF = HEADER_SIZE

# Line 0, the hot line. `wake` is the word the CPU's watch loop loads: one byte
# per kind of waker so that concurrent wakers never lose each other's bits (byte
# stores are atomic; a read-modify-write of a shared word would not be):
WAKE_WRITE = 0  # byte 0: the bus wrote the line this CPU monitors
WAKE_IRQ = 1  # byte 1: an interrupt signal (NMI, SMI, MCE) arrived
WAKE_IPI = 2  # byte 2: the coordinator posted to the mailbox
WAKE_TIMER = 3  # byte 3: the CPU's own timer (spin budget or spurious wake-up)
# `sleeping` is set while the CPU sleeps in sigwaitinfo; wakers read it
# (after a fence) to decide whether its doorbell signal is owed.
_CB_FIELDS = [
    ("wake", 0, "I"),
    ("sleeping", 4, "I"),
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
    ("ctime_ms", 176, "Q"),  # process create time (ms since epoch): pid identity
    # Line 3: the IPI mailbox. The coordinator writes cmd and arg, then bumps
    # seq; the CPU handles it, writes result, then sets ack = seq.
    ("mbox_seq", 192, "I"),
    ("mbox_cmd", 196, "I"),
    ("mbox_arg", 200, "Q"),
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
    # Lines 5-7: the event ring, EV_SLOTS entries of (ns u64, code u32, arg u32).
]
EV_OFF = 320
EV_SLOTS = 12
EV_ENTRY = struct.Struct("<QII")
CB = {name: (off, struct.Struct("<" + fmt)) for name, off, fmt in _CB_FIELDS}
assert max(o + s.size for o, s in CB.values()) <= EV_OFF
assert EV_OFF + EV_SLOTS * EV_ENTRY.size <= CB_SIZE

# The directory: one u16 per emulated line, 0 = unmonitored, else cpu + 1.
# Invariant: a CPU arms its monitor only on a line of its own per-CPU data (its
# mwait_cpu_dead line, or its idle thread_info->flags line), so each entry has
# one writer. The bus reads it to find whom a write wakes.
DIR_ENTRY = 2

# Per-CPU data: each CPU owns two lines. Line 0 of every page holds the page tag.
PERCPU_SLOTS_PER_PAGE = LINES_PER_PAGE - 1
MWAIT_CPU_DEAD_SLOT = 0  # struct mwait_cpu_dead { u32 control; u32 status; }
THREAD_INFO_SLOT = 1  # the idle task's thread_info->flags (the pre-fix monitor target)
PERCPU_SLOTS_PER_CPU = 2

# Named pages of the text region.
TEXT_PLAY_DEAD = 0  # mwait_play_dead() and the HLT loop
TEXT_NMI = 1  # the NMI handler
TEXT_MCE = 2  # the MCE handler
TEXT_IDT = 3  # the IDT


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Geometry:
    """Every offset of one segment, derived from the CPU count and memory sizes."""

    ncpus: int
    text_pages: int
    pgtable_pages: int
    stack_pages_per_cpu: int

    @cached_property  # derived once: region_of and friends sit on the resume path
    def percpu_pages(self) -> int:
        slots = self.ncpus * PERCPU_SLOTS_PER_CPU
        return -(-slots // PERCPU_SLOTS_PER_PAGE)

    @cached_property  # derived once: region_of and friends sit on the resume path
    def text_first(self) -> int:
        return 0

    @cached_property  # derived once: region_of and friends sit on the resume path
    def pgtable_first(self) -> int:
        return self.text_pages

    @cached_property  # derived once: region_of and friends sit on the resume path
    def percpu_first(self) -> int:
        return self.pgtable_first + self.pgtable_pages

    @cached_property  # derived once: region_of and friends sit on the resume path
    def stack_first(self) -> int:
        return self.percpu_first + self.percpu_pages

    @cached_property  # derived once: region_of and friends sit on the resume path
    def stack_pages(self) -> int:
        return self.ncpus * self.stack_pages_per_cpu

    @cached_property  # derived once: region_of and friends sit on the resume path
    def npages(self) -> int:
        return self.stack_first + self.stack_pages

    @cached_property  # derived once: region_of and friends sit on the resume path
    def nlines(self) -> int:
        return self.npages * LINES_PER_PAGE

    @cached_property  # derived once: region_of and friends sit on the resume path
    def dir_off(self) -> int:
        return _align(CB_OFF + self.ncpus * CB_SIZE, LINE)

    @cached_property  # derived once: region_of and friends sit on the resume path
    def mem_off(self) -> int:
        return _align(self.dir_off + self.nlines * DIR_ENTRY, PAGE)

    @cached_property  # derived once: region_of and friends sit on the resume path
    def size(self) -> int:
        return self.mem_off + self.npages * PAGE

    def cb_off(self, cpu: int) -> int:
        return CB_OFF + cpu * CB_SIZE

    def region_of(self, page: int) -> tuple[Region, int]:
        """(region, index within region) of an emulated page."""
        for region, first, count in (
            (Region.TEXT, self.text_first, self.text_pages),
            (Region.PGTABLE, self.pgtable_first, self.pgtable_pages),
            (Region.PERCPU, self.percpu_first, self.percpu_pages),
            (Region.STACK, self.stack_first, self.stack_pages),
        ):
            if first <= page < first + count:
                return region, page - first
        raise ValueError(f"page {page} is outside emulated memory (0..{self.npages - 1})")

    def percpu_line(self, cpu: int, slot: int) -> int:
        """Emulated line index of one of ``cpu``'s per-CPU lines."""
        s = cpu * PERCPU_SLOTS_PER_CPU + slot
        page = self.percpu_first + s // PERCPU_SLOTS_PER_PAGE
        return page * LINES_PER_PAGE + 1 + s % PERCPU_SLOTS_PER_PAGE

    def mwait_cpu_dead_addr(self, cpu: int) -> int:
        """Physical address of ``cpu``'s struct mwait_cpu_dead (control at +0, status at +4)."""
        return self.line_addr(self.percpu_line(cpu, MWAIT_CPU_DEAD_SLOT))

    def thread_info_addr(self, cpu: int) -> int:
        return self.line_addr(self.percpu_line(cpu, THREAD_INFO_SLOT))

    def pgtable_pages_of(self, cpu: int) -> tuple[int, int]:
        """The page-table pages that map the kernel text, and ``cpu``'s idle stack."""
        text_pt = self.pgtable_first
        if self.pgtable_pages == 1:
            return text_pt, text_pt
        return text_pt, self.pgtable_first + 1 + cpu % (self.pgtable_pages - 1)

    def stack_pages_of(self, cpu: int) -> range:
        first = self.stack_first + cpu * self.stack_pages_per_cpu
        return range(first, first + self.stack_pages_per_cpu)

    @staticmethod
    def line_addr(line: int) -> int:
        return PHYS_BASE + line * LINE

    def addr_line(self, addr: int) -> int:
        return (addr - PHYS_BASE) // LINE

    def owner_of_line(self, line: int) -> tuple[int, int] | None:
        """(cpu, slot) whose per-CPU line this is, or None."""
        page, idx = divmod(line, LINES_PER_PAGE)
        if not (self.percpu_first <= page < self.percpu_first + self.percpu_pages) or idx == 0:
            return None
        s = (page - self.percpu_first) * PERCPU_SLOTS_PER_PAGE + idx - 1
        cpu, slot = divmod(s, PERCPU_SLOTS_PER_CPU)
        return (cpu, slot) if cpu < self.ncpus else None

    def symbol(self, addr: int) -> str:
        """A kernel-ish name for an emulated address: 'mwait_cpu_dead[5].status', 'text+0x1040'."""
        if not PHYS_BASE <= addr < PHYS_BASE + self.npages * PAGE:
            return hex(addr)
        off = addr - PHYS_BASE
        line, in_line = divmod(off, LINE)
        owner = self.owner_of_line(line)
        if owner is not None:
            cpu, slot = owner
            if slot == MWAIT_CPU_DEAD_SLOT:
                field = {0: ".control", 4: ".status"}.get(in_line, f"+{in_line}")
                return f"mwait_cpu_dead[{cpu}]{field}"
            return f"thread_info[{cpu}].flags" + (f"+{in_line}" if in_line else "")
        region, index = self.region_of(off // PAGE)
        return f"{region.name.lower()}[{index}]+{off % PAGE:#x}"
