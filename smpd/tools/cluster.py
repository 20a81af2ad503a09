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

Every slot's machine is seeded with the campaign's seed (its memory image, so what a CPU
that wakes in overwritten memory executes), so the campaign behaves as one machine of that
seed would; `smpd up --seed S` gives a single host the same one.

Placement: each actor asks Ray for ``num_cpus`` (SLOT_CORES) and the memory its
machine needs (the CPU processes' budget, [host] cpu_process_mib), so Ray never packs
more machines on a node than its cores and memory hold. ``--host-load`` runs once per
node, in that node's first slot.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import re
import secrets
import signal
import stat
import socket
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

import psutil

from smpd.errors import BadInput, MachineComingUp, SmpdError
from smpd.host import trust
from smpd.host.proc import die_with_parent
from smpd.tools import hostload, lifecycle, soak
from smpd.tools.entry import stop_signals

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
    address the last `ray start` on this host recorded (Ray's own file in the shared temporary
    directory, so read as any input is: the user's or root's, through no other user's link)."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    record = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray", "ray_current_cluster")
    # Ray keeps this file in a directory anyone may write (0777, not sticky): what it says is a
    # hint, read without following a link or blocking on a FIFO, and only a cluster on this
    # host whose GCS is ours (_check_local_owner) is then believed.
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise BadInput("--cluster auto: no Ray cluster is recorded on this host (no `ray start`, no RAY_ADDRESS); "
                       "start one with `ray start --head`, or give its address") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(f"--cluster auto: {record} is not a regular file; give the cluster's address")
        found = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    parse_address(found, f"--cluster auto: {record} says")
    if not _local(found):
        raise BadInput(f"--cluster auto: {record} names {found}, not a cluster on this host; give --cluster "
                       f"{found} yourself if it is yours")
    return found


def _local(address: str) -> bool:
    """Does ``address`` reach this host (loopback, the wildcard, an interface's address, or a
    name that resolves to one)?"""
    host, _ = parse_address(address)
    try:
        ips = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return any(ipaddress.ip_address(ip.split("%")[0]).is_loopback or ip in mine or ip in ("0.0.0.0", "::")
               for ip in ips)


def _check_local_owner(address: str) -> None:
    """A cluster on this host is believed only if its GCS (the process listening at ``address``'s
    port) is ours: a Ray cluster runs whatever its driver sends and returns what its workers say
    (unpickled by ray.get), so another user's would run code in this process. A cluster on
    another host is trusted as the user trusts that host."""
    host, port = parse_address(address)
    if not _local(address):
        return
    try:
        listeners = [c for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    except psutil.Error as err:
        raise BadInput(f"--cluster {address}: cannot tell whose cluster listens there ({err})") from None
    if not listeners:
        raise BadInput(f"--cluster {address}: nothing of this host listens on port {port}")
    for c in listeners:
        try:
            uid = psutil.Process(c.pid).uids().real if c.pid else None
        except psutil.Error:
            uid = None
        if uid is None or uid != trust.me():
            raise BadInput(f"--cluster {address}: the Ray cluster listening there is "
                           f"{'not visibly ours' if uid is None else 'run by ' + trust.describe_uid(uid)}; smpd "
                           f"runs its trials only on a cluster of its own user")


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ADDRESS_RE = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
ANSWER_S = 5.0  # a cluster's GCS accepts a connection within this, or there is none
# ... and answers Ray's own GcsClient within this (Ray's connect and reconnect timeouts, set for the
# probe only: left to itself, Ray retries a dead or foreign endpoint for many minutes).
GCS_ANSWER_S = 2
_GCS_PROBE = "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1]).cluster_id"


def parse_address(address: str, what: str = "--cluster") -> tuple[str, int]:
    """HOST:PORT -> (host, port); anything else is refused in one line."""
    m = ADDRESS_RE.fullmatch(address) if isinstance(address, str) else None
    port = int(m.group("port")) if m else 0
    if not m or not 1 <= port <= 65535:
        raise BadInput(f"{what} '{address}': expected HOST:PORT of a Ray cluster (e.g. 127.0.0.1:6379) or 'auto'")
    return m.group("host").strip("[]"), port


def _answers(address: str) -> None:
    """Something accepts connections at ``address`` within ANSWER_S (Ray itself would retry for
    minutes before it gives up on a dead address)."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=ANSWER_S).close()
    except OSError as err:
        raise BadInput(f"--cluster {address}: no Ray cluster answers there ({err.strerror or err}); start one "
                       f"with `ray start --head`, or give its address") from None


def _gcs_answers(address: str) -> None:
    """What accepts connections at ``address`` is a Ray cluster's GCS: Ray's own client, bounded
    (GCS_ANSWER_S), gets its cluster ID. Left to itself, ray.init() retries a foreign endpoint (a
    proxy that accepts any address, even speaking HTTP/2; another service) for many minutes: 20
    tries of ~40 s each (Ray 2.x). The probe runs in a process of its own: on an endpoint that
    does not answer, Ray ends the process rather than raise."""
    env = dict(os.environ, RAY_gcs_rpc_server_connect_timeout_s=str(GCS_ANSWER_S),
               RAY_gcs_rpc_server_reconnect_timeout_s=str(GCS_ANSWER_S))
    try:
        probe = subprocess.run([sys.executable, "-P", "-c", _GCS_PROBE, address], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10 * GCS_ANSWER_S,
                               preexec_fn=die_with_parent)
        ok = probe.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        raise BadInput(f"--cluster {address}: something accepts connections there, but no Ray cluster answers "
                       f"(its GCS did not give its cluster ID in time); give the address `ray start --head` "
                       f"printed")


def connect(address: str):
    """ray.init() on the cluster at ``address`` ("auto": the one this host knows)."""
    resolved = _bootstrap_address(address)
    require_ray()  # before the probe, which is Ray's own client
    _answers(resolved)
    _check_local_owner(resolved)  # before Ray's client talks to it
    _gcs_answers(resolved)
    if _loopback(resolved):
        # A cluster whose nodes bind to 127.0.0.1 (`ray start --node-ip-address 127.0.0.1`): Ray
        # replaces a loopback address by this host's outward IP, where nothing listens; with this
        # (read when ray is imported, so before) it keeps the driver on loopback too.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
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
        self.proc = subprocess.Popen(  # -P: not the working directory first on sys.path (anyone's, under Ray)
            [sys.executable, "-P", "-m", "smpd", "up", "--foreground", "--name", name, "--cpus", str(cpus),
             "--watch", "adaptive", "--seed", str(self.plan.seed)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err,
            preexec_fn=_die_with_actor)
        self.live = self._wait_up()
        status = self.live.request("status")
        self.offline = soakrun.offline_set(status)
        self.ctx = soakrun.CtxCounter([c["pid"] for c in status["cpus"][1:]], self.live.pid)
        try:
            self.sampler = soak.HostSampler()
            self.load = hostload.HostLoad(hostload.parse(host_load)) if host_load else None
            if self.load:
                self.load.start()
            self.load_text = host_load or "none"
            import ray
            self.node = ray.get_runtime_context().get_node_id()[:12]
        except BaseException:
            self.ctx.close()
            raise

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
        return soakrun.idle_kick(self.live)

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
        self.ctx.close()
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
        self._drop_unplaced()

    def _drop_unplaced(self) -> None:
        """A slot Ray cannot place (more slots than a node's cores or memory) or whose machine does
        not come up within UP_S is given up at the start, so that no trial waits on it."""
        refs = {self.slots[s]["actor"].where.remote(): s for s in self.slots}
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=UP_S)
        for ref, slot in refs.items():
            if ref not in ready:
                self.console.print(Text(f"slot {slot} ({self.slots[slot]['machine']}) did not start within "
                                        f"{UP_S:.0f} s (its node has no room for it?): the run goes on without it",
                                        style="yellow"), soft_wrap=True)
                self.ray.kill(self.slots.pop(slot)["actor"])
        if not self.slots:
            raise SmpdError("no slot started on any node; nothing was run")

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
        inflight: dict = {}  # ref -> (slot, trial)
        with soak.progress_bar(self.console, "soak --cluster") as bar:
            task = bar.add_task("", total=self.plan.trials, completed=writer.written)
            while True:
                busy = {slot for slot, _ in inflight.values()}
                for slot in [s for s in self.slots if s not in busy and not stop["asked"]]:
                    trial = numbers.take()
                    if trial is None:
                        break
                    inflight[self.slots[slot]["actor"].run.remote(trial)] = (slot, trial)
                if stop["asked"] and inflight and time.monotonic() > stop.setdefault("until", time.monotonic() + 60):
                    return None  # the trials in flight are given up: --resume runs them again
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
                bar.update(task, completed=writer.written, description=_rates(writer.per_node, numbers.t0))

    def _collect(self, ref, slot: int, trial: int, writer: "_Writer", numbers: _Numbers) -> SmpdError | None:
        try:
            writer.add(self.ray.get(ref))
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError, SmpdError) as err:
            numbers.give_back(trial)  # (SmpdError: its record did not check out; the slot is not trusted)
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
    old = {sig: signal.signal(sig, lambda *_: stop.update(asked=True)) for sig in stop_signals()}
    camp = f = None
    error = None
    try:
        camp = Campaign(ray, plan, f"{name[:16]}-{secrets.token_hex(3)}", slots_per_node,
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
        return soakrun.more_trials(self.plan, self.next, self.before_s + time.monotonic() - self.t0)

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
        self.per_node: dict[str, int] = {}  # trials written by this run, per node (the progress line)

    @property
    def written(self) -> int:
        return len(self.records)

    def add(self, record: dict) -> None:
        """A slot's record, checked field by field as a soak file's line is before it is written."""
        if not isinstance(record, dict):
            raise SmpdError(f"a slot returned {type(record).__name__}, not a trial record")
        soak.check_record(record, "a slot's trial record")
        self.early[record["trial"]] = record
        while self.next in self.early:
            r = self.early.pop(self.next)
            soak.append_trial(self.f, r)
            self.records.append(r)
            self.per_node[r["node"]] = self.per_node.get(r["node"], 0) + 1
            self.next += 1


def _why(err) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:200]


def _rates(per_node: dict[str, int], t0: float) -> str:
    dt = max(1e-3, time.monotonic() - t0)
    return (f"{sum(per_node.values()) / dt:.1f} trials/s; "
            + ", ".join(f"node {n[:6]} {c / dt:.1f}/s" for n, c in sorted(per_node.items())))


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
        timed = [r for r in rs if "t" in r]
        wall = max(r["t"] for r in timed) - min(r["t"] - r["trial_ms"] / 1e3 for r in timed) if timed else 0
        outcomes: dict[str, int] = {}
        for r in rs:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        t.add_row(Text(node), Text(",".join(map(str, sorted({r.get("slot", -1) for r in rs})))), str(len(rs)),
                  f"{len(rs) / wall:.1f}" if wall > 0 else "-",
                  Text(", ".join(f"{o} {n}" for o, n in sorted(outcomes.items()))))
    console.print(t)
