"""What a CPU executes when it resumes after a wake-up, in memory kexec may have overwritten.

DESIGN.md §4: whenever a CPU resumes (MWAIT exit, HLT exit, NMI/MCE handler
entry, the return from SMM), it checks the pages that step would really touch,
in this order, and the first bad one decides:

1. the page tables mapping its code and stack. Not its kernel's: the fetch page-
   faults, delivering #PF needs the IDT through the same broken tables, #DF
   fails likewise: **triple fault**.
2. the text page it executes (the play_dead loop, or the NMI/MCE handler). Not
   its kernel's: it executes foreign bytes (``run_foreign``).
3. its stack. Not its kernel's: it returns into foreign bytes, as in 2.

Foreign bytes are decoded deterministically, 8 bytes an "instruction", from the
place the CPU resumes at, so the same memory always does the same thing:

* ``b0 % 4 == 0``: an invalid opcode. #UD is delivered through the IDT; with the
  IDT overwritten that is a #DF and a triple fault, and with the old IDT still in
  place the old #UD handler runs from overwritten text and faults again: either
  way a triple fault (the evidence says which). A return whose slot holds eight
  zero bytes (a page the next kernel keeps zeroed: per-CPU data, task_structs) is
  said as what it is on x86, a return to address 0: the fetch there is a #PF,
  delivered as the #UD is, to the same triple fault.
* ``b0 % 4 in (1, 2)``: a stray store of the u32 ``b4..b7`` to the address that
  ``b1..b3`` select in emulated memory, through the bus (so it can wake other
  CPUs and corrupt the new kernel); then the next instruction.
* ``b0 % 4 == 3``: a halt (or a jump to self): the CPU stops quietly, in foreign
  code, until INIT.

After MAX_FOREIGN_STEPS instructions without an end, the CPU is taken to be
looping in foreign code (a FOREIGN_HALT).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from smpd.machine import layout as L
from smpd.kernel.image import is_own_page, tag_bytes
from smpd.kernel.memmap import TEXT_IDT, MemoryMap

MAX_FOREIGN_STEPS = 4
# A store's address: b1..b3 times a prime, modulo RAM: spreads 24 bits over all of RAM.
FOREIGN_ADDR_MULT = 1031
_INSN = struct.Struct("<BBBBI")


class Verdict(NamedTuple):
    fault: L.Fault
    page: int = 0  # the page that decided it
    stores: tuple[tuple[int, int], ...] = ()  # (address, value) of stray stores, in order
    detail: str = ""


OK = Verdict(L.Fault.NONE)


class ResumePlan:
    """The pages one resume of one CPU touches, in check order, with the tags they must hold.

    Built once per (CPU, kernel generation, text page) from that generation's memory map,
    so that the check on the hot wake-up path is four 16-byte compares (the kick's
    latency includes it).
    """

    def __init__(self, seg, m: MemoryMap, cpu: int, text_page: int):
        geo = seg.geo
        stack = m.stack_pages_of(cpu)[-1]
        checks = [(pt, "pgtable") for pt in dict.fromkeys(m.pgtable_pages_of(cpu))]
        checks += [(m.text_page(text_page), "text"), (stack, "stack")]
        # Each tag is 16 bytes at the page's start (8-aligned): two u64 compares.
        self.checks = [(page, kind, (geo.mem_off + page * L.PAGE) // 8,
                        *struct.unpack("<QQ", tag_bytes(m.gen, *m.region_of(page))))
                       for page, kind in checks]
        self.cpu, self.generation, self.map = cpu, m.gen, m
        self.text_entry = 64 + 8 * (cpu % 8)  # where the resume lands in a text page
        self.stack_entry = L.PAGE - 64 - 8 * (cpu % 8)  # the return address slot of its stack


def resume(seg, bus, plan: ResumePlan) -> Verdict:
    """Check the pages a resume touches; run foreign bytes where it finds them."""
    u64 = seg.u64
    for page, kind, i, lo, hi in plan.checks:
        if u64[i] == lo and u64[i + 1] == hi:
            continue
        if kind == "pgtable":
            return Verdict(L.Fault.TRIPLE_FAULT, page, detail="page tables overwritten: #PF -> #DF -> triple fault")
        entry = plan.text_entry if kind == "text" else plan.stack_entry
        return run_foreign(seg, bus, plan.map, page, entry, returned=kind == "stack")
    return OK


def run_foreign(seg, bus, m: MemoryMap, page: int, entry: int, returned: bool = False) -> Verdict:
    """Run the foreign bytes of ``page`` from ``entry`` (the module's docstring); ``returned``: the
    CPU got there by a return through its stack's slot at ``entry``."""
    geo = seg.geo
    base = geo.mem_off + page * L.PAGE
    mem_len = geo.npages * L.PAGE
    stores: list[tuple[int, int]] = []
    off = entry
    for _ in range(MAX_FOREIGN_STEPS):
        b0, b1, b2, b3, value = _INSN.unpack_from(seg.buf, base + off)
        op = b0 % 4
        if op == 0:
            idt_ok = is_own_page(seg, m, m.text_page(TEXT_IDT))
            what = ("returned to address 0 (its return slot zeroed): #PF" if returned and off == entry
                    and not (b0 | b1 | b2 | b3 | value) else "invalid opcode: #UD")
            why = (f"{what} through the old IDT into overwritten text, faults again"
                   if idt_ok else f"{what}, IDT overwritten -> #DF -> triple fault")
            return Verdict(L.Fault.TRIPLE_FAULT, page, tuple(stores), why)
        if op == 3:
            break
        addr = L.PHYS_BASE + ((b1 << 16 | b2 << 8 | b3) * FOREIGN_ADDR_MULT % mem_len) // 4 * 4
        bus.write(addr, struct.pack("<I", value))
        stores.append((addr, value))
        off = (off + 8) % (L.PAGE - 8)
    fault = L.Fault.STRAY_STORE if stores else L.Fault.FOREIGN_HALT
    return Verdict(fault, page, tuple(stores), "executed foreign bytes" + (", stored, then halted" if stores else " into a halt"))
