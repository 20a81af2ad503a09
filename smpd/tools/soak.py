"""Soak runs: thousands of randomized kexec trials on one machine, nothing lost, every one replayable.

Each trial i draws its scenario from trial_seed(seed, i) alone: park policy,
offline set, copy order, injections (kinds, phases, targets, counts). So a run
can be resumed at any trial, and any trial replayed (`smpd kexec --replay
FILE:TRIAL`), with no other state.

The file is JSON lines: a header (what the run is), then one line per trial,
written, flushed and fsynced as the trial ends: a crash or a SIGKILL loses at
most the trial in flight. A partial last line (the crash came mid-write) is
reported and dropped on --resume.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import psutil
from hdrh.histogram import HdrHistogram

from smpd import cpulist
from smpd.machine import layout as L
from smpd.errors import BadInput, CpuLost, SmpdError
from smpd.host import files
from smpd.kernel.kexec import OUTCOMES
from smpd.kernel.scenario import FLAVOURS, KERNELS, KINDS, ORDERS, PHASES, flavour, trial_seed

FILE_KIND = "smpd-soak"
# Version 2: trials of the kernel-generation model (layout 6: each generation its own memory map;
# the shutdown order of upstream). A version-1 trial would replay differently: it is refused.
FILE_VERSION = 2
COMPATIBLE_LAYOUTS = {6, 7, 8, 9, 10}  # segment layouts whose trials replay alike (7 changed identities, 8 wake words, 9 a kicker's hint only, 10 a timing stamp only)


@dataclass
class Plan:
    """The header of a soak file: everything that defines the trial sequence."""

    seed: int
    parks: list[str]
    inject_rate: float
    kinds: list[str]
    cpus: int
    trials: int | None = None
    duration_s: float | None = None
    host_load: str = "none"
    kind: str = FILE_KIND
    version: int = FILE_VERSION
    layout_version: int = L.LAYOUT_VERSION
    idle_kick: dict = field(default_factory=dict)
    started: float = 0.0
    cluster: dict | None = None  # `--cluster`: {"address", "slots_per_node"} (smpd.tools.cluster)
    # nosmt's SMT siblings: offline in every trial, as the kernel keeps them (cpu_up() refuses them)
    nosmt_siblings: list[int] = field(default_factory=list)
    # the CPUs the user had offline before the first trial: what the machine is left with, also
    # after a --resume whose machine a failed run left otherwise (None: a file of an older smpd)
    users_offline: list[int] | None = None
    # the kernel generation 1 ran before the first trial (each trial's reset boots the next trial's):
    # what the machine is left running, also after a --resume (None: a file of an older smpd)
    users_kernel: str | None = None

    def identity(self) -> dict:
        """What a resumed run must agree on to continue the same sequence."""
        return {k: getattr(self, k) for k in ("seed", "parks", "inject_rate", "kinds", "cpus", "kind",
                                               "version", "layout_version")}


def _parse_list(text: str, allowed: tuple[str, ...], option: str, same=lambda x: x) -> list[str]:
    """Each item once (``same``: what an item names; a second name for it is a repeat): a repeat would
    weigh the draw, unsaid."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or any(x not in allowed for x in items):
        raise BadInput(f"{option} '{text}': expected a comma-separated list of {', '.join(allowed)}")
    seen: dict[str, str] = {}
    for x in items:
        if same(x) in seen:
            first = seen[same(x)]
            twice = f"'{x}' is given twice" if first == x else f"'{first}' and '{x}' name the same kernel"
            raise BadInput(f"{option} '{text}': {twice}; name each once")
        seen[same(x)] = x
    return items


def parse_parks(text: str) -> list[str]:
    """Kernels to draw from: flavours (pre-fix, 6.5, 6.6) or their --park names (none, init, hlt)."""
    return _parse_list(text, KERNELS, "--park", flavour)


def check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise BadInput(f"--list '{outcome}': expected one of {', '.join(OUTCOMES)}")


def trials_with(records: list[dict], outcome: str) -> list[dict]:
    """`smpd soak --summary FILE --list OUTCOME`: every trial of that outcome."""
    check_outcome(outcome)
    return [r for r in records if r["outcome"] == outcome]


def parse_kinds(text: str) -> list[str]:
    return _parse_list(text, KINDS, "--kinds")



def draw(plan: Plan, trial: int) -> dict:
    """Trial ``trial``'s scenario, from its seed alone."""
    s = trial_seed(plan.seed, trial)
    rng = random.Random(s)
    others = list(range(1, plan.cpus))
    park = rng.choice(plan.parks)
    if not others or rng.random() < 0.5:
        offline = others
    else:
        offline = sorted(rng.sample(others, rng.randint(1, len(others))))
    offline = sorted(set(offline) | set(plan.nosmt_siblings))
    order = rng.choice(ORDERS)
    inject = []
    if others and rng.random() < plan.inject_rate:
        for _ in range(rng.choice((1, 1, 2))):
            kind = rng.choice(plan.kinds)
            phase = rng.choice(PHASES)
            target = "all" if kind == "mce" or rng.random() < 0.5 else str(rng.choice(others))
            count = rng.choice((1, 1, 2, 3))
            inject.append(f"{kind}@{phase}:{target}" + (f"x{count}" if count > 1 else ""))
    return {"trial": trial, "seed": s, "park": park, "offline": cpulist.format_list(offline), "order": order,
            "inject": inject}


def injection_label(inject: list[str]) -> str:
    kinds = sorted({spec.split("@")[0] for spec in inject})
    return "+".join(kinds) if kinds else "none"


# -- the file --------------------------------------------------------------------

def open_new(path: str, plan: Plan):
    """Create the file (never over another run's: O_EXCL), locked for this run, with its header.

    If the header cannot be written (a full disk), the file this call created is
    removed again: a run that never started leaves no empty file to refuse later."""
    try:
        f = files.open_output(path, "--out", exclusive=True)  # the directory reached safely (smpd.host.files)
    except FileExistsError:
        raise BadInput(f"--out {path} exists; continue it with --resume {path}, or name a new file") from None
    lock(f, path)
    try:
        _append(f, asdict(plan))
    except OSError as err:
        files.remove_output(f, path, "--out")  # only if it is still the file this call created
        f.close()
        raise SmpdError(f"--out {path}: the header could not be written ({err.strerror}); nothing was "
                        f"run and the file is removed") from None
    return f


def lock(f, path: str) -> None:
    """One writer per soak file: a second run on the same file is refused, not interleaved."""
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BadInput(f"another smpd soak is writing {path} right now") from None


def _append(f, obj: dict) -> None:
    """One line, written whole or not at all as far as a reader goes (read() drops a partial
    last line), then fsynced. Unbuffered: a failed write leaves nothing queued to retry later."""
    files.write_all(f, (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode())
    os.fsync(f.fileno())


def append_trial(f, record: dict) -> None:
    _append(f, record)


# What a file may hold, field by field: a header or a record that does not match is damage,
# reported with its line and field, never a TypeError deep in the summary.
def _int(lo: int, hi: int):
    return lambda v: type(v) is int and lo <= v <= hi


def _real(lo: float, hi: float):
    return lambda v: type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi


def _list_of(allowed: tuple[str, ...], empty_ok: bool = False):
    return lambda v: type(v) is list and (empty_ok or v) and all(x in allowed for x in v)


def _optional(check):
    return lambda v: v is None or check(v)


def _cpulist(v) -> bool:
    if type(v) is not str:
        return False
    try:
        return v == "" or bool(cpulist.parse(v))
    except BadInput:
        return False


def _injections(v) -> bool:
    return type(v) is list and all(type(x) is str and x.split("@")[0] in KINDS for x in v)


def _kick(v) -> bool:
    return v is None or (type(v) is dict and type(v.get("rtt_ns")) is list
                         and all(type(x) is int and x >= 0 for x in v["rtt_ns"])
                         and all(_int(0, 2**63)(v.get(k)) for k in ("stuck", "over_budget", "budget_ns")))


def _host(v) -> bool:
    return type(v) is dict and all(_real(0, 1e9)(v.get(k)) for k in ("cpu_percent", "load1", "steal_percent"))


def _cpu_numbers(v) -> bool:
    return type(v) is list and all(_int(1, 4095)(c) for c in v)


HEADER_FIELDS = {
    "seed": (_int(0, 2**63 - 1), "an integer in 0..2**63-1"),
    "parks": (_list_of(KERNELS), f"a non-empty list of {', '.join(KERNELS)}"),
    "inject_rate": (_real(0, 1), "a number in 0..1"),
    "kinds": (_list_of(KINDS), f"a non-empty list of {', '.join(KINDS)}"),
    "cpus": (_int(1, 4096), "an integer in 1..4096"),
    "trials": (_optional(_int(1, 10**9)), "an integer >= 1, or null"),
    "duration_s": (_optional(_real(0.001, 10**9)), "a number of seconds, or null"),
    "host_load": (lambda v: type(v) is str, "a string"),
    "idle_kick": (lambda v: type(v) is dict and all(_int(0, 2**63)(x) for x in v.values()), "an object of ns"),
    "started": (_real(0, 1e12), "a time in seconds"),
}
HEADER_OPTIONAL = {
    "nosmt_siblings": (_cpu_numbers, "a list of CPU numbers"),
    "users_offline": (_optional(_cpu_numbers), "null or a list of CPU numbers"),
    "users_kernel": (_optional(lambda v: v in FLAVOURS), f"null or one of {', '.join(FLAVOURS)}"),
    "cluster": (_optional(lambda v: type(v) is dict and type(v.get("address")) is str
                          and _int(1, 64)(v.get("slots_per_node"))), "null or {address, slots_per_node}"),
}
RECORD_FIELDS = {
    "trial": (_int(0, 10**9), "an integer >= 0"),
    "seed": (_int(0, 2**63 - 1), "an integer in 0..2**63-1"),
    "park": (lambda v: v in KERNELS, f"one of {', '.join(KERNELS)}"),
    "offline": (_cpulist, "a cpulist or ''"),
    "order": (lambda v: v in ORDERS, f"one of {', '.join(ORDERS)}"),
    "inject": (_injections, "a list of KIND@PHASE... strings"),
    "outcome": (lambda v: v in OUTCOMES, f"one of {', '.join(OUTCOMES)}"),
    "trial_ms": (_real(0, 1e12), "a number of ms"),
    "evidence": (lambda v: type(v) is str, "a string"),
}
RECORD_OPTIONAL = {
    "kick": (_kick, "null or {rtt_ns: [ns...], stuck, over_budget, budget_ns}"),
    "respawned": (lambda v: type(v) is list and all(type(x) is int for x in v), "a list of CPUs"),
    "host": (_host, "{cpu_percent, load1, steal_percent}"),
    "host_load": (lambda v: type(v) is str, "a string"),
    "ctx_invol": (_int(0, 2**63), "an integer >= 0"),
    "t": (_real(0, 1e12), "a time in seconds"),
    "node": (lambda v: type(v) is str and 0 < len(v) <= 64, "a Ray node id"),
    "slot": (_int(0, 10**6), "an integer >= 0"),
}


def _printable(v) -> bool:
    """No control character anywhere: a soak file's strings reach the user's terminal."""
    if isinstance(v, str):
        return v.isprintable()
    if isinstance(v, list):
        return all(_printable(x) for x in v)
    if isinstance(v, dict):
        return all(_printable(k) and _printable(x) for k, x in v.items())
    return True


def _check_fields(obj: dict, required: dict, optional: dict, where: str) -> None:
    if not _printable(obj):
        raise BadInput(f"{where} holds a control character; the file is damaged (or made to look like one)")
    for key, (check, accepted) in (*required.items(), *optional.items()):
        if key not in obj:
            if key in required:
                raise BadInput(f"{where}: field '{key}' is missing; the file is damaged")
            continue
        if not check(obj[key]):
            shown = json.dumps(obj[key])
            raise BadInput(f"{where}: field '{key}' is {shown[:40]}; expected {accepted}; the file is damaged")


def check_record(obj: dict, where: str) -> None:
    _check_fields(obj, RECORD_FIELDS, RECORD_OPTIONAL, where)


def read(path: str) -> tuple[Plan, list[dict], str | None]:
    """The header, the trial records, and a note on a dropped partial last line (nothing is changed)."""
    with files.open_input(path, "soak file") as f:
        plan, records, note, _good = _parse(f, path)
    return plan, records, note


def open_resume(path: str):
    """The file of a run to continue, opened once for reading, repairing and appending (see
    smpd.host.files: the name is never reopened) and locked for this run. Returns
    (file, plan, records, note); a partial last line is cut off, so appending continues cleanly."""
    f = files.open_output(path, "--resume", create=False, read=True)
    try:
        lock(f, path)
        plan, records, note, good = _parse(f, path)
        if good != os.fstat(f.fileno()).st_size:
            f.truncate(good)
            os.fsync(f.fileno())
        f.seek(0, os.SEEK_END)
        return f, plan, records, note
    except BaseException:
        f.close()
        raise


MAX_RECORD = 64 << 10  # a trial record is a few KiB: a longer line is no record of ours


def _parse(f, path: str) -> tuple[Plan, list[dict], str | None, int]:
    """Every field checked (HEADER_FIELDS, RECORD_FIELDS), trial numbers rising, one line at a time:
    the header first, and reading stops at the first line that is not a record (so a damaged or
    planted file costs no more than its good part). Returns the plan, the records, a note on a
    dropped last line, and the length of the good part."""
    lines = files.read_lines(f, path, "soak file", MAX_RECORD)
    records: list[dict] = []
    header = None
    good_len, note, bad = 0, None, None
    for n, (raw, tail) in enumerate(lines):
        if raw is None:
            if tail:
                note = f"dropped a partial last line ({len(tail)} bytes): the trial in flight when the run stopped"
            break
        if bad is not None:  # a malformed line with more after it: damage, not a cut-short write
            raise BadInput(f"soak file {path}: line {bad + 1} is not JSON; the file is damaged")
        try:
            obj = json.loads(raw, parse_constant=_no_constants)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            if header is None:
                raise BadInput(f"{path} is not an smpd soak file (its first line is not a soak header)") from None
            bad = n
            note = f"dropped a malformed last line ({len(raw)} bytes)"
            continue
        if header is None:
            header = obj
            _check_header(header, path)
        else:
            where = f"soak file {path}: line {n + 1}"
            if not isinstance(obj, dict):
                raise BadInput(f"{where} is not a trial record; the file is damaged")
            _check_fields(obj, RECORD_FIELDS, RECORD_OPTIONAL, where)
            if records and obj["trial"] <= records[-1]["trial"]:
                raise BadInput(f"{where}: trial {obj['trial']} after trial {records[-1]['trial']}; "
                               f"the file is damaged")
            records.append(obj)
        good_len += len(raw) + 1
    if header is None:
        raise BadInput(f"{path} is not an smpd soak file (it is empty)")
    known = set(Plan.__dataclass_fields__)
    return Plan(**{k: v for k, v in header.items() if k in known}), records, note, good_len


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's json takes them, JSON does not


def _check_header(header, path: str) -> None:
    if not isinstance(header, dict) or header.get("kind") != FILE_KIND:
        raise BadInput(f"{path} is not an smpd soak file (its first line is not a soak header)")
    layout = header.get("layout_version")
    if header.get("version") != FILE_VERSION or type(layout) is not int or layout not in COMPATIBLE_LAYOUTS:
        raise BadInput(f"{path} was written by another smpd (file version {header.get('version')}, layout "
                       f"{header.get('layout_version')}); this one reads version {FILE_VERSION}, layouts "
                       f"{', '.join(map(str, sorted(COMPATIBLE_LAYOUTS)))}")
    _check_fields(header, HEADER_FIELDS, HEADER_OPTIONAL, f"soak file {path}: the header")
    if header["trials"] is None and header["duration_s"] is None:
        raise BadInput(f"soak file {path}: the header has neither trials nor duration_s; the file is damaged")


# -- running -----------------------------------------------------------------

class HostSampler:
    """CPU %, load average and steal, sampled once per trial with psutil."""

    def __init__(self):
        psutil.cpu_percent(None)
        psutil.cpu_times_percent(None)
        self.samples: list[dict] = []

    def sample(self) -> dict:
        times = psutil.cpu_times_percent(None)
        s = {"cpu_percent": psutil.cpu_percent(None), "load1": os.getloadavg()[0],
             "steal_percent": getattr(times, "steal", 0.0)}
        self.samples.append(s)
        return s


def progress_bar(console, title: str):
    """The soak's progress line (single host or cluster): ``title``, a bar, done/total, the time
    and the task's description (the rates); gone when the run ends."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{title}[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=True)


def set_offline(live, want: set[int], now: set[int]) -> None:
    """Hotplug the machine from offline set ``now`` to ``want``, with the fewest CPUs moved."""
    if now - want:
        live.request("online", cpus=cpulist.format_list(sorted(now - want)))
    if want - now:
        live.request("offline", cpus=cpulist.format_list(sorted(want - now)))


def run_trial(live, drawn: dict, offline_now: set[int], then: dict | None = None) -> tuple[dict, set[int]]:
    """Bring the offline set to the drawn one, kexec, reset. Returns (record, offline set after).

    ``then``: the next trial's draw, which the reset boots into: its kernel as generation 1 (the
    kexec then finds its offline CPUs parked by that kernel's own mwait_play_dead(), where it
    would rewrite the running generation as that kernel and re-park them: Kexec.become) and its
    offline set (one CPU_DOWN each, where hotplugging from this trial's costs CPU_DOWN, INIT and
    SIPI for each CPU that changes); None: the machine's kernel, and this trial's offline set."""
    want = set(cpulist.parse(drawn["offline"])) if drawn["offline"] else set()
    t0 = time.monotonic()
    try:
        set_offline(live, want, offline_now)
        r = live.request("kexec", kernel=drawn["park"], inject=drawn["inject"], order=drawn["order"],
                         seed=drawn["seed"], brief=True)  # the record keeps no timeline: a replay shows it
    except CpuLost as err:
        # A CPU process died before the kexec (between trials, or during this trial's hotplug):
        # an emulator fault like one mid-kexec.
        r = {"outcome": "CPU_LOST", "evidence": f"before the kexec: {err}", "notes": [], "duration_ms": 0.0}
    # respawns what died, back to the old kernel
    reset = live.request("reset") if then is None else live.request("reset", offline=then["offline"],
                                                                     kernel=then["park"])
    kick = r.get("kick") or {}
    budget = kick.get("budget_ns", 0)
    rtts = [e["rtt_ns"] for e in kick.get("cpus", {}).values() if "rtt_ns" in e]
    record = dict(drawn)
    record.update({
        "outcome": r["outcome"], "evidence": r["evidence"], "notes": r["notes"],
        "kick": {"rtt_ns": rtts, "stuck": len(kick.get("stuck", [])), "budget_ns": budget,
                 "over_budget": sum(1 for v in rtts if v > budget) + len(kick.get("stuck", [])),
                 "total_ns": kick.get("total_ns")} if kick else None,
        "kexec_ms": round(r["duration_ms"], 2), "trial_ms": round((time.monotonic() - t0) * 1e3, 2),
        "respawned": reset["respawned"], "t": time.time(),
    })
    return record, set(reset["offline"])


# -- the summary -------------------------------------------------------------

EXAMPLES = 3  # trial numbers the summary names per outcome cell (`--list OUTCOME` names them all)


def summarize(plan: Plan, records: list[dict]) -> dict:
    by, examples, host_stuck = _outcome_cells(records)
    kicks = _kick_tally(records)
    # Time spent running trials: a resumed run's pause does not count.
    span = sum(r["trial_ms"] for r in records) / 1e3
    host = [r["host"] for r in records if r.get("host")]
    return {
        "trials": len(records), "seconds": round(span, 2), "wall_s": _wall_s(records),
        "examples": examples, "stuck_without_injection": host_stuck,
        "trials_per_s": round(len(records) / span, 2) if span else None,
        "outcomes": by, "idle_kick_rtt_ns": plan.idle_kick, **kicks,
        "budget_ns": next((r["kick"]["budget_ns"] for r in records if r.get("kick")), None),
        "cpu_lost": sum(r["outcome"] == "CPU_LOST" for r in records),
        "respawns": sum(len(r.get("respawned", [])) for r in records),
        "host_load": ", ".join(sorted({r.get("host_load", plan.host_load) for r in records})) or plan.host_load,
        "host": {key: round(sum(s[key] for s in host) / len(host), 2) for key in
                 ("cpu_percent", "load1", "steal_percent")} if host else {},
        "ctx_switches_involuntary": sum(r.get("ctx_invol", 0) for r in records) if records else None,
    }


def _outcome_cells(records: list[dict]) -> tuple[dict, dict, list[int]]:
    """Outcome counts per (kernel, injection) cell, the first EXAMPLES trial numbers of each, and
    the trials STUCK with nothing injected (nothing but the host kept a CPU from its kick)."""
    by: dict[str, dict[str, dict[str, int]]] = {}
    examples: dict[str, dict[str, dict[str, list[int]]]] = {}
    for r in records:
        label = injection_label(r["inject"])
        cell = by.setdefault(r["park"], {}).setdefault(label, {})
        cell[r["outcome"]] = cell.get(r["outcome"], 0) + 1
        named = examples.setdefault(r["park"], {}).setdefault(label, {}).setdefault(r["outcome"], [])
        if len(named) < EXAMPLES:
            named.append(r["trial"])
    return by, examples, [r["trial"] for r in records if r["outcome"] == "STUCK" and not r["inject"]]


def _kick_tally(records: list[dict]) -> dict:
    """Every kick of every trial: round-trip percentiles under load, kicks over budget, stuck."""
    h = HdrHistogram(1, 60 * 10**9, 3)
    kicks = over = stuck = 0
    for k in (r["kick"] for r in records if r.get("kick")):
        for v in k["rtt_ns"]:
            h.record_value(max(1, v))
        kicks += len(k["rtt_ns"]) + k["stuck"]
        over += k["over_budget"]
        stuck += k["stuck"]
    under_load = {}
    if h.get_total_count():
        under_load = {k: h.get_value_at_percentile(p) for k, p in (("p50", 50), ("p90", 90), ("p99", 99),
                                                                    ("p999", 99.9))}
        under_load["max"] = h.get_max_value()
    return {"kick_rtt_ns": under_load, "kicks": kicks, "over_budget": over,
            "over_budget_share": round(over / kicks, 6) if kicks else 0.0, "stuck": stuck}


def _wall_s(records: list[dict]) -> float | None:
    """From the first trial's start to the last one's end: the trials plus the driver's own work
    between them (host samples, the fsync), and a resumed run's pause. None for an old file
    whose trials lack "t"."""
    if not (records and "t" in records[0] and "t" in records[-1]):
        return None
    return round(records[-1]["t"] - (records[0]["t"] - records[0]["trial_ms"] / 1e3), 2)
