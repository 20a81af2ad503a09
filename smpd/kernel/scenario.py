"""A kexec scenario: everything chosen before the run, so that a seed or a record replays it.

    park       none | hlt | init        (how the old kernel parks offline CPUs for kexec)
    injections KIND@PHASE[:TARGET][xCOUNT], e.g. nmi@after-copy:all, mce@during-copy:3-5x2
    order      sequential | random | monitored-first | monitored-last   (the image copy)
    seed       drives every random choice (copy order, 'all' never needs one)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from smpd import cpulist
from smpd.errors import BadInput

PARKS = ("none", "hlt", "init")
KINDS = ("nmi", "mce", "smi")
PHASES = ("before-kick", "during-kick", "after-kick", "during-copy", "after-copy")
ORDERS = ("sequential", "random", "monitored-first", "monitored-last")
INJECT_FORM = "KIND@PHASE[:TARGET][xCOUNT], e.g. nmi@after-copy, mce@during-copy:all, smi@after-kick:3-5x2"
MAX_COUNT = 1000

_INJECT_RE = re.compile(r"(?P<kind>[a-z]+)@(?P<phase>[a-z-]+?)(?::(?P<target>[^x]+))?(?:x(?P<count>[0-9]+))?")


@dataclass(frozen=True)
class Injection:
    kind: str
    phase: str
    target: str  # "all" or a cpulist
    count: int
    cpus: tuple[int, ...]  # resolved: the CPUs that get the signal

    def spec(self) -> str:
        return f"{self.kind}@{self.phase}:{self.target}" + (f"x{self.count}" if self.count != 1 else "")


def parse_injection(text: str, ncpus: int) -> Injection:
    """Parse one --inject value against a machine of ``ncpus`` CPUs ('all' = CPUs 1..N-1)."""
    m = _INJECT_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise BadInput(f"--inject '{text}' is malformed; expected {INJECT_FORM}")
    kind, phase = m["kind"], m["phase"]
    if kind not in KINDS:
        raise BadInput(f"--inject '{text}': unknown kind '{kind}'; expected one of {', '.join(KINDS)}")
    if phase not in PHASES:
        raise BadInput(f"--inject '{text}': unknown phase '{phase}'; expected one of {', '.join(PHASES)}")
    count = int(m["count"]) if m["count"] else 1
    if not 1 <= count <= MAX_COUNT:
        raise BadInput(f"--inject '{text}': count {count} is not in the range 1..{MAX_COUNT}")
    target = (m["target"] or "all").strip()
    if target == "all":
        cpus = tuple(range(1, ncpus))
    else:
        try:
            cpus = tuple(cpulist.parse(target, ncpus))
        except BadInput as err:
            raise BadInput(f"--inject '{text}': {err}") from None
        if 0 in cpus:
            raise BadInput(f"--inject '{text}': CPU 0 is the kexec CPU, running the kexec; "
                           f"target CPUs 1-{ncpus - 1} or 'all'")
    if not cpus:
        raise BadInput(f"--inject '{text}': this machine has no CPU but CPU 0 to target")
    return Injection(kind, phase, target, count, cpus)


@dataclass(frozen=True)
class Scenario:
    park: str
    order: str
    seed: int
    injections: tuple[Injection, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.park not in PARKS:
            raise BadInput(f"unknown park policy '{self.park}'; expected one of {', '.join(PARKS)}")
        if self.order not in ORDERS:
            raise BadInput(f"unknown copy order '{self.order}'; expected one of {', '.join(ORDERS)}")

    def at(self, phase: str) -> list[Injection]:
        return [i for i in self.injections if i.phase == phase]

    def to_json(self) -> dict:
        d = asdict(self)
        d["injections"] = [dict(asdict(i), cpus=list(i.cpus), spec=i.spec()) for i in self.injections]
        return d

    @classmethod
    def build(cls, park: str, order: str, seed: int, inject: list[str], ncpus: int) -> "Scenario":
        return cls(park, order, seed, tuple(parse_injection(t, ncpus) for t in inject))
