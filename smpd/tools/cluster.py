"""`smpd soak --cluster`: one campaign across the nodes of a Ray cluster.

Ray (an optional extra, ``pip install -e '.[cluster]'``) places one actor per slot,
``--slots-per-node`` on each node, pinned there. Each slot brings up its own machine
(``smpd up --foreground``, named after the run and the slot, so slots share a node
without colliding) in a child process that dies with the actor (PR_SET_PDEATHSIG:
SIGTERM, and the coordinator tears its machine down), runs the trials it is handed
and returns each record. The driver (this process) hands out trial numbers and
writes every record to one JSON-lines file exactly as the single-host soak does
(smpd.tools.soak: the same header and trial lines, plus the node and slot that ran
each), in trial order, fsynced: a record that arrives early waits for the ones before
it. Trial n's scenario depends on (seed, n) alone, so any trial replays on any host.

Faults: a slot whose actor, machine or node dies loses only the trial in flight; the
trial goes back in the queue and another slot runs it (a new actor replaces the slot
when its node is still alive). A SIGKILLed driver takes its actors with it (Ray's
owner fate-sharing), and with them their machines; the file holds every trial up to
the first one not yet written, and ``--resume`` runs the missing numbers only.

Placement: each actor asks Ray for ``num_cpus`` (SLOT_CORES) and the memory its
machine needs (the CPU processes' budget, [host] cpu_process_mib), so Ray never packs
more machines on a node than its cores and memory hold. ``--host-load`` runs once per
node, in that node's first slot.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from smpd.errors import BadInput, MachineComingUp, SmpdError
from smpd.tools import hostload, lifecycle, soak

SLOT_CORES = 1  # a slot's machine: its coordinator kicks and copies; its CPUs sleep in adaptive MWAIT
UP_S = 120.0  # a slot's machine comes up within this, or the slot is given up
MAX_REPLACEMENTS = 3  # new actors for one slot whose actors keep dying, while its node lives
INSTALL = "pip install -e '.[cluster]' (from a checkout) or pip install 'smpd[cluster]'"


def require_ray() -> None:
    """Ray is installed (checked without importing it: see connect())."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise BadInput(f"--cluster runs on Ray, which is not installed: {INSTALL}")


def _bootstrap_address(address: str) -> str:
    """The cluster's address as given, or for "auto" as Ray finds it: RAY_ADDRESS, else the
    address the last `ray start` on this host recorded (Ray's own file)."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        with open(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")) as f:
            return f.read().strip() or address
    except OSError:
        return address


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str):
    """ray.init() on the cluster at ``address`` ("auto": the one this host knows)."""
    resolved = _bootstrap_address(address)
    if _loopback(resolved):
        # A cluster whose nodes bind to 127.0.0.1 (`ray start --node-ip-address 127.0.0.1`): Ray
        # replaces a loopback address by this host's outward IP, where nothing listens; with this
        # (read when ray is imported, so before) it keeps the driver on loopback too.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    require_ray()
    import ray

    try:
        ray.init(address=resolved, logging_level="ERROR", log_to_driver=False, namespace="smpd")
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise BadInput(f"--cluster {address}: no Ray cluster answers there ({err}); start one with "
                       f"`ray start --head`, or give its address") from None
    return ray


class Slot:
    """One slot: its machine on this node, and the trials it runs. (Made a Ray actor by
    ``_actor``; plain Python otherwise.)"""

    def __init__(self, name: str, cpus: int, plan: dict, slot: int, host_load: str | None):
        from smpd.tools import soakrun

        self.name, self.slot = name, slot
        self.plan = soak.Plan(**plan)
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smpd", "up", "--foreground", "--name", name, "--cpus", str(cpus),
             "--watch", "adaptive"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err,
            preexec_fn=_die_with_actor)
        self.live = self._wait_up()
        status = self.live.request("status")
        self.offline = soakrun._offline_set(status)
        self.ctx = soakrun.CtxCounter([c["pid"] for c in status["cpus"][1:]])
        self.sampler = soak.HostSampler()
        self.load = hostload.HostLoad(hostload.parse(host_load)) if host_load else None
        if self.load:
            self.load.start()
        self.load_text = host_load or "none"
        import ray
        self.node = ray.get_runtime_context().get_node_id()[:12]

    def _wait_up(self):
        deadline = time.monotonic() + UP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.err.seek(0)
                raise SmpdError(f"slot {self.slot}: `smpd up` of '{self.name}' exited "
                                f"{self.proc.returncode}: {self.err.read().decode(errors='replace')[-500:]}")
            try:
                live = lifecycle.probe(self.name)
                if live is not None and live.request("status")["machine"]["state"] == "UP":
                    return live
            except MachineComingUp:
                pass
            time.sleep(0.1)
        raise SmpdError(f"slot {self.slot}: machine '{self.name}' did not come up within {UP_S:.0f} s")

    def where(self) -> dict:
        return {"node": self.node, "slot": self.slot, "machine": self.name, "pid": os.getpid(),
                "coordinator": self.live.pid}

    def idle_kick(self) -> dict:
        from smpd.tools import soakrun
        return soakrun._idle_kick(self.live)

    def run(self, trial: int) -> dict:
        record, self.offline = soak.run_trial(self.live, soak.draw(self.plan, trial), self.offline)
        if record["respawned"]:
            self.ctx.pids = [c["pid"] for c in self.live.request("status")["cpus"][1:]]
        record.update(host=self.sampler.sample(), host_load=self.load_text, ctx_invol=self.ctx.delta(),
                      node=self.node, slot=self.slot)
        if self.load:
            self.load.check()
        return record

    def stop(self) -> None:
        """The machine down (its coordinator's SIGTERM path), the load stopped."""
        if self.load:
            self.load.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_actor() -> None:
    from smpd.host.proc import die_with_parent
    die_with_parent(sig=signal.SIGTERM)


def _actor(ray, memory_bytes: int):
    return ray.remote(num_cpus=SLOT_CORES, memory=memory_bytes, max_restarts=0, max_concurrency=1)(Slot)


class Campaign:
    """The driver: slots over the cluster's nodes, the queue of trial numbers, the file."""

    def __init__(self, ray, plan: soak.Plan, run_name: str, slots_per_node: int, host_load: str | None,
                 memory_bytes: int, console: Console):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.plan, self.run_name = ray, plan, run_name
        self.host_load, self.console = host_load, console
        self.Actor = _actor(ray, memory_bytes)
        self.affinity = NodeAffinitySchedulingStrategy
        self.slots: dict[int, dict] = {}  # slot -> {"actor", "node", "replaced", "machine"}
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0]
        if not nodes:
            raise BadInput("--cluster: the cluster has no live node with CPUs to run a slot on")
        for i, node in enumerate(sorted(nodes)):
            for k in range(slots_per_node):
                self.slots[i * slots_per_node + k] = {"node": node, "replaced": 0, "first": k == 0}
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: int) -> None:
        s = self.slots[slot]
        s["machine"] = f"{self.run_name}-s{slot}" + (f"r{s['replaced']}" if s["replaced"] else "")
        s["actor"] = self.Actor.options(scheduling_strategy=self.affinity(s["node"], soft=False)).remote(
            s["machine"], self.plan.cpus, _plan_dict(self.plan), slot, self.host_load if s["first"] else None)

    def idle_kick(self) -> dict:
        """The first slot's idle kick latency (the header's reference), once its machine is up."""
        first = self.slots[min(self.slots)]["actor"]
        try:
            return self.ray.get(first.idle_kick.remote(), timeout=UP_S)
        except Exception:  # noqa: BLE001 - the slot's loss shows at its first trial
            return {}

    def _node_alive(self, node: str) -> bool:
        return any(n["NodeID"] == node and n["Alive"] for n in self.ray.nodes())

    def lost(self, slot: int, why: str) -> None:
        """A slot's actor died (or its machine): replace it while its node lives, else drop it."""
        s = self.slots[slot]
        try:
            self.ray.kill(s["actor"])
        except Exception:  # noqa: BLE001 - already gone
            pass
        if s["replaced"] < MAX_REPLACEMENTS and self._node_alive(s["node"]):
            s["replaced"] += 1
            self.console.print(Text(f"slot {slot} ({s['machine']}) lost: {why}; a new actor replaces it",
                                    style="yellow"), soft_wrap=True)
            self._start(slot)
        else:
            self.console.print(Text(f"slot {slot} ({s['machine']}) lost: {why}; its node is gone, so is the slot",
                                    style="yellow"), soft_wrap=True)
            del self.slots[slot]

    def run_trials(self, writer: "_Writer", numbers: _Numbers, stop: dict) -> SmpdError | None:
        """Keep every slot busy with one trial until the numbers run out (or ``stop``); each record
        goes to ``writer``; a lost slot's trial goes back to ``numbers``. Returns the error that
        ended the run early, if one did."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        inflight: dict = {}  # ref -> (slot, trial)
        with Progress(TextColumn("[bold]soak --cluster[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TextColumn("{task.description}"), console=self.console,
                      transient=True) as bar:
            task = bar.add_task("", total=self.plan.trials, completed=writer.written)
            while True:
                busy = {slot for slot, _ in inflight.values()}
                for slot in [s for s in self.slots if s not in busy and not stop["asked"]]:
                    trial = numbers.take()
                    if trial is None:
                        break
                    inflight[self.slots[slot]["actor"].run.remote(trial)] = (slot, trial)
                if not inflight:
                    if not self.slots and numbers.left():
                        return SmpdError(f"no slot is left to run on (every node or actor died); {writer.written} "
                                         f"trials are safe in {writer.out}: `smpd soak --resume {writer.out}`")
                    return None
                done, _ = self.ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    error = self._collect(ref, *inflight.pop(ref), writer, numbers)
                    if error is not None:
                        stop["asked"] = True
                        return error
                bar.update(task, completed=writer.written, description=_rates(writer.new, numbers.t0))

    def _collect(self, ref, slot: int, trial: int, writer: "_Writer", numbers: _Numbers) -> SmpdError | None:
        try:
            writer.add(self.ray.get(ref))
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as err:
            numbers.give_back(trial)
            if slot in self.slots:
                self.lost(slot, _why(err))
        except OSError as err:
            return SmpdError(f"trial {trial} could not be written to {writer.out} ({err.strerror}); the trials "
                             f"before it are safe there; `smpd soak --resume {writer.out}`")
        return None

    def stop(self) -> None:
        refs = []
        for s in self.slots.values():
            try:
                refs.append(s["actor"].stop.remote())
            except Exception:  # noqa: BLE001
                pass
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=60)
        for s in self.slots.values():
            try:
                self.ray.kill(s["actor"])
            except Exception:  # noqa: BLE001
                pass


def _plan_dict(plan: soak.Plan) -> dict:
    from dataclasses import asdict
    return asdict(plan)


def main(name: str, plan: soak.Plan, records: list[dict], out: str, resumed, address: str, slots_per_node: int,
         host_load: str, console: Console) -> None:
    """Run the campaign's missing trials into ``out``: a new file, or ``resumed`` (soak.open_resume's).
    Slot k's machine is named ``{name}-{run}-s{k}``: --name, this run, the slot."""
    from smpd.tools import soakrun

    ray = connect(address)
    from smpd.config import load as load_config
    mib = load_config().get("host", "cpu_process_mib")
    stop = {"asked": False}
    old = {sig: signal.signal(sig, lambda *_: stop.update(asked=True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    camp = f = None
    error = None
    try:
        camp = Campaign(ray, plan, f"{name[:16]}-{os.getpid() % 0x10000:04x}", slots_per_node,
                        None if host_load == "none" else host_load, (plan.cpus + 1) * mib << 20, console)
        if resumed is None:
            plan.idle_kick = camp.idle_kick()
            plan.started = time.time()
            f = soak.open_new(out, plan)
        else:
            f = resumed
        error = camp.run_trials(_Writer(f, out, records), _Numbers(plan, records, len(camp.slots)), stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if camp is not None:
            camp.stop()
        if f is not None:
            f.close()
        ray.shutdown()
    soakrun.print_summary(console, plan, records, out)
    print_nodes(console, records)
    if stop["asked"] and error is None:
        console.print(Text(f"interrupted: {len(records)} trials in {out}; continue with: smpd soak --resume {out}",
                           style="yellow"), soft_wrap=True)
    if error is not None:
        raise error


class _Numbers:
    """The trial numbers still to run: those a lost slot handed back first, then the next new
    one while the run has neither reached --trials nor spent --duration."""

    def __init__(self, plan: soak.Plan, records: list[dict], slots: int):
        self.plan = plan
        self.next = records[-1]["trial"] + 1 if records else 0
        self.back: list[int] = []
        self.t0 = time.monotonic()
        self.before_s = sum(r["trial_ms"] for r in records) / 1e3 / max(1, slots)  # a resumed run's time

    def _more(self) -> bool:
        from smpd.tools import soakrun
        return soakrun._more(self.plan, self.next, self.before_s + time.monotonic() - self.t0)

    def take(self) -> int | None:
        if self.back:
            return heapq.heappop(self.back)
        if not self._more():
            return None
        self.next += 1
        return self.next - 1

    def give_back(self, trial: int) -> None:
        heapq.heappush(self.back, trial)

    def left(self) -> bool:
        return bool(self.back) or self._more()


class _Writer:
    """Records into the file in trial order: one that arrives before the trials ahead of it
    waits here (and is lost, to be run again on --resume, if the driver dies first)."""

    def __init__(self, f, out: str, records: list[dict]):
        self.f, self.out, self.records = f, out, records
        self.next = records[-1]["trial"] + 1 if records else 0
        self.early: dict[int, dict] = {}
        self.new: list[dict] = []

    @property
    def written(self) -> int:
        return len(self.records)

    def add(self, record: dict) -> None:
        self.early[record["trial"]] = record
        while self.next in self.early:
            r = self.early.pop(self.next)
            soak.append_trial(self.f, r)
            self.records.append(r)
            self.new.append(r)
            self.next += 1


def _why(err) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:200]


def _rates(records: list[dict], t0: int) -> str:
    dt = max(1e-3, time.monotonic() - t0)
    per: dict[str, int] = {}
    for r in records:
        per[r.get("node", "?")] = per.get(r.get("node", "?"), 0) + 1
    return f"{len(records) / dt:.1f} trials/s; " + ", ".join(f"node {n[:6]} {c / dt:.1f}/s" for n, c in sorted(per.items()))


def print_nodes(console: Console, records: list[dict]) -> None:
    """Per node: trials, the slots that ran them, trials/s over the node's own wall time, outcomes."""
    nodes: dict[str, list[dict]] = {}
    for r in records:
        if "node" in r:
            nodes.setdefault(r["node"], []).append(r)
    if not nodes:
        return
    t = Table(title="per node", title_justify="left", header_style="bold")
    for col in ("node", "slots", "trials", "trials/s (its wall time)", "outcomes"):
        t.add_column(col, overflow="fold")
    for node, rs in sorted(nodes.items()):
        wall = max(r["t"] for r in rs) - min(r["t"] - r["trial_ms"] / 1e3 for r in rs)
        outcomes: dict[str, int] = {}
        for r in rs:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        t.add_row(node, ",".join(map(str, sorted({r["slot"] for r in rs}))), str(len(rs)),
                  f"{len(rs) / wall:.1f}" if wall > 0 else "-",
                  ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items())))
    console.print(t)
