"""Finding, starting and stopping machines from the outside (the CLI's side of §7 of the design).

A machine is *live* when its segment -- verified to be ours (smpd.trust) -- names a
coordinator that still runs (our uid, comm smpd-coord, same pid and create time: a
recycled pid is not our coordinator). Otherwise it is *stale*: the coordinator
died without cleaning up (and its janitor too, or the janitor has not run yet).
``smpd up`` and ``smpd down`` both recover a stale machine: they kill what is left
of it (checking each process's identity first) and unlink the segment.

Who owns a machine while ``smpd up`` waits for it: the ``up`` that started it. The
coordinator learns its spec from, and answers on, a socket pair whose other end
only that ``up`` holds; if that end closes before ``up`` has taken the answer
(Ctrl-C, SIGTERM, SIGHUP, SIGKILL, a crash), the coordinator stops and removes
everything. So an ``up`` that did not return leaves nothing behind.

Who drives a live machine's kernel: one command at a time (``machine_lock``): a soak, or a
kexec, chain, kick, panic, reset, hotplug, poke, injection or kick benchmark run by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import posix_ipc
import psutil

from smpd.daemon import channel
from smpd.daemon.janitor import COORDINATOR_COMM, clean_incomplete, clean_stale_segment, is_coordinator, wait_gone
from smpd.daemon.stopping import ACK
from smpd.errors import (BadInput, ChannelClosed, CoordinatorGone, Interrupted, MachineAlreadyUp, MachineComingUp,
                         MachineNotUp, NotOurs, SmpdError, Timeout)
from smpd.host import files, hostinfo, names, trust
from smpd.host.proc import stop_state
from smpd.machine import hotpath, layout as L
from smpd.machine.segment import FOREIGN_REMEDY, Segment, SegmentBeingCreated, unlink
from smpd.tools import early

GOING_S = 1.0  # how long a coordinator that closed its channel may take to be gone, once killed


@dataclass
class Live:
    """A running machine, as read from a segment that smpd.trust verified is ours."""

    name: str
    pid: int
    start: int  # clock ticks since boot (smpd.host.trust.start_ticks)
    authkey: bytes
    token: str
    ncpus: int
    held: Segment | None = field(default=None, repr=False, compare=False)

    def request(self, op: str, timeout_s: float | None = None, *, raw: bool = False,
                tick: Callable[[], None] | None = None, **args):
        try:
            return channel.request(names.socket_address(self.name, self.token), self.authkey, op, timeout_s,
                                   server_pid=self.pid, server_alive=lambda: is_coordinator(self.pid, self.start),
                                   raw=raw, tick=tick, **args)
        except Interrupted as err:
            if not err.note:  # the innermost request is the one in flight
                ends = "stops after the kexec in flight" if op == "chain" else "completes there"
                err.note = (f"machine '{self.name}' is up; if '{op}' had reached its coordinator, it {ends} "
                            f"(see `smpd status`)")
            raise
        except Timeout:
            how = {b"T": f"stopped (SIGSTOP, ^Z) and did not answer '{op}'; `kill -CONT {self.pid}` lets it go on",
                   b"t": f"stopped by its tracer (a debugger) and did not answer '{op}'; continue or detach it there"}
            said = how.get(stop_state(self.pid))
            if said and is_coordinator(self.pid, self.start):
                raise Timeout(f"the coordinator of machine '{self.name}' (pid {self.pid}) is {said}") from None
            raise
        except CoordinatorGone as err:
            # A killed process closes its sockets on its way out, a moment before it is gone: wait that out
            if wait_gone(self.pid, self.start, GOING_S if isinstance(err, ChannelClosed) else 0):
                raise CoordinatorGone(f"the coordinator of machine '{self.name}' (pid {self.pid}) "
                                      f"died; `smpd down --name {self.name}` cleans up what is left") from None
            if self.state() in (L.MachineState.CREATING, L.MachineState.BOOTING):
                # The segment is there before the channel: the CPUs are still coming online.
                raise MachineComingUp(f"machine '{self.name}' is still coming up; try again in a moment") from None
            raise

    def hold(self) -> None:
        """Keep this machine's segment mapped until this process exits, so that went_down()
        can still read its last state once the segment is unlinked (`smpd status --watch`)."""
        if self.held is None:
            self.held = Segment.attach(names.segment(self.name))

    def went_down(self) -> bool:
        """Whether the machine, held with hold(), was stopped (`smpd down`, SIGTERM: its last
        state is STOPPING) rather than lost (its coordinator killed: the state it had)."""
        if self.held is None:
            return False
        stopping = lambda: self.held.hdr("state") == L.MachineState.STOPPING  # noqa: E731
        deadline = time.monotonic() + 2.0  # a down in progress closes the channel first
        while not stopping() and is_coordinator(self.pid, self.start) and time.monotonic() < deadline:
            time.sleep(0.02)
        return stopping()

    def state(self) -> L.MachineState | None:
        """The machine state in the segment's header, or None when the segment is gone."""
        try:
            seg = Segment.attach(names.segment(self.name))
        except (posix_ipc.ExistentialError, SmpdError):
            return None
        try:
            return L.MachineState(seg.hdr("state"))
        finally:
            seg.close()


def probe(name: str, cleaned: list[str] | None = None, clean: bool = True) -> Live | None:
    """The live machine called ``name``; None when there is none. A stale one is cleaned first
    (and, given ``cleaned``, what was cleaned is said there), unless ``clean`` is False.

    Raises NotOurs for a name someone else holds and LayoutMismatch for a segment this
    smpd cannot read; both are left untouched.
    """
    try:
        seg = Segment.attach(names.segment(name))
    except posix_ipc.ExistentialError:
        return None
    except SegmentBeingCreated:
        if clean and clean_incomplete(names.segment(name)) == "removed":
            _say(cleaned, f"machine '{name}' was stale: its coordinator died before it wrote the segment's "
                          f"header; removed the segment")
            return None
        raise SegmentBeingCreated(f"machine '{name}' is being created right now; try again in a moment "
                                  f"(if this persists, `smpd down --force --name {name}` removes its segment)") from None
    try:
        if seg.hdr_str("name") != name:  # one of our segments, renamed: not this machine's
            raise NotOurs(f"segment {seg.name} holds machine '{seg.hdr_str('name')}', not '{name}': it was "
                          f"renamed; smpd will not act on it; remove it with `smpd down --force --name {name}`")
        pid, start = seg.hdr("coordinator_pid"), seg.hdr("coordinator_start")
        if is_coordinator(pid, start):
            return Live(name, pid, start, seg.hdr("authkey"), seg.hdr_str("channel"), seg.hdr("ncpus"))
    finally:
        seg.close()
    if not clean:
        return None
    killed = clean_stale_segment(names.segment(name), expect_pid=pid, expect_start=start)
    _say(cleaned, f"machine '{name}' was stale: its coordinator (pid {pid}) had died; removed its segment"
                  + (f" and {len(killed)} leftover CPU process{'es' if len(killed) > 1 else ''}" if killed else ""))
    return None


def _say(into: list[str] | None, what: str) -> None:
    if into is not None:
        into.append(what)


def require(name: str) -> Live:
    live = probe(name)
    if live is None:
        raise MachineNotUp(name, up_now())
    return live


def up_now() -> list[str]:
    """Names of this user's machines that are up, for "not up" messages; never raises. It only
    looks: a stale machine is left for a command that names it (or `smpd list`) to clean."""
    found = []
    for name in our_machines():
        try:
            if probe(name, clean=False) is not None:
                found.append(name)
        except SmpdError:
            pass
    return found


def our_machines() -> list[str]:
    """Machine names of this uid that have an entry in /dev/shm (not yet checked to be ours)."""
    try:
        entries = os.listdir(names.SHM_DIR)
    except OSError:
        return []
    return sorted(m for m in (names.machine_of_segment(e) for e in entries) if m)


def remove_own_entry(name: str) -> bool:
    """`down --force`: unlink a segment name smpd cannot read but that is provably ours. True if removed."""
    path = names.segment_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    refusal = trust.foreign(st, path, "an smpd segment", f"--force removes only your own; {FOREIGN_REMEDY}")
    if refusal is not None:
        raise refusal
    for p in coordinators_mapping(path):  # one that still runs on it, header or no header
        if trust.signal_ours(p.pid, signal.SIGTERM, start := trust.start_ticks(p.pid), name=COORDINATOR_COMM):
            wait_gone(p.pid, start, 30)
    return unlink(names.segment(name))


def coordinators_mapping(path: str) -> list:
    """Our coordinators that have ``path`` mapped (/proc/PID/maps): who runs on a segment whose
    header can no longer say it."""
    found = []
    for p in psutil.process_iter(["name", "uids"]):
        if p.info["name"] != COORDINATOR_COMM or not p.info["uids"] or p.info["uids"].effective != trust.me():
            continue
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                if any(line.rstrip("\n").endswith(path) or f" {path} (deleted)" in line for line in f):
                    found.append(p)
        except OSError:
            pass
    return found


def prepare(cfg) -> dict:
    """Everything `smpd up` decides before it creates anything; raises BadInput when the
    machine is already up or the host cannot hold it. Returns the coordinator's spec."""
    name = cfg.get("machine", "name")
    ncpus = cfg.get("machine", "cpus")
    live = probe(name)
    if live is not None:
        raise MachineAlreadyUp(name, live.pid)
    seed = cfg.get("machine", "seed")
    if seed == "random":
        seed = secrets.randbelow(2**63)
    geo = L.Geometry(ncpus, cfg.sizes().ram)
    cfg.boot()  # its boot parameters are checked against the CPU count here, before anything exists
    hostinfo.check_capacity(ncpus, geo.size, cfg.get("host", "cpu_process_mib"), cfg.get("host", "memory_share"))
    chosen, why = hostinfo.choose_watch(cfg.get("watch", "strategy"), ncpus, cfg.get("pin", "policy"))
    hot, hot_why = hotpath.choose(cfg.get("watch", "hot_path"))
    return {"config": cfg.raw, "watch": chosen, "watch_reason": why, "hot_path": hot, "hot_path_reason": hot_why,
            "seed": seed}


def start_daemon(spec: dict, meanwhile: Callable[[], object] = lambda: None,
                 tick: Callable[[], None] | None = None) -> dict:
    """Start the coordinator detached (or take the one `smpd up` started early: smpd.tools.early);
    return its summary once every CPU is online. ``meanwhile`` runs once the coordinator has the
    spec (our own work, done while the machine comes up); ``tick``, if given, every channel.TICK_S
    while we wait for its answer (smpd.tools.upprogress).

    If this process is interrupted while waiting, the daemon is told to stop and we
    wait for it to clean up before re-raising; if this process dies, the daemon sees
    its socket close and stops by itself (see the module's docstring).
    """
    cfg = spec["config"]
    ncpus = cfg["machine"]["cpus"]
    timeout_s = (cfg["timeouts"]["bringup_ms"] + cfg["timeouts"]["bringup_ms_per_cpu"] * ncpus) / 1000 + 30
    ours, proc = early.take() or _start_coordinator()
    try:
        return _bring_up(spec, ours, proc, meanwhile, timeout_s, tick)
    finally:
        early.handed()


def _bring_up(spec: dict, ours: socket.socket, proc: subprocess.Popen, meanwhile: Callable[[], object],
              timeout_s: float, tick: Callable[[], None] | None = None) -> dict:
    """start_daemon's exchange with coordinator ``proc``: the spec, its answer, our acknowledgement."""
    try:
        try:
            ours.sendall(json.dumps(spec).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):  # it exited before it read the spec
            line = ""
        else:
            meanwhile()
            line = _read_line(ours, proc, timeout_s, tick)
        if line:
            ours.sendall(ACK)
    except BaseException:
        ours.close()
        _stop_daemon(proc)
        raise
    ours.close()
    if not line:
        code = proc.wait(60)
        logged = os.environ.get("SMPD_COORDINATOR_LOG")
        how = f"was killed by signal {-code} ({signal.strsignal(-code)})" if code < 0 else f"exited (status {code})"
        raise SmpdError(f"the coordinator {how} before the machine came up"
                        + ("" if logged else "; set SMPD_COORDINATOR_LOG=FILE to see why"))
    reply = json.loads(line)
    if not reply["ok"]:
        proc.wait(60)
        err = (BadInput if reply.get("exit") == 2 else SmpdError)(reply["error"])
        err.exit_status = reply.get("exit", 1)
        raise err
    return reply["summary"]


def _start_coordinator() -> tuple[socket.socket, subprocess.Popen]:
    """The coordinator (early.spawn), and our end of its socket pair; its stderr to SMPD_COORDINATOR_LOG."""
    log = os.environ.get("SMPD_COORDINATOR_LOG")
    errf = files.open_output(log, "SMPD_COORDINATOR_LOG", append=True) if log else subprocess.DEVNULL
    try:
        return early.spawn(errf)
    except OSError as err:
        raise SmpdError(f"cannot start the coordinator ({err.strerror or err})") from None
    finally:
        if log:
            errf.close()


def _read_line(sock: socket.socket, proc: subprocess.Popen, timeout_s: float,
               tick: Callable[[], None] | None = None) -> str:
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"the machine did not come up within {timeout_s:.0f} s")
        sock.settimeout(min(left, 0.5 if tick is None else channel.TICK_S))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if proc.poll() is not None:
                break
            if tick is not None:
                tick()
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").split("\n")[0]


def _stop_daemon(proc: subprocess.Popen) -> None:
    """Our own child (not yet reaped, so its pid is still its): ask it to stop, then make sure."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait(10)


def down(name: str, force: bool = False, timeout_s: float = 30.0) -> str:
    """Stop machine ``name``; idempotent. Returns what was done, for the CLI to print.

    Another user's entry under our name is refused even with --force (NotOurs)."""
    cleaned: list[str] = []
    try:
        live = probe(name, cleaned)
    except SmpdError:  # not readable: another layout, stuck half-made, altered, or not ours at all
        if not force:
            raise
        remove_own_entry(name)  # refuses, with NotOurs, an entry that is not ours
        return f"machine '{name}': removed segment {names.segment(name)} of an unknown layout (--force)"
    if live is None:
        return cleaned[0] if cleaned else f"machine '{name}' is not up; nothing to do"
    if stop_state(live.pid) == b"T":  # stopped (SIGSTOP, ^Z): it goes on, to shut down as asked
        trust.signal_ours(live.pid, signal.SIGCONT, live.start, name=COORDINATOR_COMM)
    told = False
    try:
        try:
            live.request("down", timeout_s=timeout_s)
        except SmpdError:
            # Busy or wedged: it does not answer. SIGTERM asks for the same clean shutdown.
            trust.signal_ours(live.pid, signal.SIGTERM, live.start, name=COORDINATOR_COMM)
        told = True
        if not wait_gone(live.pid, live.start, timeout_s):
            trust.signal_ours(live.pid, signal.SIGKILL, live.start, name=COORDINATOR_COMM)
            wait_gone(live.pid, live.start, 5)
        # A coordinator killed mid-shutdown leaves its janitor to finish; do it now instead.
        probe(name)
    except Interrupted as err:  # once told (or its answer on its way: STOPPING), it finishes without us
        if told or live.state() in (L.MachineState.STOPPING, None):
            err.note = (f"machine '{name}' is going down: its coordinator was told, and it (or its janitor, should "
                        f"it die) removes the rest by itself; `smpd status --name {name}` says when it is gone")
        raise
    return f"machine '{name}' is down"


@contextlib.contextmanager
def machine_lock(name: str, doing: str = ""):
    """One soak per machine: trials of two runs would interleave their kexecs and resets; and no
    kexec, chain, kick, reset, hotplug, poke, injection or kick benchmark by hand while one runs
    (``doing`` names it), for the same reason: a trial's record would not say what it ran with.

    The lock is flock() on the machine's own segment, opened without following links
    and checked to be ours first: only a process that can open our 0600 segment can
    hold it (no other user can squat it, as they could a socket name), it belongs to
    this machine's lifetime (a new machine of the same name is a new file), and it
    is released the moment its holder is gone, however it ends.
    """
    path = names.segment_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        refusal = trust.refuse_entry(path, "an smpd segment", "pick another --name")
        raise refusal or MachineNotUp(name) from None
    try:
        trust.check_stat(os.fstat(fd), path, "an smpd segment", "pick another --name")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if doing:  # the holder is a soak, or one of these commands run by hand
                raise BadInput(f"machine '{name}' is busy (a soak, or another command that drives its kernel, "
                               f"runs on it): {doing} now would interleave with it; wait for it to end (Ctrl-C "
                               f"stops a soak after its current trial)") from None
            raise BadInput(f"another smpd soak is running on machine '{name}'") from None
        yield
    finally:
        os.close(fd)
