"""Per-CPU event rings in the observation plane (their story is told by smpd.kernel.timeline).

A CPU logs what it did (woke, took an interrupt, saw the kick, faulted, stored
stray bytes) into a ring of EV_SLOTS entries in its own control block: a
timestamp (CLOCK_MONOTONIC ns, the one clock of every process here), a code and
an argument. Only the CPU writes its ring; ``ev_head`` counts entries ever logged
and is written last, so a reader sees whole entries. The coordinator reads the
entries since a mark and merges them with its own into one ordered timeline.
"""

from __future__ import annotations

import time

from smpd.machine import layout as L


def log(seg, cpu: int, code: L.Ev, arg: int = 0, ns: int | None = None) -> None:
    """Append one event to ``cpu``'s ring (called by that CPU only); ``ns`` backdates it
    to when it happened, for events logged late to keep them off a latency path."""
    head = seg.cb(cpu, "ev_head")
    off = seg.geo.cb_off(cpu) + L.EV_OFF + (head % L.EV_SLOTS) * L.EV_ENTRY.size
    L.EV_ENTRY.pack_into(seg.buf, off, time.monotonic_ns() if ns is None else ns, int(code), arg & 0xFFFFFFFF)
    seg.set_cb(cpu, "ev_head", head + 1)


def read_since(seg, cpu: int, mark: int) -> tuple[list[tuple[int, L.Ev, int]], int]:
    """Entries logged since ``mark`` (oldest first), and how many were overwritten."""
    head = seg.cb(cpu, "ev_head")
    first = max(mark, head - L.EV_SLOTS)
    out = []
    for n in range(first, head):
        off = seg.geo.cb_off(cpu) + L.EV_OFF + (n % L.EV_SLOTS) * L.EV_ENTRY.size
        ns, code, arg = L.EV_ENTRY.unpack_from(seg.buf, off)
        try:
            out.append((ns, L.Ev(code), arg))
        except ValueError:
            continue
    return out, first - mark
