"""Human output: the machine line, the per-CPU table, and a grid when there are many CPUs."""

from __future__ import annotations

import re

from rich.console import Group
from rich.table import Table
from rich.text import Text

from smpd.cpulist import format_list

STATE_STYLE = {
    "RUNNING": ("RUN", "green"), "MWAIT": ("MWT", "cyan"), "HLT": ("HLT", "yellow"),
    "WAIT_FOR_SIPI": ("SIP", "magenta"), "SHUTDOWN": ("SHD", "bold red"),
    "GONE": ("GON", "bold white on red"), "OFF": ("OFF", "dim"),
}
TABLE_MAX_CPUS = 32  # above this, one grid cell per CPU instead of one table row
GRID_MAX_CPUS = 512  # above this, the CPUs of each state as a list, no grid (64 rows of 8 is a screenful)


def machine_line(m: dict) -> Text:
    states = ", ".join(f"{n} {s}" for s, n in sorted(m["states"].items()))
    t = Text()
    t.append(f"machine '{m['name']}'", style="bold")
    t.append(f"  {m['state']}  {m['cpus']} CPUs, {m['online']} online; by state: {states}\n")
    if m.get("ended_by"):
        t.append(f"it {m['ended_by']}: nothing runs on it until `smpd reset`\n", style="bold red")
    if left := m.get("left_by_soak"):
        offline = f"CPU {format_list(left['offline'])} offline" if left["offline"] else "every CPU online"
        t.append(f"a soak ended on it without putting back your offline CPUs and kernel (its pid {left['pid']}, "
                 f"gone now: killed, or stopped by an error): `smpd reset` restores them ({offline}, "
                 f"{left['kernel']}); a hotplug or `reset --offline`/`--kernel` makes your own choice instead\n",
                 style="yellow")
    t.append(f"coordinator pid {m['pid']}  watch {m['watch']}  hot path {m['hot_path']}  pin {m['pin']}  "
             f"generation {m['generation']} ({m['kernel']})  seed {m['seed']}  "
             f"uptime {_duration(m['uptime_s'])}  bring-up {m['bringup_ms']:.0f} ms\n")
    t.append(f"segment {m['segment']} ({m['segment_bytes'] / 2**20:.1f} MiB, layout v{m['layout_version']})",
             style="dim")
    return t


def _duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    mi, sec = divmod(rem, 60)
    return f"{h}h{mi:02d}m{sec:02d}s" if h else f"{mi}m{sec:02d}s"


_IRQ_KINDS = ("nmi", "smi", "mce")  # as status names them, in the order shown
_NO_IRQS = {k: {"taken": 0, "pending": 0, "held": 0} for k in _IRQ_KINDS}


def _irq_counts(c: dict) -> dict:
    """A CPU's interrupt counts: a brief view has none when each is 0 (smpd.daemon.status)."""
    return c.get("interrupts", _NO_IRQS)


def _irqs(c: dict) -> str:
    parts = []
    for k, v in _irq_counts(c).items():
        if v["taken"] or v["pending"] or v["held"]:
            s = f"{k}:{v['taken']}"
            if v["pending"] or v["held"]:
                s += f" (pend {v['pending']}, held {v['held']})"
            parts.append(s)
    return " ".join(parts) or "-"


# The per-CPU table's columns, most important first: (header, justify, can fold, cell).
# When the terminal is too narrow, columns are dropped from the end of this list,
# never cut: a hex word is shown whole or not at all.
def _md(c: dict, word: str) -> str:
    md = c["mwait_cpu_dead"]
    if md is None:
        return "-"
    return "overwritten" if md.get("overwritten") else f"{md[word]:#010x}"


CPU_COLUMNS = (
    ("CPU", "right", False, lambda c: str(c["cpu"])),
    ("STATE", "left", False, lambda c: c["state"]),
    ("CONTROL", "left", False, lambda c: _md(c, "control")),  # mwait_cpu_dead.control
    ("STATUS", "left", False, lambda c: _md(c, "status")),  # mwait_cpu_dead.status
    ("HOTPLUG", "left", False, lambda c: c["hotplug"]),
    ("IRQ", "left", True, _irqs),
    ("MONITOR", "left", False, lambda c: c["monitor"]["symbol"] or "-"),  # the line it arms, whole or not at all
    ("WAKE w/i/ipi/sp", "right", False,
     lambda c: "{write}/{interrupt}/{ipi}/{spurious}".format(**c["wakeups"])),
    ("PID", "right", False, lambda c: str(c["pid"])),
    ("CORE", "right", False, lambda c: "-" if c["core"] < 0 else str(c["core"])),
    ("GEN", "right", False, lambda c: str(c["generation"])),
)
FOLD_MIN = 12  # the narrowest a folding column gets


def _fit(cpus: list[dict], columns: int) -> tuple[list[tuple], list[int], list[str]]:
    """The columns that fit ``columns`` characters, their narrowest widths, and the headers of those dropped."""
    keep = list(CPU_COLUMNS)
    while True:
        widths = [max([len(h)] + [len(cell(c)) for c in cpus]) for h, _, _, cell in keep]
        least = [min(w, max(FOLD_MIN, len(h))) if fold else w for w, (h, _, fold, _) in zip(widths, keep)]
        if sum(least) + (len(keep) - 1) <= columns or len(keep) <= 4:  # CPU, STATE and the two words stay
            return keep, least, [h for h, *_ in CPU_COLUMNS[len(keep):]]
        keep.pop()


def cpu_table(cpus: list[dict], columns: int = 80) -> Group:
    """One row per CPU, in at most ``columns`` characters (see CPU_COLUMNS)."""
    keep, least, dropped = _fit(cpus, columns)
    t = Table(box=None, pad_edge=False, header_style="bold", collapse_padding=True)
    for (header, just, fold, _), w in zip(keep, least):
        t.add_column(header, justify=just, no_wrap=not fold, overflow="fold", min_width=w)
    for c in cpus:
        cells = [cell(c) for _, _, _, cell in keep]
        cells[1] = Text(cells[1], style=STATE_STYLE.get(c["state"], (c["state"], ""))[1])
        t.add_row(*cells)
    parts: list = [t, Text("CONTROL, STATUS: the CPU's struct mwait_cpu_dead (- on a pre-fix kernel, which has "
                           "none; overwritten: its kernel's per-CPU page holds a later kernel's bytes); MONITOR: "
                           "the line it armed, named by its first word; WAKE, IRQ: counts since "
                           "`smpd up`", style="dim")]
    if dropped:
        parts.append(Text(f"(not shown in {columns} columns: {', '.join(dropped)}; see --json)", style="dim"))
    return Group(*parts)


def cpu_grid(cpus: list[dict], width: int = 16) -> Group:
    """One cell per CPU: number and a three-letter state, ``width`` cells a row; then the CPUs of
    each state as a list (alone above GRID_MAX_CPUS, with each interrupt's CPUs as lists)."""
    if len(cpus) > GRID_MAX_CPUS:
        return Group(_by_state(cpus), *_interrupt_lists(cpus))
    rows = []
    for start in range(0, len(cpus), width):
        line = Text()
        for c in cpus[start:start + width]:
            abbrev, style = STATE_STYLE.get(c["state"], (c["state"][:3], ""))
            line.append(f"{c['cpu']:>4} ", style="dim")
            line.append(abbrev, style=style)
        rows.append(line)
    rows.append(Text("  ".join(f"{a}={s}" for s, (a, _) in STATE_STYLE.items()), style="dim"))
    irq = [c for c in cpus if _irqs(c) != "-"]
    extra = [Text("interrupts: " + "; ".join(f"CPU{c['cpu']} {_irqs(c)}" for c in irq[:16])
                  + (" ..." if len(irq) > 16 else ""))] if irq else []
    return Group(*rows, _by_state(cpus), *extra)


def _by_state(cpus: list[dict]) -> Text:
    """The CPUs of each state as a cpulist. A CPU parked in an older kernel's memory is not one in
    the running kernel's: when the CPUs run in more than one generation, each state's list is split."""
    split = len({c["generation"] for c in cpus}) > 1
    by_state: dict[str, list[int]] = {}
    for c in cpus:
        key = f"{c['state']} (gen {c['generation']})" if split else c["state"]
        by_state.setdefault(key, []).append(c["cpu"])
    return Text("\n".join(f"{s:<14} CPU {format_list(v, grouped=True)}" for s, v in sorted(by_state.items())))


def _interrupt_lists(cpus: list[dict]) -> list[Text]:
    """Per interrupt kind, the CPUs that took one, have one pending, hold one: every CPU, none left out."""
    out = []
    for kind in _IRQ_KINDS:
        said = [f"{what} {'by' if what == 'taken' else 'on'} CPU {format_list(v, grouped=True)}"
                for what in ("taken", "pending", "held")
                if (v := [c["cpu"] for c in cpus if _irq_counts(c)[kind][what]])]
        if said:
            out.append(Text(f"{kind.upper():<14} " + "; ".join(said)))
    return out


def status_view(snapshot: dict, columns: int = 80, full: bool = False) -> Group:
    """The whole status screen; ``columns`` is the terminal width (grid cells are 8 wide).
    ``full``: a table of the snapshot's CPUs whatever their number (`smpd status --cpus`)."""
    cpus = snapshot["cpus"]
    if full or len(cpus) <= TABLE_MAX_CPUS:
        body = cpu_table(cpus, columns)
    else:
        width = max(4, min(32, columns // 8))
        body = Group(cpu_grid(cpus, width - width % 4),
                     Text("(smpd status --cpus LIST shows those CPUs in full)", style="dim"))
    return Group(machine_line(snapshot["machine"]), Text(""), body)


def up_summary(s: dict) -> Text:
    t = Text()
    t.append(f"machine '{s['name']}' is up: ", style="bold")
    t.append(f"{s['cpus']} CPUs up in {s['bringup_ms']:.0f} ms "
             f"(CPU 0 = coordinator pid {s['pid']}"
             + (f", CPUs 1-{s['cpus'] - 1} = processes)\n" if s["cpus"] > 1 else ")\n"))
    t.append(f"  watch    {s['watch_reason']}"
             + (f"; spin budget {s['spin_budget_us']} us before sleeping" if s["watch"] == "adaptive" else "") + "\n")
    t.append(f"  hot path {s['hot_path_reason']}\n")
    if s["spin_yields"]:
        t.append(f"           {s['cpus']} spinning processes on fewer host cores: the spin loops and "
                 "the kick's udelay yield their core between polls\n")
    t.append(f"  pin      {s['pin']}\n")
    t.append(f"  kernel   generation 1: {s['kernel']}; {s['online']} CPUs online\n")
    t.append(f"  segment  {s['segment']} ({s['segment_bytes'] / 2**20:.1f} MiB, mode 0600)\n")
    t.append(f"  seed     {s['seed']}")
    return t


OUTCOME_STYLE = {"CLEAN": "bold green", "TRIPLE_FAULT": "bold red", "CORRUPTION": "bold red",
                 "MCE_SHUTDOWN": "bold yellow", "SMM_HANG": "bold yellow", "MACHINE_RESET": "bold red", "STUCK": "bold magenta",
                 "CPU_LOST": "bold white on red"}


def _ns(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.1f} us" if v < 1e6 else f"{v / 1e6:.2f} ms"


def kick_summary(kick: dict | None) -> Text:
    t = Text()
    if not kick:
        return t
    per = kick["cpus"]
    acked = [c for c in per.values() if c["acknowledged"]]
    t.append(f"smp_kick_mwait_play_dead(): {len(per)} CPUs kicked, {len(acked)} acknowledged, "
             f"{len(kick['stuck'])} stuck, {_ns(kick['total_ns'])} in all (budget per CPU: "
             f"{kick['rounds']} rounds of udelay({_ns(kick['delay_ns'])}), {_ns(kick['budget_ns'])})\n")
    rtt = sorted(c["rtt_ns"] for c in acked if "rtt_ns" in c)  # (none for a CPU that answered before any write)
    if rtt:
        one = sorted(c["one_way_ns"] for c in acked if "one_way_ns" in c)
        rounds = sorted(c["rounds"] for c in acked)
        woke = [c["wake_ns"] for c in acked if "wake_ns" in c]
        t.append(f"  round trip (write -> ack seen): p50 {_ns(rtt[len(rtt) // 2])}, max {_ns(rtt[-1])}; "
                 f"one way (write -> CPU answered): p50 {_ns(one[len(one) // 2] if one else None)}; "
                 f"rounds (control writes, each then udelay({_ns(kick['delay_ns'])})): p50 {rounds[len(rounds) // 2]}, "
                 f"max {rounds[-1]}\n")
        if woke:  # CPUs their doorbell woke: the write -> running again, mostly the host's wake-up
            t.append(f"  CPUs woken by their doorbell: {len(woke)}, running again {_ns(sorted(woke)[len(woke) // 2])} "
                     f"after the write (p50); summed, {_ns(sum(woke))} of the whole kick (one CPU at a time: "
                     f"they do not overlap)\n")
    late = kick.get("late") or []
    if late:
        worst = max(per[str(c)]["rtt_ns"] for c in late)
        t.append(f"  CPU {format_list(late)} acknowledged within {kick['rounds']} rounds but past "
                 f"{_ns(kick['budget_ns'])} of wall time (up to {_ns(worst)}): their rounds ran longer than "
                 f"udelay({_ns(kick['delay_ns'])}) while the host ran other processes; on hardware, whose rounds "
                 f"last {_ns(kick['delay_ns'])} each, an answer this late would be reported stuck\n", style="yellow")
    if kick["message"]:
        t.append(f"  {kick['message']}\n", style="bold magenta")
    return t


def cpu_outcomes(cpus: list[dict]) -> Text:
    """CPUs grouped by (final state, fault)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for c in cpus:
        groups.setdefault((c["state"], c["fault"]), []).append(c["cpu"])
    t = Text()
    for (state, fault), members in sorted(groups.items()):
        t.append(f"  {state:<14} {'' if fault == 'NONE' else fault:<13} CPU {format_list(members)}\n")
    return t


# A CPU's events that every CPU of a phase has alike: shown plainly, where the others
# (faults, stray stores, interrupts, SMM, spurious wake-ups, lost ring entries) are bold.
# In the summary, the same event of many CPUs between two coordinator events folds into
# one line; a wake-up's text names each CPU's own line, so its folded line says it so.
ROUTINE = {"WAKE_WRITE", "KICK_SEEN", "HLT", "INIT", "SIPI", "REBOOT", "OFFLINE", "NMI_STOP"}
FOLDED = {"WAKE_WRITE": "MWAIT woken by a write to its monitored line"}


def _event_line(t: Text, us: float, who: str, what: str, style: str = "") -> None:
    t.append(f"  {us:>10.1f} us  {who:<6} {what}\n", style=style)


def timeline(events: list[dict], form: str | list[int] = "summary", phases: list[dict] | None = None) -> Text:
    """The timeline: every event (``all``), those of some CPUs (a list), or the summary, where
    what many CPUs do alike between two coordinator events folds into one line (routine events
    plainly, unusual ones in bold). The kernel's phases open with a line of their own."""
    t = Text()
    marks = [(p["t_rel_us"], p) for p in (phases or []) if p.get("track", "kernel") == "kernel"]
    if form == "all" or isinstance(form, list):
        wanted = None if form == "all" else set(form) | {0}
        items: list[tuple[float, object]] = [(e["t_rel_us"], e) for e in events
                                             if wanted is None or e["cpu"] in wanted]
    else:
        items = _summary_items(events)
    for us, item in sorted(marks + items, key=lambda x: (x[0], not isinstance(x[1], dict) or "name" not in x[1])):
        if isinstance(item, dict) and "name" in item:  # a phase
            t.append(f"  {us:>10.1f} us  ── {item['name']} ({_ns(item['dur_us'] * 1000)})\n", style="dim bold")
        elif isinstance(item, dict):
            _event(t, us, [item])
        else:
            _event(t, us, item)
    return t


# A write that woke a monitor (smpd.kernel.relocate): what wrote, whose line, which line.
_WAKING = re.compile(r"(?P<what>.*) writes CPU(?P<cpu>\d+)'s monitored line \((?P<line>.*)\)")


def _summary_items(events: list[dict]) -> list[tuple[float, object]]:
    """The summary's lines: each coordinator event, one page's waking writes in a row as one, and what
    many CPUs do alike between two coordinator events as one (lists of the events folded)."""
    folds: dict[tuple[str, str], list[dict]] = {}  # (kind, text) -> its events since the last coordinator event
    items = []
    for e in events:
        kind = e.get("kind", "")
        if e["cpu"] == 0:
            waking = _WAKING.match(e["event"]) if kind == "waking_write" else None
            last = items[-1][1] if items else None
            if waking and isinstance(last, list) and last[0]["cpu"] == 0 and \
                    _WAKING.match(last[0]["event"])["what"] == waking["what"]:
                last.append(e)  # the copy's or a boot's writes to monitored lines, one page's in a row: one line
                continue
            folds.clear()  # a new step of the coordinator: its CPUs' lines fold anew
            items.append((e["t_rel_us"], [e] if waking else e))
            continue
        key = (kind, FOLDED.get(kind, e["event"]))
        if key not in folds:
            folds[key] = []
            items.append((e["t_rel_us"], folds[key]))
        folds[key].append(e)
    return items


def _event(t: Text, us: float, group: list[dict]) -> None:
    e = group[0]
    kind = e.get("kind", "")
    style = "bold red" if kind == "machine_end" else "" if e["cpu"] == 0 or kind in ROUTINE else "bold"
    if len(group) == 1:
        _event_line(t, us, "coord" if e["cpu"] == 0 else f"CPU{e['cpu']}", e["event"], style)
        return
    if e["cpu"] == 0:  # waking writes of one page
        hits = [_WAKING.match(g["event"]) for g in group]
        lines = {re.sub(r"\[\d+\]", "[N]", h["line"]) for h in hits}
        until = f", until {group[-1]['t_rel_us']:.1f} us" if group[-1]["t_rel_us"] != us else ""
        _event_line(t, us, "coord", f"{hits[0]['what']} writes the monitored lines of CPU "
                                    f"{format_list(sorted(int(h['cpu']) for h in hits), grouped=True)} "
                                    f"({lines.pop() + ' of each; ' if len(lines) == 1 else ''}{len(group)} writes"
                                    f"{until})", style)
        return
    what = FOLDED.get(kind, e["event"])
    _event_line(t, us, "CPUs", f"{format_list(sorted({g['cpu'] for g in group}))}: {what} ({len(group)} events, "
                               f"until {group[-1]['t_rel_us']:.1f} us)", style)


def _outcome_head(r: dict, *lines: str) -> Text:
    """The outcome and its evidence, then ``lines`` (dim), the notes and the host faults."""
    head = Text()
    head.append(f"{r['outcome']}", style=OUTCOME_STYLE.get(r["outcome"], "bold"))
    head.append(f"  {r['evidence']}\n")
    for line in lines:
        head.append(line + "\n", style="dim")
    for n in r["notes"]:
        head.append(f"note: {n}\n", style="yellow")
    for n in r.get("host_faults", []):
        head.append(f"host fault: {n}\n", style="yellow")
    return head


def _timeline_part(r: dict, form: str | list[int]) -> list:
    return [Text("timeline:" + (" the summary (--timeline all shows every event)" if form == "summary" else "")),
            timeline(r["timeline"], form, r.get("phases"))]


def kexec_report(r: dict, form: str | list[int] = "summary") -> Group:
    inj = ", ".join(i["spec"] for i in r["injections"]) or "none"
    old, new = r["memory"]["old"], r["memory"]["new"]
    head = _outcome_head(
        r, f"{'kexec --crash' if r.get('crash') else 'kexec'} --kernel {r['kernel']} --into {r['into']} "
           f"--order {r['order']} --seed {r['seed']}; injections: {inj}; generation {r['generation']['old']} "
           f"({old['kernel']}) -> {r['generation']['new']} ({new['kernel']}); {r['duration_ms']:.1f} ms",
        f"memory: {_regions(old)} -> {_regions(new)}")
    parts = [head, kick_summary(r.get("kick")), Text("CPUs after the kexec:"), cpu_outcomes(r["cpus"])]
    if r.get("corrupted_words"):
        parts.append(Text(f"corrupted words in the new kernel: {r['corrupted_words']}; first: "
                          + ", ".join(f"{b['symbol']} = {b['value']:#010x}" for b in r["corruption"][:4])))
    return Group(*parts, *_timeline_part(r, form))


def panic_report(r: dict, form: str | list[int] = "summary") -> Group:
    head = _outcome_head(
        r, f"panic --cpu {r['panic_cpu']}: generation {r['generation']} ({r['kernel']}), no crash kernel; "
           f"[kernel] init_only_from_boot_cpu = {str(r['boot_cpu_check']).lower()}; {r['duration_ms']:.1f} ms")
    return Group(head, Text("CPUs after the panic:"), cpu_outcomes(r["cpus"]), *_timeline_part(r, form))


def kick_report(r: dict, form: str | list[int] = "summary") -> Group:
    """`smpd kick`: the kick, each CPU's outcome, the timeline."""
    return Group(kick_summary(r["kick"]), Text("CPUs:"), cpu_outcomes(r["cpus"]), Text("timeline:"),
                 timeline(r["timeline"], form, r.get("phases")))


def injection_report(r: dict, ended: str | None = None) -> Group:
    """`smpd inject`: each target's outcome, why a CPU did not take it, the timeline, and
    ``ended``: how the machine ended, when the interrupt ended it."""
    return Group(Text(f"{r['injection']}:"), cpu_outcomes(r["cpus"]),
                 *(Text(f"note: CPU{c}: {why}", style="yellow") for c, why in r["not_taken"].items()),
                 timeline(r["timeline"], "all"), *([Text(ended, style="bold red")] if ended else []))


def _regions(m: dict) -> str:
    r = m["regions"]
    return (f"gen {m['generation']} image@{r['text']['addr']} tasks@{r['tasks']['addr']} "
            f"percpu@{r['percpu']['addr']}")


def chain_report(r: dict) -> Group:
    """The links at a glance, then each link's evidence at the console's full width (a column of
    its own was a few words wide at 80 columns)."""
    t = Table(title=f"chain of {r['kexecs']} kexecs (seed {r['seed']})", title_justify="left", header_style="bold")
    for col in ("link", "generations", "kernel", "outcome"):
        t.add_column(col, no_wrap=True)
    evidence = Text()
    for n, link in enumerate(r["links"], 1):
        g = link["generation"]
        outcome = Text(link["outcome"], style=OUTCOME_STYLE.get(link["outcome"], ""))
        t.add_row(str(n), f"{g['old']} -> {g['new']}", f"{link['kernel']} -> {link['into']}", outcome)
        evidence.append(f"link {n}, ").append(outcome).append(f": {link['evidence']}\n")
    done = len(r["links"])
    tail = Text()
    if r["first_failing_link"] is None:
        tail.append(f"every link CLEAN: the machine runs generation {r['links'][-1]['generation']['new']}\n",
                    style="bold green")
    else:
        unrun = f"s {done + 1}-{r['kexecs']}" if done + 1 < r["kexecs"] else f" {r['kexecs']}"
        tail.append(f"link {r['first_failing_link']} of {r['kexecs']} failed"
                    + (f"; link{unrun} did not run (nothing left to kexec from)" if done < r["kexecs"] else "")
                    + "; `smpd reset` power-cycles the machine\n", style="bold red")
    return Group(t, evidence, tail)


def _kernel_column(t: Table, kernels: list[str]) -> None:
    """The demo tables' first column, the row's kernel: never squeezed (on a narrow terminal, or 80
    columns when piped, rich would cut it to nothing first); an outcome wraps its mark instead."""
    t.add_column("kernel", no_wrap=True, min_width=max([len("kernel"), *map(len, kernels)]))


def demo_chains(chains: list[tuple[str, dict]]) -> Group:
    """One row per kernel, one column per link; then the evidence of each first failing link."""
    links = max((len(c["links"]) for _, c in chains), default=0)
    kexecs = max((c["kexecs"] for _, c in chains), default=links)
    t = Table(title="chains of kexecs, no reset between: one outcome per link", header_style="bold",
              title_justify="left")
    _kernel_column(t, [flavour for flavour, _ in chains])
    for n in range(1, kexecs + 1):
        t.add_column(f"link {n}", overflow="fold")
    notes = Text()
    for flavour, c in chains:
        cells = [Text(link["outcome"], style=OUTCOME_STYLE.get(link["outcome"], "")) for link in c["links"]]
        bad = c["first_failing_link"]
        if bad is not None:
            cells[bad - 1].append(f" [{flavour}]")
            notes.append(f"[{flavour}] link {bad}: {c['links'][bad - 1]['evidence']}\n")
        t.add_row(flavour, *cells, *(Text("-", style="dim") for _ in range(kexecs - len(cells))))
    return Group(t, notes)


def demo_matrix(rows: list[tuple[str, str, dict]]) -> Group:
    """Kernels down, injections across, the outcome in each cell with a mark; then one evidence
    line per mark (the table stays narrow; the evidence is as long as it needs to be)."""
    kernels = list(dict.fromkeys(k for k, _, _ in rows))
    kinds = list(dict.fromkeys(i for _, i, _ in rows))
    t = Table(title="the first kexec after power-on: kernel x injection after the copy", header_style="bold",
              title_justify="left")
    _kernel_column(t, kernels)
    for kind in kinds:
        t.add_column("no injection" if kind == "-" else kind, overflow="fold")
    cell = {(k, i): r for k, i, r in rows}
    notes = Text()
    for n_k, kernel in enumerate(kernels):
        cells = []
        for n_i, kind in enumerate(kinds):
            r = cell.get((kernel, kind))
            if r is None:
                cells.append(Text("-", style="dim"))
                continue
            mark = f"{n_k + 1}{'abcdefgh'[n_i]}"
            cells.append(Text(r["outcome"], style=OUTCOME_STYLE.get(r["outcome"], "")) + Text(f" [{mark}]", style="dim"))
            notes.append(f"[{mark}] {kernel}, {'no injection' if kind == '-' else kind}: ", style="bold")
            notes.append(f"{r['evidence']}\n")
        t.add_row(kernel, *cells)
    return Group(t, notes)


def _wake_floor_line(r: dict) -> Text:
    """`smpd bench kick` on an adaptive machine: the host's wake-up floor, and the round trip against it."""
    w = r.get("wake_floor")
    if not w:
        return Text("")
    if not w.get("available"):
        return Text(f"wake-up floor: unavailable ({w['why']})\n", style="yellow")
    ratio = r["ratio_wake_p50"]
    return Text(f"wake-up floor: the same round trip to a process asleep in sigwaitinfo(), woken by SIGURG (an "
                f"adaptive CPU's doorbell; cold, a reference rather than a bound): p50 {_ns(w['rtt_ns'])} (p99 "
                f"{_ns(w['rtt_p99_ns'])}, min {_ns(w['rtt_min_ns'])})"
                + (f"; round trip p50 / wake-up floor: {ratio:.2f}x" if ratio is not None else "") + "\n")


def _paired_line(p: dict) -> str:
    """`smpd bench kick`: the round trip against the floor measured beside each stretch of kicks."""
    if not p.get("ratio_paired_p50"):
        return ""
    ranges = {k: p[k.replace("_p50", "_range")] for k in ("ratio_paired_p50", "ratio_line1_paired_p50") if p.get(k)}
    return (f"beside the kicks: the floor measured again between stretches of {p['every_ms']} ms or more of them, each stretch's "
            f"round trip p50 over the lower floor on its two sides, median of {p['stretches']}: "
            + "; ".join(f"{'one line' if 'line1' in k else 'two lines'} {p[k]:.2f}x ({lo:.2f}-{hi:.2f})"
                        for k, (lo, hi) in ranges.items()) + "\n")


def _one_way_note(r: dict) -> str:
    missing = r["rtt_ns"].get("count", 0) - r["one_way_ns"].get("count", 0)
    return ("* one way (the write -> the CPU's answer, stamped as it answers"
            + (f"; {missing} of {r['rtt_ns']['count']} kicks have none: a stamp later than the coordinator's sight "
               "of the answer" if missing > 0 else "")
            + ") against half the floor (one cache-line transfer), round trip against the floor\n")


def _kick_latencies(r: dict) -> Table:
    """`smpd bench kick`'s latency table: one way, round trip, and for kicks of a CPU that slept,
    the round trip's two parts."""
    tab = Table(box=None, header_style="bold", pad_edge=False)
    keys = ("min", "p50", "p90", "p99", "p999", "max")
    for col in ("", "min", "p50", "p90", "p99", "p99.9", "max", "p50 / floor*"):
        tab.add_column(col, justify="right" if col else "left")
    for label, key in (("one way", "one_way_ns"), ("round trip", "rtt_ns")):
        s = r[key]
        if not s.get("count"):
            tab.add_row(label, *["-"] * 7)
            continue
        ratio = r["ratio_one_way_p50"] if key == "one_way_ns" else r["ratio_p50"]
        tab.add_row(label, *(_ns(s[k]) for k in keys), f"{ratio:.1f}x" if ratio else "-")
    if r.get("host_wake_ns", {}).get("count"):  # kicks of a CPU its doorbell woke: each part's own percentiles
        for label, key in (("to running**", "host_wake_ns"), ("then to ack**", "after_wake_ns")):
            # (a stop signal inside a batch's fold may have left the second part one sample short: none)
            s = r.get(key, {})
            tab.add_row(label, *((_ns(s[k]) for k in keys) if s.get("count") else ["-"] * len(keys)), "-")
    return tab


def _bench_kick_head(r: dict) -> str:
    return (f"kick benchmark: watch {r['watch']}, hot path {r['hot_path']}, CPU {r['targets']}, {r['rounds']} rounds, "
            f"{r['kicks']} kicks in {r['seconds']:.1f} s"
            + (f" (and {r['floors_beside_s']:.1f} s measuring the floor beside them)" if r.get("floors_beside_s") else "")
            + (" (interrupted)" if r.get("interrupted") else "") + "\n")


def _hw_floor_lines(r: dict) -> Text:
    """`smpd bench kick`: the cache-line floor before and after the kicks, on two lines and one, whether
    it moved or was cut short, and the floor beside the kicks."""
    u = Text()
    f = r["hw_floor"]
    if f.get("available"):
        after = r.get("hw_floor_after") or {}
        u.append(f"hardware floor: C cache-line ping-pong between cores {f['cores'][0]} and {f['cores'][1]}: "
                 f"p50 {f['rtt_ns']} ns (p99 {f['rtt_p99_ns']} ns, min {f['rtt_min_ns']} ns)"
                 + (f"; after the kicks p50 {after['rtt_ns']} ns" if after.get("available") else "") + "\n")
        cut = [(when, g) for when, g in (("before", f), ("after", after)) if g.get("budget_cut")]
        if cut:
            u.append("the floor was cut short by its time budget (a loaded host: two pinned threads wait for each "
                     "other to be scheduled): " + ", ".join(f"{when} the kicks {g['iterations']:,} of "
                                                          f"{g['requested']:,} round trips" for when, g in cut)
                     + "\n", style="yellow")
        if r.get("hw_line1_ns"):
            u.append(f"the same on the two words of one line (control and status: struct mwait_cpu_dead's layout, "
                     f"as a kick plays it): p50 {r['hw_line1_ns']} ns"
                     + (f"; the kick's round trip p50 is {r['ratio_line1_p50']:.2f}x that" if r.get("ratio_line1_p50")
                        else "") + "\n")
        if r.get("floor_moved"):
            u.append(f"the floor moved during the run ({f['rtt_ns']} -> {after['rtt_ns']} ns: the host placed "
                     f"these cores anew, as a VM's vCPUs are); ratios are to the lower, {r['hw_rtt_ns']} ns\n",
                     style="yellow")
        u.append(_paired_line(r.get("paired") or {}))
    else:
        u.append(f"hardware floor: unavailable ({f['why']})\n", style="yellow")
    return u


def bench_kick(r: dict, json_file: str | None, plot_file: str | None) -> Group:
    t = Text()
    t.append(_bench_kick_head(r), style="bold")
    t.append(_hw_floor_lines(r))
    t.append(_wake_floor_line(r))
    tab = _kick_latencies(r)
    slept = r.get("host_wake_ns", {})
    kr = r["kernel_rounds"]
    b = r["budget_exceeded"]
    tail = Text()
    tail.append(_one_way_note(r), style="dim")
    if slept.get("count"):
        tail.append(f"** the {slept['count']} of {r['rtt_ns'].get('count', 0)} kicks whose CPU its doorbell woke: "
                    "the write -> its process running again (mostly the host's: the doorbell's signal, the wake-up, "
                    "its scheduler; also the bus's rule and the kicker's udelay on the core it may need), then -> the "
                    "ack seen (the CPU's way to its answer, the core handed back, the kicker's look)\n", style="dim")
    if kr.get("count"):
        tail.append(f"kernel's view, rounds (control writes, each then udelay({r['delay_ns'] / 1e3:g} us); a round "
                    "lasts longer where the kicker yields its host core to the CPU it woke): "
                    f"p50 {kr['p50']}, p99 {kr['p99']}, max {kr['max']}\n")
    rounds = r["budget_ns"] // r["delay_ns"] if r.get("delay_ns") else None
    tail.append(f"over the kernel's {_ns(r['budget_ns'])} budget in wall time (or never acknowledged): "
                f"{b['count']} of {r['kicks']} kicks ({100 * b['share']:.3f}%)"
                + (f"; stuck, every one of the kernel's {rounds} rounds spent (what it would report): "
                   f"{b['stuck']}" if "stuck" in b and rounds else "") + "\n",
                style="bold red" if b["count"] else "")
    per = Table(box=None, header_style="bold", pad_edge=False, title="per CPU", title_justify="left")
    for col in ("CPU", "rtt p50", "p99", "p99.9", "max", "over budget", "invol. ctx switches"):
        per.add_column(col, justify="right")
    for cpu, d in list(r["per_cpu"].items())[:64]:
        s = d["rtt_ns"]
        if s.get("count"):
            per.add_row(cpu, _ns(s["p50"]), _ns(s["p99"]), _ns(s["p999"]), _ns(s["max"]),
                        str(d["budget_exceeded"]), str(d["involuntary_ctx_switches"]))
    files = Text("".join(f"wrote {p}\n" for p in (json_file, plot_file) if p), style="dim")
    return Group(t, tab, tail, per, files)
