"""The kernel's cpulist syntax (Documentation/admin-guide/cputopology.rst): ``1-63``, ``1,3,5-7``."""

from __future__ import annotations

from smpd.errors import BadInput
from smpd.inputs import ascii_int

ACCEPTED = "a cpulist like '5', '1-63' or '1,3,5-7' (ascending ranges, no empty items)"


def parse(text: str, ncpus: int | None = None) -> list[int]:
    """Sorted, de-duplicated CPU numbers; ``ncpus`` bounds them to 0..ncpus-1 when given."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"empty cpulist; expected {ACCEPTED}")
    cpus: set[int] = set()
    for item in text.strip().split(","):
        lo_s, sep, hi_s = item.partition("-")
        try:
            lo = _number(lo_s)
            hi = _number(hi_s) if sep else lo
        except ValueError:
            raise BadInput(f"malformed cpulist '{text}': item '{item}' is not N or N-M; expected {ACCEPTED}") from None
        if hi < lo:
            raise BadInput(f"malformed cpulist '{text}': range '{item}' runs backwards; expected {ACCEPTED}")
        cpus.update(range(lo, hi + 1))
    result = sorted(cpus)
    if ncpus is not None and result[-1] >= ncpus:
        bad = [c for c in result if c >= ncpus]
        raise BadInput(
            f"cpulist '{text}' names CPU {format_list(bad)}, but this machine has CPUs 0-{ncpus - 1}"
        )
    return result


def _number(s: str) -> int:
    n = ascii_int(s) if len(s) <= 6 else None
    if n is None or n < 0:
        raise ValueError(s)
    return n


def format_list(cpus: list[int]) -> str:
    """The inverse of :func:`parse`: ``[1, 2, 3, 7]`` -> ``'1-3,7'``."""
    out: list[str] = []
    it = sorted(set(cpus))
    i = 0
    while i < len(it):
        j = i
        while j + 1 < len(it) and it[j + 1] == it[j] + 1:
            j += 1
        out.append(str(it[i]) if i == j else f"{it[i]}-{it[j]}")
        i = j + 1
    return ",".join(out)
