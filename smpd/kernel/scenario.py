"""A kexec scenario: everything chosen before the run, so that a seed or a record replays it.

    kernel     pre-fix | 6.5 | 6.6      the kernel doing the kexec (None: the running one's
                                        flavour); --park none|init|hlt are its aliases
    into       pre-fix | 6.5 | 6.6      the kernel kexec'd into (None: the same flavour)
    crash      kdump: crash_smp_send_stop(), then the crash kernel in its reserved region
    injections KIND@PHASE[:TARGET][xCOUNT], e.g. nmi@after-copy:all, mce@during-copy:3-5x2
    order      sequential | random | monitored-first | monitored-last   (the kexec copy)
    seed       drives every random choice (copy order, 'all' never needs one)

Boot parameters (``--boot nosmt,maxcpus=N,kaslr=S``) are parsed here too: a machine's
first kernel takes them at `smpd up`, and each kexec'd kernel inherits them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field

from smpd import cpulist
from smpd.errors import BadInput
from smpd.machine import layout as L
from smpd.inputs import ascii_int
from smpd.kernel.memmap import FLAVOURS, PARK_ALIASES, Boot

PARKS = tuple(PARK_ALIASES)  # the old names: none = pre-fix, init = 6.5, hlt = 6.6
KERNELS = FLAVOURS + PARKS  # what --kernel/--into/--park accept
BOOT_FORM = "comma-separated nosmt, maxcpus=N (1..cpus), kaslr or kaslr=SEED, nokaslr, smt; e.g. nosmt,maxcpus=8"
KINDS = (L.Irq.NMI.kind, L.Irq.MCE.kind, L.Irq.SMI.kind)  # in the order scenarios draw from: fixed by every seed
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
    return injection(m["kind"], m["phase"], m["target"] or "all", int(m["count"]) if m["count"] else 1, ncpus,
                     f"--inject '{text}'")


def injection(kind: str, phase: str, target: str, count: int, ncpus: int, said: str) -> Injection:
    """``count`` interrupts of ``kind`` at ``phase`` to ``target`` ('all' = CPUs 1..N-1, or a
    cpulist), checked against a machine of ``ncpus`` CPUs; ``said`` names, in an error, what gave
    them (an --inject value; `smpd inject`'s --cpus)."""
    if kind not in KINDS:
        raise BadInput(f"{said}: unknown kind '{kind}'; expected one of {', '.join(KINDS)}")
    if phase not in PHASES:
        raise BadInput(f"{said}: unknown phase '{phase}'; expected one of {', '.join(PHASES)}")
    if not 1 <= count <= MAX_COUNT:
        raise BadInput(f"{said}: count {count} is not in the range 1..{MAX_COUNT}")
    target = target.strip()
    if target == "all":
        cpus = tuple(range(1, ncpus))
    else:
        try:
            cpus = tuple(cpulist.parse(target, ncpus))
        except BadInput as err:
            raise BadInput(f"{said}: {err}") from None
        if 0 in cpus:
            raise BadInput(f"{said}: CPU 0 is the kexec CPU, running the kexec; "
                           f"target CPUs 1-{ncpus - 1} or 'all'")
    if not cpus:
        raise BadInput(f"{said}: this machine has no CPU but CPU 0 to target")
    return Injection(kind, phase, target, count, cpus)


def trial_seed(seed: int, trial: int) -> int:
    """The seed of trial (or chain link) ``trial`` of a run seeded ``seed``: a function of both alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{trial}".encode()).digest()[:8], "little") >> 1


def flavour(name: str, option: str = "--kernel") -> str:
    """A kernel flavour from its name or its --park alias."""
    if name in FLAVOURS:
        return name
    if name in PARK_ALIASES:
        return PARK_ALIASES[name]
    raise BadInput(f"{option} '{name}' is not a kernel; expected one of {', '.join(FLAVOURS)} "
                   f"(or the --park names {', '.join(f'{k}={v}' for k, v in PARK_ALIASES.items())})")


def parse_boot(text: str | None, ncpus: int, base: Boot | None = None, seed: int = 0) -> Boot:
    """Boot parameters on top of ``base`` (a kexec'd kernel inherits its parent's). ``kaslr``
    without a seed draws one from the machine seed."""
    b = base or Boot()
    fields = {"nosmt": b.nosmt, "maxcpus": b.maxcpus, "kaslr": b.kaslr}
    for item in [x.strip() for x in (text or "").split(",") if x.strip()]:
        fields.update(_boot_item(text, item, ncpus, seed))
    return Boot(b.flavour, crash=False, **fields)


_BOOT_FLAGS = {"nosmt": {"nosmt": True}, "smt": {"nosmt": False}, "nokaslr": {"kaslr": None}}


def _boot_item(text: str, item: str, ncpus: int, seed: int) -> dict:
    """One boot parameter of ``text`` -> the Boot fields it sets."""
    key, eq, value = item.partition("=")
    if key in _BOOT_FLAGS and not eq:
        return _BOOT_FLAGS[key]
    if key == "kaslr":
        n = ascii_int(value) if eq else seed
        if n is None or not 0 <= n < 2**63:
            raise BadInput(f"--boot '{text}': kaslr={value} is not a seed; expected an integer 0..2**63-1")
        return {"kaslr": n}
    if key == "maxcpus" and eq:
        n = ascii_int(value)
        if n is None or not 1 <= n <= ncpus:
            raise BadInput(f"--boot '{text}': maxcpus={value} is not in the range 1..{ncpus} "
                           f"(this machine has {ncpus} CPUs)")
        return {"maxcpus": n}
    raise BadInput(f"--boot '{text}': unknown boot parameter '{item}'; expected {BOOT_FORM}")


@dataclass(frozen=True)
class Scenario:
    kernel: str | None  # the kexec'ing kernel's flavour; None: whatever runs
    order: str
    seed: int
    injections: tuple[Injection, ...] = field(default_factory=tuple)
    into: str | None = None  # the new kernel's flavour; None: the same as ``kernel``
    crash: bool = False
    boot: str | None = None  # boot parameters for the new kernel, on top of the running one's

    def __post_init__(self):
        for name in (self.kernel, self.into):
            if name is not None and name not in FLAVOURS:
                raise BadInput(f"unknown kernel '{name}'; expected one of {', '.join(FLAVOURS)}")
        if self.order not in ORDERS:
            raise BadInput(f"unknown copy order '{self.order}'; expected one of {', '.join(ORDERS)}")

    def at(self, phase: str) -> list[Injection]:
        return [i for i in self.injections if i.phase == phase]

    def to_json(self) -> dict:
        d = asdict(self)
        d["injections"] = [dict(asdict(i), cpus=list(i.cpus), spec=i.spec()) for i in self.injections]
        return d

    @classmethod
    def build(cls, kernel: str | None, order: str, seed: int, inject: list[str], ncpus: int,
              into: str | None = None, crash: bool = False, boot: str | None = None) -> "Scenario":
        return cls(None if kernel is None else flavour(kernel), order, seed,
                   tuple(parse_injection(t, ncpus) for t in inject),
                   None if into is None else flavour(into, "--into"), crash, boot)
