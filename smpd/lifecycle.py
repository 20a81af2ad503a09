"""Finding, starting and stopping machines from the outside (the CLI's side of §7 of the design).

A machine is *live* when its segment's header names a coordinator that still runs
(same pid, same create time: a recycled pid is not our coordinator). Otherwise
it is *stale*: the coordinator died without cleaning up (and its janitor too, or
the janitor has not run yet). ``smpd up`` and ``smpd down`` both recover a stale
machine: they kill what is left of it (checking each pid's identity first) and
unlink the segment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import posix_ipc
import psutil

from smpd import channel, hostinfo, hotpath, layout as L, names
from smpd.errors import BadInput, CoordinatorGone, MachineAlreadyUp, MachineNotUp, SmpdError, Timeout
from smpd.segment import Segment, SegmentBeingCreated, unlink


class MachineComingUp(BadInput):
    """The coordinator runs but does not serve its channel yet."""


@dataclass
class Live:
    name: str
    pid: int
    authkey: bytes
    ncpus: int

    def request(self, op: str, timeout_s: float | None = None, **args):
        try:
            return channel.request(names.socket_address(self.name), self.authkey, op, timeout_s, **args)
        except CoordinatorGone:
            if not _is_process(self.pid, None):
                raise CoordinatorGone(f"the coordinator of machine '{self.name}' (pid {self.pid}) "
                                      f"died; `smpd down --name {self.name}` cleans up what is left") from None
            if self.state() in (L.MachineState.CREATING, L.MachineState.BOOTING):
                # The segment is there before the channel: the CPUs are still coming online.
                raise MachineComingUp(f"machine '{self.name}' is still coming up; try again in a moment") from None
            raise

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


def _is_process(pid: int, ctime: float | None, tolerance: float = 0.05) -> bool:
    """True when ``pid`` runs and (if ``ctime`` is given) was created at ``ctime``."""
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return ctime is None or abs(p.create_time() - ctime) < tolerance
    except psutil.Error:
        return False


def probe(name: str) -> Live | None:
    """The live machine called ``name``; None when there is none. A stale one is cleaned first.

    Raises LayoutMismatch for a segment this smpd cannot read.
    """
    try:
        seg = Segment.attach(names.segment(name))
    except posix_ipc.ExistentialError:
        return None
    except SegmentBeingCreated:
        raise SegmentBeingCreated(f"machine '{name}' is being created right now; try again in a moment "
                                  f"(if this persists, `smpd down --force --name {name}` removes its segment)") from None
    try:
        pid, ctime = seg.hdr("coordinator_pid"), seg.hdr("coordinator_ctime")
        if _is_process(pid, ctime):
            return Live(name, pid, seg.hdr("authkey"), seg.hdr("ncpus"))
    finally:
        seg.close()
    clean_stale_segment(names.segment(name), expect_pid=pid, expect_ctime=ctime)
    return None


def require(name: str) -> Live:
    live = probe(name)
    if live is None:
        raise MachineNotUp(name)
    return live


def clean_stale_segment(seg_name: str, expect_pid: int, expect_ctime: float) -> list[int]:
    """Kill the leftovers of a dead coordinator and unlink its segment. Returns the pids killed.

    Only acts when the segment still names that coordinator (a new machine may
    have taken the name since) and that coordinator is not running.
    """
    try:
        seg = Segment.attach(seg_name)
    except (posix_ipc.ExistentialError, SmpdError):
        return []
    killed: list[int] = []
    try:
        if seg.hdr("coordinator_pid") != expect_pid or abs(seg.hdr("coordinator_ctime") - expect_ctime) > 0.05:
            return []
        if _is_process(expect_pid, expect_ctime):
            return []
        for cpu in range(1, seg.geo.ncpus):
            pid, ctime_ms = seg.cb(cpu, "pid"), seg.cb(cpu, "ctime_ms")
            if pid and _is_process(pid, ctime_ms / 1000 if ctime_ms else None, tolerance=0.05):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
    finally:
        seg.close()
    unlink(seg_name)
    return killed


def our_machines() -> list[str]:
    """Names of this user's machines that have a segment in /dev/shm."""
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(m for m in (names.machine_of_segment(e) for e in entries) if m)


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
    mem = cfg.raw["memory"]
    geo = L.Geometry(ncpus, mem["text_pages"], mem["page_table_pages"], mem["stack_pages_per_cpu"])
    hostinfo.check_capacity(ncpus, geo.size, cfg.get("host", "cpu_process_mib"), cfg.get("host", "memory_share"))
    chosen, why = hostinfo.choose_watch(cfg.get("watch", "strategy"), ncpus)
    hot, hot_why = hotpath.choose(cfg.get("watch", "hot_path"))
    return {"config": cfg.raw, "watch": chosen, "watch_reason": why, "hot_path": hot, "hot_path_reason": hot_why,
            "seed": seed}


def start_daemon(spec: dict) -> dict:
    """Start ``python -m smpd.coordinator`` detached; return its summary once every CPU is online.

    If this process is interrupted while waiting, the daemon is told to stop
    (SIGTERM) and we wait for it to clean up before re-raising.
    """
    cfg = spec["config"]
    ncpus = cfg["machine"]["cpus"]
    timeout_s = (cfg["timeouts"]["bringup_ms"] + cfg["timeouts"]["bringup_ms_per_cpu"] * ncpus) / 1000 + 30
    r, w = os.pipe()
    env = dict(os.environ)
    log = os.environ.get("SMPD_COORDINATOR_LOG")
    errf = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smpd.coordinator", json.dumps(spec), str(w)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
            pass_fds=(w,), start_new_session=True, env=env, close_fds=True,
        )
    finally:
        os.close(w)
        if log:
            errf.close()
    try:
        line = _read_line(r, proc, timeout_s)
    except BaseException:
        _stop_daemon(proc)
        raise
    finally:
        os.close(r)
    if not line:
        code = proc.poll()
        raise SmpdError(f"the coordinator exited (status {code}) before the machine came up"
                        + ("" if log else "; set SMPD_COORDINATOR_LOG=FILE to see why"))
    reply = json.loads(line)
    if not reply["ok"]:
        proc.wait(30)
        err = SmpdError(reply["error"])
        err.exit_status = reply.get("exit", 1)
        raise err
    return reply["summary"]


def _read_line(fd: int, proc: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    buf = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"the machine did not come up within {timeout_s:.0f} s")
            if not sel.select(min(left, 0.5)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode().split("\n")[0]


def _stop_daemon(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait(10)


def _signal_if_same(pid: int, sig: int) -> None:
    """Signal ``pid`` only if it is still one of our coordinators (pid reuse)."""
    try:
        p = psutil.Process(pid)
        if p.name() == "smpd-coord":
            p.send_signal(sig)
    except psutil.Error:
        pass


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _is_process(pid, None):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def down(name: str, force: bool = False, timeout_s: float = 30.0) -> str:
    """Stop machine ``name``; idempotent. Returns what was done, for the CLI to print."""
    seg_name = names.segment(name)
    try:
        live = probe(name)
    except SmpdError:  # another layout, or a segment stuck half-made
        if not force:
            raise
        unlink(seg_name)
        return f"machine '{name}': removed segment {seg_name} of an unknown layout (--force)"
    if live is None:
        return f"machine '{name}' is not up; nothing to do"
    try:
        live.request("down", timeout_s=timeout_s)
    except SmpdError:
        # Busy or wedged: it does not answer. SIGTERM asks for the same clean shutdown.
        _signal_if_same(live.pid, signal.SIGTERM)
    if not wait_gone(live.pid, timeout_s):
        _signal_if_same(live.pid, signal.SIGKILL)
        wait_gone(live.pid, 5)
    # A coordinator killed mid-shutdown leaves its janitor to finish; do it now instead.
    probe(name)
    return f"machine '{name}' is down"
