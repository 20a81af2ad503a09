"""The kernel's cpulist syntax (Documentation/admin-guide/kernel-parameters.rst, "cpu lists";
lib/bitmap-str.c bitmap_parselist()): ``1-63``, ``1,3,5-7``, and its grouped ranges,
``1-4095:1/2`` (from 1 to 4095, the first 1 CPU of every 2: the odd CPUs, nosmt's SMT siblings)
and ``0-1023:2/256`` (CPUs 0-1, 256-257, 512-513, 768-769). ``N`` is the machine's last CPU
and ``all`` all of its CPUs, where the machine is known (``ncpus``). As in the kernel, a range
that ends past the machine's last CPU is refused (bitmap_check_region(): ERANGE), and the
selected CPUs are the same wherever both accept a list. smpd is stricter in three ways: no
empty items, no group that takes 0 CPUs, and ``N`` only at a range's ends.

The kernel prints cpulists as ranges only (``%*pbl``); ``format_list(grouped=True)`` also
writes the grouped form where a stride repeats and that is shorter, so that a 4096-CPU status
stays readable.
"""

from __future__ import annotations

from smpd.errors import BadInput
from smpd.inputs import ascii_int

ACCEPTED = ("a cpulist like '5', '1-63', '1,3,5-7', '1-63:1/2' (the first 1 of every 2), '0-N' "
            "(N: the last CPU) or 'all'; ascending ranges, no empty items")
LAST_CPU = 4095  # the last CPU any machine has (smpd.config.MAX_CPUS - 1)
_MIN_GROUPS = 3  # a stride shown as a grouped range once it repeats this often


def parse(text: str, ncpus: int | None = None) -> list[int]:
    """Sorted, de-duplicated CPU numbers; ``ncpus`` bounds them to 0..ncpus-1 when given. Any list
    costs at most a LAST_CPU-wide bitmap per item, whatever its ranges say."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"empty cpulist; expected {ACCEPTED}")
    bits = bytearray(LAST_CPU + 1)
    top = 0
    for item in text.split(","):
        lo, hi, used, size = _item(text, item.strip(" \t\n"), ncpus)
        _select(bits, lo, hi, used, size)
        top = max(top, hi)
    result = [c for c, b in enumerate(bits[:top + 1]) if b]  # not all LAST_CPU + 1: ~0.2 ms a soak trial
    if ncpus is not None and result[-1] >= ncpus:
        bad = [c for c in result if c >= ncpus]
        raise BadInput(
            f"cpulist '{text}' names CPU {format_list(bad)}, but this machine has CPUs 0-{ncpus - 1}"
        )
    return result


def _select(bits: bytearray, lo: int, hi: int, used: int, size: int) -> None:
    """Set, of every ``size`` CPUs from ``lo`` to ``hi``, the ``used`` first: a slice per group, or a
    strided slice per CPU taken of each group, whichever is fewer (at most ~64 stores)."""
    starts = range(lo, hi + 1, size)
    if len(starts) <= used:
        for start in starts:
            end = min(start + used, hi + 1)
            bits[start:end] = b"\x01" * (end - start)
    else:
        for k in range(used):
            bits[lo + k:hi + 1:size] = b"\x01" * len(range(lo + k, hi + 1, size))


def _item(text: str, item: str, ncpus: int | None) -> tuple[int, int, int, int]:
    """One item, as bitmap_parselist() reads it (N, N-M, N-M:USED/GROUP, all or all:USED/GROUP):
    its first and last CPU, and of every GROUP CPUs from the first, the USED first."""
    span, colon, group = item.partition(":")
    try:
        if span.lower() == "all" and ncpus is not None:
            lo, hi = 0, ncpus - 1
        else:
            lo_s, sep, hi_s = span.partition("-")
            lo = _number(lo_s, ncpus)
            hi = _number(hi_s, ncpus) if sep else lo
            if colon and not sep:  # a group needs a range
                raise ValueError(item)
        used, slash, size = group.partition("/")
        if colon and not slash:
            raise ValueError(item)
        used_n, size_n = (_number(used, None), _number(size, None)) if colon else (1, 1)
    except ValueError:
        raise BadInput(f"malformed cpulist '{text}': item '{item}' is not a CPU, a range A-B or a grouped range A-B:USED/GROUP"
                       f"{'' if ncpus is not None else ' (N and all only where the machine is known)'}; "
                       f"expected {ACCEPTED}") from None
    if hi < lo:
        raise BadInput(f"malformed cpulist '{text}': range '{item}' runs backwards; expected {ACCEPTED}")
    if hi > LAST_CPU:
        raise BadInput(f"cpulist '{text}': item '{item}' names CPU {hi}; no machine has CPUs past {LAST_CPU}")
    if colon and ncpus is not None and hi >= ncpus:  # (a plain range that does selects its end: parse says so)
        raise BadInput(f"cpulist '{text}': range '{item}' ends at CPU {hi}, but this machine has CPUs "
                       f"0-{ncpus - 1}")
    if not 0 < used_n <= size_n:
        raise BadInput(f"malformed cpulist '{text}': group '{group}' of '{item}' must take 1 to GROUP "
                       f"CPUs of every GROUP (GROUP > 0); expected {ACCEPTED}")
    return lo, hi, used_n, size_n


def _number(s: str, ncpus: int | None) -> int:
    if s == "N" and ncpus is not None:
        return ncpus - 1
    n = ascii_int(s) if len(s) <= 6 else None
    if n is None or n < 0:
        raise ValueError(s)
    return n


def format_list(cpus: list[int], grouped: bool = False) -> str:
    """The inverse of :func:`parse`: ``[1, 2, 3, 7]`` -> ``'1-3,7'``. ``grouped``: a run of at
    least three equal ranges at an equal stride is one grouped range where that is shorter
    (``[1, 3, 5, 7, 9]`` -> ``'1-9:1/2'``; ``[1, 3, 5]`` stays ``'1,3,5'``)."""
    ranges = _ranges(cpus)
    if not grouped:
        return ",".join(_span(lo, hi) for lo, hi in ranges)
    out: list[str] = []
    i = 0
    while i < len(ranges):
        lo, hi = ranges[i]
        j = i
        if i + 1 < len(ranges):
            stride, used = ranges[i + 1][0] - lo, hi - lo + 1
            while j + 1 < len(ranges) and ranges[j + 1] == (ranges[j][0] + stride, ranges[j][1] + stride):
                j += 1
        plain = ",".join(_span(a, b) for a, b in ranges[i:j + 1])
        group = f"{lo}-{ranges[j][1]}:{used}/{stride}" if j + 1 - i >= _MIN_GROUPS else plain
        out.append(group if len(group) < len(plain) else plain)
        i = j + 1
    return ",".join(out)


def _ranges(cpus: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in sorted(set(cpus)):
        if out and out[-1][1] == c - 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"
