"""`smpd soak` and `smpd kexec --replay`: the driver around smpd.soak (which holds the rules).

Order of work, so that bad input loses nothing: every argument and the output
file are checked, and the resume file read, before the load starts or the first
trial runs. The host load dies with this process (PR_SET_PDEATHSIG) and is
stopped on every other exit path. Ctrl-C is taken as "stop after this trial".
"""

from __future__ import annotations

import dataclasses
import os
import resource
import secrets
import signal
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from smpd import cpulist
from smpd import config
from smpd.tools import cluster, hostload, lifecycle, soak
from smpd.host.proc import read_all, status_field
from smpd.host import files, trust
from smpd.tools.entry import stop_signals
from smpd.inputs import ascii_int, parse_duration
from smpd.kernel.scenario import flavour
from smpd.errors import BadInput, CoordinatorGone, Interrupted, SmpdError, Timeout


def main(name, trials, duration, host_load, parks, inject_rate, kinds, seed, out, resume, summary_file,
         given: set[str], console: Console, list_outcome: str | None = None, cluster_address: str | None = None,
         slots_per_node: int | None = None, cpus: int | None = None) -> None:
    if summary_file is not None or list_outcome is not None:
        if summary_file is None:
            raise BadInput("--list OUTCOME lists the trials of a finished file: give it with --summary FILE")
        if resume or given:
            raise BadInput("--summary reads a finished file; it takes no other option but --list")
        show_file(console, summary_file, list_outcome)
        return
    _check_run_options(trials, duration, resume, cluster_address, slots_per_node, cpus)
    duration_s = parse_duration(duration) if duration is not None else None
    load_spec = hostload.parse(host_load)
    resumed = None
    if resume is not None:
        resumed, plan, records = _resume(console, resume, given - {"cluster_address", "slots_per_node"},
                                         cluster_address)
        out = resume  # (held and locked from here to the end)
        load_spec = hostload.parse(plan.host_load) if host_load is None else load_spec
    else:
        plan = soak.Plan(seed=secrets.randbelow(2**63) if seed is None else seed,
                         parks=soak.parse_parks(parks), inject_rate=inject_rate, kinds=soak.parse_kinds(kinds),
                         cpus=cpus or config.load().get("machine", "cpus"),
                         trials=trials if trials or duration_s else 100, duration_s=duration_s,
                         host_load=load_spec.text(),
                         cluster=None if cluster_address is None else
                         {"address": cluster_address, "slots_per_node": slots_per_node or 1})
        records = []
        out = _new_out(f"soak-{plan.seed}.jsonl" if out is None else out)
    try:
        if plan.cluster is not None:
            cluster.main(name, plan, records, out, resumed, cluster_address or plan.cluster["address"],
                         slots_per_node or plan.cluster["slots_per_node"], load_spec.text(), console)
        else:
            _single_host(name, plan, records, out, load_spec, resumed, console)
    finally:
        if resumed is not None:
            resumed.close()


def _check_run_options(trials, duration, resume, cluster_address, slots_per_node, cpus) -> None:
    if trials is not None and duration is not None:
        raise BadInput("give --trials or --duration, not both")
    if cluster_address is None and resume is None and (slots_per_node is not None or cpus is not None):
        raise BadInput("--slots-per-node and --cpus size the machines of a --cluster run; give --cluster "
                       "ADDRESS|auto (a single-host soak runs on the machine --name names)")
    if cluster_address is not None:
        if cluster_address != "auto":
            cluster.parse_address(cluster_address)
        cluster.require_ray()  # without Ray: the install command, before anything is made


def _single_host(name, plan: soak.Plan, records: list[dict], out: str, load_spec, resumed, console) -> None:
    live = lifecycle.require(name)
    if resumed is not None and plan.cpus != live.ncpus:
        raise BadInput(f"{out} was recorded on a {plan.cpus}-CPU machine; machine '{name}' has "
                       f"{live.ncpus} CPUs")
    plan.cpus = live.ncpus
    run(live, plan, records, out, load_spec, resumed, console)


def show_file(console: Console, path: str, list_outcome: str | None) -> None:
    """`--summary FILE`: the summary of a finished (or interrupted) run; with `--list OUTCOME`,
    the trials that ended so."""
    if list_outcome is not None:
        list_outcome = list_outcome.upper()
        soak.check_outcome(list_outcome)  # checked before the file is read
    plan, records, note = soak.read(path)
    if note:
        console.print(Text(f"{path}: {note}", style="yellow"))
    if list_outcome is not None:
        print_trials(console, soak.trials_with(records, list_outcome), list_outcome, path)
    else:
        print_summary(console, plan, records, path)
        cluster.print_nodes(console, records)


def _resume(console: Console, path: str, given: set[str], cluster_address: str | None = None):
    """`--resume FILE`: the file opened and locked, its plan and its trials so far. A --cluster
    run resumes on a cluster (the one it ran on, or ``cluster_address``); a single-host run
    on the machine --name names."""
    conflicting = given - {"host_load"}
    if conflicting:
        flag = {"parks": "--park", "inject_rate": "--inject-rate"}
        raise BadInput(f"--resume continues the run recorded in {path}; drop "
                       + ", ".join(flag.get(c, f"--{c}") for c in sorted(conflicting)))
    resumed, plan, records, note = soak.open_resume(path)
    if cluster_address is not None and plan.cluster is None:
        resumed.close()
        raise BadInput(f"{path} records a single-host run; resume it without --cluster")
    if note:
        console.print(Text(f"{path}: {note}", style="yellow"))
    return resumed, plan, records


def _new_out(out: str) -> str:
    files.check_output(out, "--out")  # a link, a directory, a device... at the name: refused as such
    if os.path.lexists(out):  # a file smpd could write: another run's
        raise BadInput(f"--out {out} exists; continue it with --resume {out}, or name a new file")
    return out


def _numbers(trials: list[int], total: int) -> str:
    """'#2, #3, #4, ...': the trial numbers named, and '...' when there are more (``total``)."""
    return "#" + ", #".join(map(str, trials)) + (", ..." if total > len(trials) else "")


def _cell(n: int, trials: list[int]) -> str:
    if not n:
        return ""
    return f"{n} ({_numbers(trials, n)})" if trials else str(n)


def offline_set(status: dict) -> set[int]:
    return {c["cpu"] for c in status["cpus"][1:] if c["hotplug"] == "offline"}


class CtxCounter:
    """Involuntary context switches of the CPU processes, per trial.

    Counted per process from its first sighting, so a respawned CPU's new process starts from
    its own count and a dead one's count does not go backwards. A pid (from the coordinator's
    status, a word of the segment) is counted only while its /proc/PID/status names the
    coordinator ``parent`` as its parent, as every CPU process's does. Each file is opened
    once, at its first sighting, and read again (pread) at every trial: the descriptor names
    that process, not whatever has its pid later, and a read costs ~10 us where opening the
    file (or psutil's num_ctx_switches(), which does) costs ~35: 2.2 ms a trial for 63 CPU
    processes, on the soak's serial path between two trials. At most ``keep`` stay open (a
    quarter of RLIMIT_NOFILE's soft limit: the client's own sockets and files need the rest);
    beyond those, a file is opened for each read. ``close()`` closes them.
    """

    def __init__(self, pids: list[int], parent: int, keep: int | None = None):
        self.parent = parent
        self.last: dict[int, int] = {}
        self.fds: dict[int, int] = {}
        self.keep = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4) if keep is None else keep
        self._pids: list[int] = []
        self.pids = pids
        try:
            self.delta()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return self._pids

    @pids.setter
    def pids(self, pids: list[int]) -> None:
        for pid in set(self.fds) - set(pids):  # a process no longer a CPU's (respawned)
            os.close(self.fds.pop(pid))
            self.last.pop(pid, None)
        self._pids = list(pids)

    def delta(self) -> int:
        n = 0
        for pid in self._pids:
            now = self._involuntary(pid)
            if now is None:
                continue
            n += now - self.last.get(pid, now)
            self.last[pid] = now
        return n

    def _involuntary(self, pid: int) -> int | None:
        """Its count; None when it is gone, or not a child of the coordinator."""
        kept = self.fds.get(pid)
        try:
            fd = kept if kept is not None else os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # gone, or never there
            return None
        try:
            status = read_all(fd)
        except OSError:  # gone (a dead process's file reads ESRCH)
            status = b""
        ours = status_field(status, b"PPid") == self.parent  # (not: the coordinator gone, a pid not a CPU's)
        if kept is None:
            if ours and len(self.fds) < self.keep:
                self.fds[pid] = fd
            else:
                os.close(fd)
        return status_field(status, b"nonvoluntary_ctxt_switches") if ours else None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def idle_kick(live) -> dict:
    """The machine's kick latency before any load: the reference the summary compares with."""
    try:
        r = live.request("bench_kick", rounds=10)
    except SmpdError:
        return {}
    v = sorted(s[1] for samples in r["samples"].values() for s in samples if s[3])
    return {"p50": v[len(v) // 2], "p99": v[min(len(v) - 1, int(len(v) * 0.99))], "max": v[-1]} if v else {}


def run(live, plan: soak.Plan, records: list[dict], out: str, load_spec, resumed, console: Console) -> None:
    """Run the trials into ``out``: a new file, or ``resumed`` (soak.open_resume's, positioned at its end)."""
    with lifecycle.machine_lock(live.name):
        _run(live, plan, records, out, load_spec, resumed, console)


def _machine_status(live, plan: soak.Plan, out: str, resumed) -> dict:
    """The machine's status, reset first if a kexec ended it. Its nosmt siblings (kept offline by
    its kernel) are the plan's, or must be a resumed plan's: their trials ran with them parked."""
    status = live.request("status")
    if status["machine"]["state"] in ("KEXECED", "ENDED"):
        live.request("reset")
        status = live.request("status")
    siblings = status["machine"].get("nosmt_siblings", [])  # (a coordinator of an older smpd has none)
    if resumed is None:
        plan.nosmt_siblings = siblings
    elif siblings != plan.nosmt_siblings:
        said = {True: "booted with nosmt (SMT siblings CPU {} kept offline)", False: "booted without nosmt"}
        raise BadInput(f"{out} was recorded on a machine "
                       + said[bool(plan.nosmt_siblings)].format(cpulist.format_list(plan.nosmt_siblings))
                       + f"; machine '{live.name}' " + said[bool(siblings)].format(cpulist.format_list(siblings))
                       + ", so its trials would differ. Resume on a machine booted like the one it ran on")
    return status


def _prepare(live, plan: soak.Plan, out: str, resumed) -> dict:
    """Before the first trial: the machine's status (reset if a kexec ended it), the user's offline
    set and kernel, restored at the end; for a new run, the idle kick latency. Returns the status."""
    try:
        status = _machine_status(live, plan, out, resumed)
        if plan.users_offline is None:  # a new run (or a file of an older smpd): the set the user has now
            plan.users_offline = sorted(offline_set(status))
        if plan.users_kernel is None:  # each trial's reset boots the next trial's kernel: this one is restored
            plan.users_kernel = _running_kernel(status)
        if resumed is None:
            plan.idle_kick = idle_kick(live)
    except Interrupted as err:  # said as the soak's, not as the request in flight (bench_kick, reset...)
        err.note = (f"the soak stopped before its first {'' if resumed is None else 'new '}trial, nothing written to "
                    f"{out}; machine '{live.name}' is up "
                    f"(a reset or the idle kick measurement the soak had asked for ends there first)")
        raise
    return status


def _run(live, plan: soak.Plan, records: list[dict], out: str, load_spec, resumed, console: Console) -> None:
    status = _prepare(live, plan, out, resumed)
    offline = offline_set(status)
    users_offline = set(plan.users_offline)
    if resumed is None:
        plan.started = time.time()
        f = soak.open_new(out, plan)
    else:
        f = resumed
    pids = [c["pid"] for c in status["cpus"][1:]]
    first = records[-1]["trial"] + 1 if records else 0
    elapsed_before = sum(r["trial_ms"] for r in records) / 1e3
    stop = {"asked": False}
    # Ctrl-C, SIGTERM and SIGHUP all mean "stop after the current trial": the trial in flight
    # is finished, recorded and reset, so the machine is left clean and the file whole.
    old = {sig: signal.signal(sig, lambda *_: stop.update(asked=True)) for sig in stop_signals()}
    load = hostload.HostLoad(load_spec)
    counts: dict[str, int] = {}
    probes = _Probes(load, load_spec.text(), soak.HostSampler(), CtxCounter(pids, live.pid))
    error = None
    try:
        load.start()
        # Before the first trial moves them: a plain reset restores them if this process is killed (soakhold).
        live.request("soak_hold", offline=cpulist.format_list(sorted(users_offline)), kernel=plan.users_kernel,
                     pid=os.getpid(), started=trust.start_ticks(os.getpid()))
        t0 = time.monotonic()
        total = plan.trials if plan.trials else None
        with soak.progress_bar(console, "soak") as bar:
            task = bar.add_task("", total=total or plan.duration_s, completed=first if total else elapsed_before)
            trial = first
            while not stop["asked"] and more_trials(plan, trial, elapsed_before + time.monotonic() - t0):
                record, offline, error = _trial(live, plan, trial, offline, f, out, records, probes)
                if error is not None:
                    break
                records.append(record)
                counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
                trial += 1
                bar.update(task, completed=trial if total else elapsed_before + time.monotonic() - t0,
                           description="  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    finally:
        load.stop()
        probes.ctx.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        f.close()
    error = _leave_machine(live, error, users_offline, offline, plan.users_kernel)
    print_summary(console, plan, records, out)
    if stop["asked"]:
        console.print(Text(f"interrupted after trial {records[-1]['trial'] if records else '-'}; the machine is "
                           f"up, reset, with the offline CPUs it had before the soak. Continue with: smpd soak "
                           f"--resume {out}", style="yellow"), soft_wrap=True)
    if error is not None:
        raise error


def _running_kernel(status: dict) -> str:
    """The flavour of the kernel a machine runs (its status's kernel, boot parameters after it)."""
    return status["machine"]["kernel"].split()[0]


def _leave_machine(live, error: SmpdError | None, users_offline: set[int], offline: set[int],
                   users_kernel: str) -> SmpdError | None:
    """The machine as the user had it (offline CPUs ``users_offline``, generation 1 booted as
    ``users_kernel``), after the run's ``error`` if one ended it; returns the error to report."""
    if isinstance(error, CoordinatorGone):
        return error
    if isinstance(error, Timeout):  # the machine is between two kernels: only a reset restores it
        try:
            live.request("reset", offline=cpulist.format_list(sorted(users_offline)), kernel=users_kernel)
        except SmpdError as again:  # the hold stays: a plain reset restores them once we are gone
            return Timeout(f"{error}. Resetting the machine to your offline CPUs failed too ({again}); "
                           f"--resume resets it first")
    elif _running_kernel(live.request("status")) != users_kernel:  # the last reset booted the next trial's kernel
        live.request("reset", offline=cpulist.format_list(sorted(users_offline)), kernel=users_kernel)
    else:
        soak.set_offline(live, users_offline, offline)
    live.request("soak_hold")  # restored: the hold goes
    return error


@dataclasses.dataclass
class _Probes:
    """What each trial's record gets from the host: the load running, its samples, the CPU
    processes' involuntary context switches."""
    load: hostload.HostLoad
    load_text: str
    sampler: soak.HostSampler
    ctx: CtxCounter


def more_trials(plan: soak.Plan, trial: int, elapsed_s: float) -> bool:
    """Another trial: the run has neither reached --trials nor spent --duration."""
    if plan.trials and trial >= plan.trials:
        return False
    return plan.duration_s is None or elapsed_s < plan.duration_s


def _trial(live, plan: soak.Plan, trial: int, offline: set[int], f, out: str, records: list[dict],
           probes: _Probes) -> tuple[dict | None, set[int], SmpdError | None]:
    """Run trial ``trial`` and append its record to the file; an error ends the run (the
    coordinator gone, the file not writable), with what is safe said."""
    try:
        record, offline = soak.run_trial(live, soak.draw(plan, trial), offline, soak.draw(plan, trial + 1))
    except CoordinatorGone as err:
        return None, offline, CoordinatorGone(f"{err}; {len(records)} trials are safe in {out}")
    except Timeout as err:  # a CPU process stopped or starved: the trial's hotplug or reset was cut short
        return None, offline, Timeout(f"trial {trial}: {err}; the {len(records)} trials before it are safe in "
                                      f"{out}, and `smpd soak --resume {out}` runs it again")
    if record["respawned"]:
        probes.ctx.pids = [c["pid"] for c in live.request("status")["cpus"][1:]]
    record["host"] = probes.sampler.sample()
    record["host_load"] = probes.load_text
    record["ctx_invol"] = probes.ctx.delta()
    probes.load.check()
    try:
        soak.append_trial(f, record)
    except OSError as err:  # a full disk, a file size limit: stop, the file stays valid
        return None, offline, SmpdError(
            f"trial {trial} could not be written to {out} ({err.strerror}); the {len(records)} trials before "
            f"it are safe there and the machine is reset; make room, then continue with "
            f"`smpd soak --resume {out}`")
    return record, offline, None


def print_trials(console: Console, records: list[dict], outcome: str, path: str) -> None:
    """`--list OUTCOME`: one line per trial, and how to replay it. Every string from the file
    (and the path) is shown as text, never read as markup."""
    if not records:
        console.print(Text(f"no trial of {path} ended {outcome}"))
        return
    t = Table(title=Text(f"{len(records)} trials of {path} ended {outcome}"), title_justify="left",
              header_style="bold")
    for col in ("trial", "kernel", "injection", "offline", "evidence"):
        t.add_column(col, overflow="fold")
    for r in records:
        t.add_row(*(Text(v) for v in (str(r["trial"]), r["park"], soak.injection_label(r["inject"]),
                                      r["offline"] or "none", r["evidence"])))
    console.print(t)
    console.print(Text(f"replay one: smpd kexec --replay {path}:{records[0]['trial']}"), soft_wrap=True)


def print_summary(console: Console, plan: soak.Plan, records: list[dict], path: str) -> None:
    s = soak.summarize(plan, records)
    head = Text()
    head.append(f"soak {path}: {s['trials']} trials, {s['seconds']:.1f} s in trials"
                + (f" ({s['trials_per_s']:.1f} trials/s)" if s["trials_per_s"] else "")
                + (f", {s['wall_s']:.1f} s wall from the first trial's start to the last one's end"
                   if s["wall_s"] is not None else "") + "\n", style="bold")
    head.append(f"seed {plan.seed}, {plan.cpus} CPUs, kernels {','.join(plan.parks)}, inject rate {plan.inject_rate}, "
                f"kinds {','.join(plan.kinds)}, host load {s['host_load']}\n", style="dim")
    console.print(head)
    outcomes = sorted({o for inj in s["outcomes"].values() for cell in inj.values() for o in cell})
    t = Table(title="outcomes: kernel x injected kinds", title_justify="left", header_style="bold")
    t.add_column("kernel")
    t.add_column("injection")
    for o in outcomes:
        t.add_column(o, justify="right")
    for park, inj in sorted(s["outcomes"].items()):
        for label, cell in sorted(inj.items()):
            named = s["examples"][park][label]
            t.add_row(park, label, *(_cell(cell.get(o, 0), [] if o == "CLEAN" else named.get(o, [])) for o in outcomes))
    console.print(t)
    if any(o != "CLEAN" for o in outcomes):
        console.print(Text(f"#N: trial numbers (the first {soak.EXAMPLES}); all of them: smpd soak --summary {path} "
                           f"--list OUTCOME; one replayed: smpd kexec --replay {path}:N", style="dim"), soft_wrap=True)
    k, idle = s["kick_rtt_ns"], s["idle_kick_rtt_ns"]

    def us(v):
        return f"{v / 1e3:.1f} us" if v is not None else "-"

    lines = Text()
    if k:
        lines.append(f"kick round trip during the soak: p50 {us(k['p50'])}, p99 {us(k['p99'])}, max {us(k['max'])}"
                     + (f"; idle, same machine: p50 {us(idle.get('p50'))}, p99 {us(idle.get('p99'))}, "
                        f"max {us(idle.get('max'))}" if idle else "") + "\n")
    budget = f"{s['budget_ns'] / 1e6:g} ms" if s["budget_ns"] else "kernel's"
    lines.append(f"kicks over the {budget} budget (or stuck): {s['over_budget']} of {s['kicks']} "
                 f"({100 * s['over_budget_share']:.2f}%); stuck: {s['stuck']}\n")
    lines.append(f"emulator faults: CPU_LOST {s['cpu_lost']}, CPU processes respawned {s['respawns']}\n")
    hs = s["stuck_without_injection"]
    lines.append(f"host faults: STUCK without an injection {len(hs)}"
                 + (f" ({_numbers(hs[:soak.EXAMPLES], len(hs))}): a CPU process the host did not run within "
                    f"the kick's budget" if hs else "") + "\n")
    if s["host"]:
        h = s["host"]
        lines.append(f"host load achieved: CPU {h['cpu_percent']:.0f}%, load average {h['load1']:.1f}, "
                     f"steal {h['steal_percent']:.1f}%"
                     + (f"; involuntary context switches of the CPU processes: {s['ctx_switches_involuntary']}"
                        if s["ctx_switches_involuntary"] is not None else "") + "\n")
    console.print(lines)


def parse_replay_target(target: str) -> tuple[str, int]:
    """``FILE:TRIAL`` of --replay, as (file, trial)."""
    path, sep, n = target.rpartition(":")
    trial = ascii_int(n)
    if not sep or not path or trial is None or trial < 0:
        raise BadInput(f"--replay '{target}': expected FILE:TRIAL, e.g. soak.jsonl:1234")
    return path, trial


def replay(name: str, target: str, tick=None) -> dict:
    """Re-run trial N of a soak file on machine ``name``, exactly: same offline set, same scenario.
    ``tick``: called while its reset and kexec run (the CLI draws the APs online so)."""
    path, trial = parse_replay_target(target)
    plan, records, _ = soak.read(path)
    rec = next((r for r in records if r["trial"] == trial), None)
    if rec is None:
        have = f"{records[0]['trial']}-{records[-1]['trial']}" if records else "none"
        raise BadInput(f"--replay: {path} has no trial {trial} (recorded: {have})")
    live = lifecycle.require(name)
    if live.ncpus != plan.cpus:
        raise BadInput(f"--replay: {path} was recorded on a {plan.cpus}-CPU machine; '{name}' has {live.ncpus}")
    status = live.request("status")
    if status["machine"]["state"] in ("KEXECED", "ENDED") or _running_kernel(status) != flavour(rec["park"]):
        # as the soak ran it: generation 1 booted as the trial's kernel (soak.run_trial's reset)
        live.request("reset", offline=rec["offline"], kernel=rec["park"], tick=tick)
    else:
        soak.set_offline(live, set(cpulist.parse(rec["offline"])) if rec["offline"] else set(), offline_set(status))
    r = live.request("kexec", kernel=rec["park"], inject=rec["inject"], order=rec["order"], seed=rec["seed"],
                     tick=tick)
    same = r["outcome"] == rec["outcome"]
    r["replay"] = {"file": path, "trial": trial, "recorded_outcome": rec["outcome"], "same_outcome": same}
    r["notes"] = [f"replay of trial {trial} of {path}: recorded outcome {rec['outcome']}"
                  + ("; the replay ends the same" if same else
                     f"; THE REPLAY ENDS {r['outcome']} INSTEAD. The scenario (kernel, offline CPUs, copy "
                     f"order, injections, seed) is the same; what is not part of it is the host: a CPU "
                     f"process not scheduled within the kick's budget (STUCK), a stopped or killed one "
                     f"(CPU_LOST), an interrupt taken later than in the recorded run. Recorded evidence: "
                     f"{rec['evidence']}")] + r["notes"]
    return r
