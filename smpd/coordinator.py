"""The coordinator: CPU 0, the boot CPU and (later) the kexec CPU.

It owns the machine's every resource, each with one cleanup path:

* the segment (created O_EXCL; unlinked in ``shutdown``);
* the CPU processes 1..N-1 (forked with multiprocess, each dying with us through
  PR_SET_PDEATHSIG; powered off, then SIGKILLed if they do not leave, in ``shutdown``);
* the janitor, a tiny process that outlives us only to clean up after a SIGKILL:
  it blocks on a pipe whose write end only we hold, and on EOF removes the
  segment if it still names us;
* the control channel (an abstract socket; nothing to remove).

It serves one request at a time: a CLI command is short, and serialising them
means no two hotplug operations ever race on a mailbox.

Run as a daemon by ``smpd up`` (``python -m smpd.coordinator``), or in the
foreground with ``smpd up --foreground``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable

import multiprocess
import psutil

from smpd import channel, cpulist, hostinfo, layout as L, lifecycle, names
from smpd.bus import Bus
from smpd.config import Config
from smpd.cpu import IPI_DONE, cpu_main
from smpd.errors import BadInput, CpuLost, HostTooSmall, MachineAlreadyUp, SmpdError, Timeout
from smpd.kexec import Kexec
from smpd.inputs import ascii_int
from smpd.kick import kick_one
from smpd.lifecycle import ACK, clean_stale_segment, wait_gone
from smpd.memory import load_kernel
from smpd.proc import set_process_name
from smpd.scenario import Scenario, parse_injection
from smpd.segment import Segment, SegmentExists, unlink

_ctx = multiprocess.get_context("fork")
JANITOR_DONE = b"x"
RESET_ATTEMPTS = 3  # a reset respawns CPUs that died; it tries again if one dies during it  # written on a clean shutdown: the janitor leaves without touching anything


class Stop(Exception):
    """SIGTERM/SIGINT/SIGHUP reached the coordinator: shut down cleanly."""


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


_stop_raised = False


def _stop(signum, _frame):
    """Raise Stop once: a second signal must not interrupt the shutdown the first one began."""
    global _stop_raised
    if not _stop_raised:
        _stop_raised = True
        raise Stop(signal.Signals(signum).name)


def check_stop() -> None:
    """A checkpoint of bring-up, which runs with the stop signals blocked.

    An exception raised by a signal handler can land between any two bytecodes,
    e.g. between shm_open() returning and the name being recorded, and leak the
    segment. So boot() blocks SIGTERM/SIGINT/SIGHUP and looks for them only here,
    where every resource made so far is already owned by the Coordinator. Here too
    we notice that the `smpd up` waiting for us is gone (killed, even by SIGKILL):
    nobody will take the machine, so it is stopped like on SIGTERM.
    """
    global _stop_raised
    pending = signal.sigpending() & STOP_SIGNALS
    if pending and not _stop_raised:
        _stop_raised = True
        raise Stop(signal.Signals(min(pending)).name)
    if _up_client is not None and _up_client.gone():
        raise Stop("the exit of the `smpd up` that started it")


class UpClient:
    """The `smpd up` that started us, at the other end of a socket pair (smpd.lifecycle).

    It sends the spec (so no config crowds our command line in `ps`), waits for one
    line of answer and acknowledges it. Until it has, the machine is that `up`'s: if
    its end closes first, we stop and remove everything.
    """

    ACK_WAIT_S = 30.0  # a live `up` acknowledges at once; one stopped (Ctrl-Z) that long is gone

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)

    def read_spec(self, timeout_s: float = 30.0) -> dict:
        self.sock.settimeout(timeout_s)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise Stop("the exit of the `smpd up` that started it, before it sent the spec")
            buf += chunk
        return json.loads(buf)

    def gone(self) -> bool:
        """True when the other end has closed (it sends nothing more until our answer)."""
        self.sock.settimeout(0.0)  # a look, never a wait
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def answer(self, obj: dict) -> bool:
        """Send the answer; True once `up` has acknowledged it, False if it is gone."""
        try:
            self.sock.settimeout(self.ACK_WAIT_S)
            self.sock.sendall((json.dumps(obj) + "\n").encode())
            return self.sock.recv(len(ACK)) == ACK
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


_up_client: UpClient | None = None


class Coordinator:
    def __init__(self, cfg: Config, watch: str, watch_reason: str, seed: int, hot_path: str, hot_path_reason: str):
        self.cfg = cfg
        self.hot_path, self.hot_path_reason = hot_path, hot_path_reason
        self.name: str = cfg.get("machine", "name")
        self.ncpus: int = cfg.get("machine", "cpus")
        self.watch, self.watch_reason, self.seed = watch, watch_reason, seed
        self.pin: str = cfg.get("pin", "policy")
        self.signals = cfg.signals()
        self.ipi_timeout_s = cfg.get("timeouts", "ipi_ack_ms") / 1000
        # Resources start as "nothing open" so shutdown() works at any point.
        self.seg: Segment | None = None
        self.bus: Bus | None = None
        self.procs: dict[int, Any] = {}
        self.janitor = None
        self.janitor_w: int | None = None
        self.server: channel.Server | None = None
        self.up_client: UpClient | None = None  # the `smpd up` waiting for us (None: foreground)
        self.stopping = False
        self.reset_offline: list[int] | None = None  # the offline set `smpd reset` restores
        self.plan: list[int | None] = []  # host core of each CPU (pin policy)

    # -- bring-up --------------------------------------------------------------

    def boot(self) -> dict:
        """Create the segment, load the old kernel, fork and start every CPU. Returns a summary."""
        t0 = time.monotonic_ns()
        mem = self.cfg.raw["memory"]
        geo = L.Geometry(self.ncpus, mem["text_pages"], mem["page_table_pages"], mem["stack_pages_per_cpu"])
        hostinfo.raise_file_limit(self.ncpus)
        me = psutil.Process()
        try:
            self.seg = seg = Segment.create(names.segment(self.name), geo, os.getpid(), me.create_time())
        except SegmentExists:
            raise MachineAlreadyUp(self.name, None) from None
        for field, value in (
            ("state", L.MachineState.CREATING), ("generation", 1), ("seed", self.seed),
            ("watch", L.Watch.SPIN if self.watch == "spin" else L.Watch.ADAPTIVE),
            ("boot_ns", t0), ("boot_wall", time.time()),
            ("spin_budget_ns", self.cfg.get("watch", "spin_budget_us") * 1000),
            ("spurious_per_s", float(self.cfg.get("watch", "spurious_per_s"))),
            ("authkey", secrets.token_bytes(32)), ("channel", secrets.token_hex(16).encode()),
            ("coordinator_sid", os.getsid(0)), ("name", self.name.encode()),
            ("pin", self.pin.encode()), ("watch_reason", self.watch_reason.encode()[:200]),
            ("hot_path", L.HotPath.C if self.hot_path == "c" else L.HotPath.PYTHON),
            ("hot_path_reason", self.hot_path_reason.encode()[:200]),
            ("spin_yields", int(self.watch == "spin" and self.ncpus > len(hostinfo.allowed_cores()))),
        ):
            seg.set_hdr(field, value)
        check_stop()
        self.bus = Bus(seg)
        load_kernel(self.bus, geo, self.seed, generation=1)
        check_stop()
        self.plan = plan = hostinfo.pin_plan(self.pin, self.ncpus)
        if plan[0] is not None:
            os.sched_setaffinity(0, {plan[0]})
        for field, value in (("pid", os.getpid()), ("core", -1 if plan[0] is None else plan[0]),
                             ("hotplug", L.Hotplug.ONLINE), ("state", L.ExecState.RUNNING),
                             ("ctime_ms", int(me.create_time() * 1000))):
            seg.set_cb(0, field, value)
        self._start_janitor()
        seg.set_hdr("state", L.MachineState.BOOTING)
        gc.freeze()  # keep the collector from touching (and so copying) inherited pages
        for cpu in range(1, self.ncpus):
            check_stop()
            self._fork_cpu(cpu, plan[cpu])
        t_sipi = time.monotonic_ns()
        budget = (self.cfg.get("timeouts", "bringup_ms")
                  + self.cfg.get("timeouts", "bringup_ms_per_cpu") * self.ncpus) / 1000
        self._ipi_all(list(range(1, self.ncpus)), L.Ipi.SIPI, budget, "bring-up (SIPI)")
        bringup_ns = time.monotonic_ns() - t0
        seg.set_hdr("bringup_ns", bringup_ns)
        self.server = channel.Server(names.socket_address(self.name, seg.hdr_str("channel")), seg.hdr("authkey"))
        seg.set_hdr("state", L.MachineState.UP)
        return {
            "name": self.name, "pid": os.getpid(), "cpus": self.ncpus, "watch": self.watch,
            "watch_reason": self.watch_reason, "pin": self.pin, "seed": self.seed,
            "hot_path": self.hot_path, "hot_path_reason": self.hot_path_reason,
            "spin_yields": bool(seg.hdr("spin_yields")),
            "segment": seg.name, "segment_bytes": geo.size, "bringup_ms": bringup_ns / 1e6,
            "sipi_to_online_ms": (time.monotonic_ns() - t_sipi) / 1e6,
        }

    def _inherited_fds(self) -> list[int]:
        """Descriptors a forked child must close: each holds something only we may hold open."""
        fds = [fd for fd in (self.janitor_w,) if fd is not None]
        if self.up_client is not None:
            fds.append(self.up_client.sock.fileno())
        if self.server is not None:
            fds.append(self.server.fileno())
        return fds

    def _start_janitor(self) -> None:
        r, w = os.pipe()
        close = self._inherited_fds()
        self.janitor_w = w
        try:
            self.janitor = _ctx.Process(
                target=janitor_main, name="smpd-janitor", daemon=True,
                args=(r, w, self.seg.name, os.getpid(), self.seg.hdr("coordinator_ctime"), close),
            )
            self.janitor.start()
        except OSError as err:
            raise _fork_refused(err, "the janitor") from None
        finally:
            os.close(r)
        self.seg.set_hdr("janitor_pid", self.janitor.pid)

    def restart_janitor_if_gone(self) -> bool:
        """A janitor killed (by anyone) is replaced at once, so that a coordinator killed
        later still has someone to clean up after it. True when one was replaced."""
        if self.janitor is None or self.janitor.is_alive():
            return False
        self.janitor.join(0)
        os.close(self.janitor_w)
        self.janitor_w = None
        self._start_janitor()
        return True

    def _fork_cpu(self, cpu: int, core: int | None) -> None:
        p = _ctx.Process(
            target=cpu_main, name=f"smpd-cpu{cpu}", daemon=True,
            args=(self.seg, self.bus, cpu, self.signals, os.getpid(), core, self._inherited_fds()),
        )
        try:
            p.start()
        except OSError as err:
            raise _fork_refused(err, f"CPU{cpu}") from None
        self.procs[cpu] = p
        self.seg.set_cb(cpu, "pid", p.pid)

    # -- IPIs ------------------------------------------------------------------

    def send_ipi(self, cpu: int, cmd: L.Ipi) -> int:
        """Post ``cmd`` to ``cpu``'s mailbox and raise its IPI byte; returns the sequence to await."""
        seg = self.seg
        seq = (seg.cb(cpu, "mbox_seq") + 1) & 0xFFFFFFFF
        seg.set_cb(cpu, "mbox_cmd", cmd)
        seg.set_cb(cpu, "mbox_arg", 0)
        seg.set_cb(cpu, "mbox_seq", seq)  # last: the CPU reads seq, then cmd
        self.bus.wake(cpu, L.WAKE_IPI)
        return seq

    def ipi_wait(self, cpus: list[int], cmd: L.Ipi, timeout_s: float) -> tuple[dict[int, int], list[int]]:
        """Send ``cmd`` to every CPU in ``cpus`` at once and wait (bounded) for their acks.

        Returns ({cpu: result} of those that acknowledged, [cpus that did not]).
        A CPU whose process died is marked GONE and counted as not acknowledging.
        """
        waiting = {cpu: self.send_ipi(cpu, cmd) for cpu in cpus}
        results: dict[int, int] = {}
        dead: list[int] = []
        deadline = time.monotonic() + timeout_s
        pause = 0.0
        while waiting:
            for cpu, seq in list(waiting.items()):
                if self.seg.cb(cpu, "mbox_ack") == seq:
                    results[cpu] = self.seg.cb(cpu, "mbox_result")
                    del waiting[cpu]
                elif not self.procs[cpu].is_alive():
                    self._mark_gone(cpu)
                    dead.append(cpu)
                    del waiting[cpu]
            if not waiting or time.monotonic() > deadline:
                break
            check_stop()
            time.sleep(pause)
            pause = min(0.001, pause * 2 or 0.00002)
        return results, sorted([*waiting, *dead])

    def _ipi_all(self, cpus: list[int], cmd: L.Ipi, timeout_s: float, what: str) -> dict[int, int]:
        """``ipi_wait`` for requests that must not half-succeed: raise naming the CPUs that failed."""
        results, missing = self.ipi_wait(cpus, cmd, timeout_s)
        dead = [c for c in missing if not self.procs[c].is_alive()]
        if dead:
            c = dead[0]
            raise CpuLost(f"{what}: CPU{c} (pid {self.procs[c].pid}) died with exit code {self.procs[c].exitcode}; "
                          f"`smpd reset` gives it a new process")
        if missing:
            raise Timeout(f"{what}: CPU {cpulist.format_list(missing)} did not acknowledge "
                          f"{cmd.name} within {timeout_s:.1f} s")
        return results

    def _mark_gone(self, cpu: int) -> None:
        self.seg.set_cb(cpu, "state", L.ExecState.GONE)
        self.seg.set_cb(cpu, "sleeping", 0)  # never ring a doorbell at a recycled pid
        self.seg.set_cb(cpu, "pid", 0)

    def _refresh_gone(self) -> None:
        for cpu, p in self.procs.items():
            if p.exitcode is not None or not p.is_alive():
                self._mark_gone(cpu)

    # -- requests --------------------------------------------------------------

    def _cpus_arg(self, text: str) -> list[int]:
        return cpulist.parse(text, self.ncpus)

    def _require_alive(self, cpus: list[int]) -> None:
        self._refresh_gone()
        gone = [c for c in cpus if c != 0 and self.seg.cb(c, "state") == L.ExecState.GONE]
        if gone:
            raise CpuLost(f"CPU {cpulist.format_list(gone)} is GONE (its process died); "
                          f"`smpd reset` gives it a new process")

    def op_offline(self, cpus: str) -> dict:
        """cpu_down() for each online CPU of the list: play_dead() into mwait_play_dead()."""
        wanted = self._cpus_arg(cpus)
        if 0 in wanted:
            raise BadInput("CPU 0 is the boot CPU (and the kexec CPU) and cannot go offline; "
                           "name CPUs 1-%d" % (self.ncpus - 1))
        self._require_alive(wanted)
        todo = [c for c in wanted if self.seg.cb(c, "hotplug") == L.Hotplug.ONLINE]
        t0 = time.monotonic_ns()
        self._ipi_all(todo, L.Ipi.CPU_DOWN, self.ipi_timeout_s + 0.002 * len(todo), "offline")
        return {"offlined": todo, "already_offline": [c for c in wanted if c not in todo],
                "ms": (time.monotonic_ns() - t0) / 1e6}

    def op_online(self, cpus: str) -> dict:
        """INIT, then SIPI, to each offline CPU of the list; smp_callin() clears mwait_cpu_dead."""
        wanted = self._cpus_arg(cpus)
        self._require_alive(wanted)
        todo = [c for c in wanted if c != 0 and self.seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]
        t0 = time.monotonic_ns()
        budget = self.ipi_timeout_s + 0.002 * len(todo)
        self._ipi_all(todo, L.Ipi.INIT, budget, "online (INIT)")
        results = self._ipi_all(todo, L.Ipi.SIPI, budget, "online (SIPI)")
        assert all(r == IPI_DONE for r in results.values()), results
        return {"onlined": todo, "already_online": [c for c in wanted if c not in todo],
                "ms": (time.monotonic_ns() - t0) / 1e6}

    def resolve_address(self, target: str) -> int:
        """'0x1004040', 'mwait_cpu_dead[5]', 'mwait_cpu_dead[5].status', 'thread_info[5]'."""
        geo = self.seg.geo
        m = re.fullmatch(r"(mwait_cpu_dead|thread_info)\[([0-9]{1,5})\](\.(control|status|flags))?", target)
        if m:
            cpu = int(m.group(2))
            if cpu >= self.ncpus:
                raise BadInput(f"{target}: this machine has CPUs 0-{self.ncpus - 1}")
            if m.group(1) == "mwait_cpu_dead":
                if m.group(4) == "flags":
                    raise BadInput(f"{target}: mwait_cpu_dead has fields control and status")
                return geo.mwait_cpu_dead_addr(cpu) + (4 if m.group(4) == "status" else 0)
            if m.group(4) in ("control", "status"):
                raise BadInput(f"{target}: thread_info has the field flags")
            return geo.thread_info_addr(cpu)
        addr = ascii_int(target, hex_ok=True)
        if addr is None:
            raise BadInput(f"'{target}' is not an address; expected a number like 0x1004040, "
                           f"mwait_cpu_dead[N][.control|.status] or thread_info[N]") from None
        end = L.PHYS_BASE + geo.npages * L.PAGE
        if not L.PHYS_BASE <= addr <= end - 4 or addr % 4:
            raise BadInput(f"address {addr:#x} is outside emulated memory or not 4-byte aligned; "
                           f"accepted: {L.PHYS_BASE:#x}..{end - 4:#x}, multiples of 4")
        return addr

    def op_poke(self, target: str, value: int | None = None) -> dict:
        """One u32 write through the bus (the same value again when ``value`` is None)."""
        addr = self.resolve_address(target)
        if value is not None and (type(value) is not int or not 0 <= value <= 0xFFFFFFFF):
            raise BadInput(f"value {value} does not fit a u32 (0..0xffffffff)")
        old = self.seg.mem_u32(addr)
        new = old if value is None else value
        line = self.seg.geo.addr_line(addr)
        owner = self.seg.u16[self.seg.geo.dir_off // 2 + line]
        woken = self.bus.write(addr, struct.pack("<I", new))
        return {"addr": addr, "symbol": self.seg.geo.symbol(addr), "old": old, "new": new,
                "woken": woken, "woken_cpus": [owner - 1] if woken and owner else []}

    # -- kexec and friends ------------------------------------------------------

    def _require_old_kernel(self, what: str) -> None:
        if self.seg.hdr("state") == L.MachineState.KEXECED:
            raise BadInput(f"machine '{self.name}' needs a reset before {what}: it ran a kexec and now runs "
                           f"kernel generation {self.seg.hdr('generation')}; `smpd reset` returns it to the "
                           f"old kernel with the same offline CPUs")
        self._require_alive(list(range(1, self.ncpus)))

    def op_kexec(self, park: str = "hlt", inject: list[str] | None = None, order: str = "sequential",
                 seed: int | None = None) -> dict:
        if seed is None:
            seed = secrets.randbelow(2**63)
        scenario = Scenario.build(park, order, seed, list(inject or []), self.ncpus)
        self._require_old_kernel("a kexec")
        offline = [c for c in range(1, self.ncpus) if self.seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]
        report = Kexec(self, scenario).run()
        self.reset_offline = offline
        self.seg.set_hdr("state", L.MachineState.KEXECED)
        self.seg.set_hdr("kexec_count", self.seg.hdr("kexec_count") + 1)
        report["machine"] = {"name": self.name, "cpus": self.ncpus, "watch": self.watch, "hot_path": self.hot_path}
        return report

    def op_kick(self) -> dict:
        """smp_kick_mwait_play_dead() alone: who acknowledged, how fast, who is stuck."""
        self._require_old_kernel("a kick")
        k = Kexec(self, Scenario("hlt", "sequential", 0))
        marks = {cpu: self.seg.cb(cpu, "ev_head") for cpu in k.cpus}
        kick = k.smp_kick_mwait_play_dead(lambda: None)
        k.settle()  # the kicked CPUs' way into HLT, logged after their acknowledgements
        k.t.merge_cpus(self.seg, marks)
        return {"kick": kick, "timeline": k.t.ordered(),
                "cpus": [k.cpu_report(c) for c in k.cpus],
                "machine": {"name": self.name, "cpus": self.ncpus, "watch": self.watch, "hot_path": self.hot_path}}

    def respawn_gone(self) -> list[int]:
        """Fork a new process for every GONE CPU (an emulator fault), so the machine can go on.

        The dead process may have left its monitor in the line directory and its
        mailbox half-answered; both are cleared before the new process starts, in
        wait-for-SIPI like any AP after power-on.
        """
        self._refresh_gone()
        gone = [c for c in range(1, self.ncpus) if self.seg.cb(c, "state") == L.ExecState.GONE]
        d, base = self.seg.u16, self.seg.geo.dir_off // L.DIR_ENTRY
        for cpu in gone:
            old = self.procs.pop(cpu)
            old.join(1)
            for line in (self.seg.geo.percpu_line(cpu, L.MWAIT_CPU_DEAD_SLOT),
                         self.seg.geo.percpu_line(cpu, L.THREAD_INFO_SLOT)):
                d[base + line] = 0
            for field, value in (("mbox_ack", self.seg.cb(cpu, "mbox_seq")), ("wake", 0), ("sleeping", 0),
                                 ("mon_armed", 0), ("busy", 0), ("state", L.ExecState.OFF),
                                 ("hotplug", L.Hotplug.OFFLINE)):
                self.seg.set_cb(cpu, field, value)
            self._fork_cpu(cpu, self.plan[cpu])
        if gone:
            self.seg.set_hdr("respawns", self.seg.hdr("respawns") + len(gone))
        return gone

    def op_reset(self) -> dict:
        """Back to the old kernel with the same offline CPUs, without re-forking: INIT every
        CPU, reload generation 1's image, SIPI every CPU, offline the same set again. A CPU
        whose process died (GONE) is the exception: it gets a new process, even when it
        dies during the reset itself (up to RESET_ATTEMPTS times)."""
        t0 = time.monotonic_ns()
        offline = self.reset_offline
        if offline is None:
            offline = [c for c in range(1, self.ncpus) if self.seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]
        respawned: list[int] = []
        for attempt in range(RESET_ATTEMPTS):
            respawned += self.respawn_gone()
            try:
                self._reset_once(offline)
                break
            except CpuLost:
                if attempt == RESET_ATTEMPTS - 1:
                    raise
        self.seg.set_hdr("state", L.MachineState.UP)
        self.reset_offline = None
        return {"offline": offline, "generation": 1, "respawned": respawned,
                "ms": (time.monotonic_ns() - t0) / 1e6}

    def _reset_once(self, offline: list[int]) -> None:
        cpus = list(range(1, self.ncpus))
        budget = self.ipi_timeout_s
        self._ipi_all(cpus, L.Ipi.INIT, budget, "reset (INIT)")
        for cpu in cpus:
            for field in ("fault", "fault_page", "fault_addr", "fault_value", "fault_cause",
                          "fault_cause_arg", "fault_ns", "stray_stores", "kick_seen_ns",
                          "nmi_pending", "smi_pending", "mce_pending"):
                self.seg.set_cb(cpu, field, 0)
        self.seg.set_hdr("generation", 1)
        self.seg.set_hdr("monitor_target", L.MonitorTarget.MWAIT_CPU_DEAD)
        load_kernel(self.bus, self.seg.geo, self.seg.hdr("seed"), generation=1)
        self._ipi_all(cpus, L.Ipi.SIPI, budget, "reset (SIPI)")
        self._ipi_all(offline, L.Ipi.CPU_DOWN, budget, "reset (offline)")

    def op_inject(self, kind: str, cpus: str = "all", count: int = 1) -> dict:
        """A stray interrupt right now: send it, wait (bounded) until it is taken or held."""
        inj = parse_injection(f"{kind}@after-copy:{cpus}x{count}", self.ncpus)
        self._refresh_gone()
        k = Kexec(self, Scenario("hlt", "sequential", 0, (inj,)))
        k.old_gen = k.new_gen = self.seg.hdr("generation")
        marks = {cpu: self.seg.cb(cpu, "ev_head") for cpu in inj.cpus}
        k.inject("after-copy")
        k.settle()
        k.t.merge_cpus(self.seg, marks)
        return {"injection": inj.spec(), "cpus": [k.cpu_report(c) for c in inj.cpus],
                "not_taken": {str(c): why for c, why in k.not_taken.items()}, "timeline": k.t.ordered()}

    def op_bench_kick(self, targets: str | None = None, rounds: int = 100) -> dict:
        """`rounds` rounds of: kick each target (smpd.kick.kick_one), then REPARK them all.

        Returns raw samples for the client to fold into histograms, so that a long run
        is many short requests (a progress bar, Ctrl-C between batches)."""
        self._require_old_kernel("a kick benchmark")
        if not 0 <= rounds <= 100_000:
            raise BadInput(f"rounds {rounds} is not in the range 1..100000")
        parked = [c for c in range(1, self.ncpus) if self._parked(c)]
        cpus = parked if targets in (None, "", "parked") else self._cpus_arg(targets)
        bad = [c for c in cpus if not self._parked(c)]
        if bad or not cpus:
            raise BadInput(
                (f"CPU {cpulist.format_list(bad)} {'is' if len(bad) == 1 else 'are'} not parked in "
                 f"mwait_play_dead() (online, kicked, or elsewhere)" if bad else "no CPU is parked")
                + f"; parked now: CPU {cpulist.format_list(parked) or 'none'} (`smpd offline` parks CPUs)")
        if rounds == 0:  # validation only (and the pids, to sample before the first batch)
            return {"targets": cpus, "pids": {str(c): self.seg.cb(c, "pid") for c in cpus}}
        delay_ns = self.cfg.get("kick", "delay_us") * 1000
        budget = self.cfg.get("kick", "rounds")
        samples: dict[str, list] = {str(c): [] for c in cpus}
        for _ in range(rounds):
            for cpu in cpus:
                e = kick_one(self.seg, self.bus, cpu, delay_ns, budget)
                samples[str(cpu)].append([e.get("one_way_ns", -1), e.get("rtt_ns", -1), e["rounds"],
                                          int(e["acknowledged"])])
            _, missing = self.ipi_wait(cpus, L.Ipi.REPARK, self.ipi_timeout_s)
            if missing:
                raise Timeout(f"bench kick: CPU {cpulist.format_list(missing)} did not re-park "
                              f"in mwait_play_dead() within {self.ipi_timeout_s:.0f} s")
        return {"samples": samples, "budget_ns": delay_ns * budget, "delay_ns": delay_ns, "watch": self.watch,
                "hot_path": self.hot_path,
                "pids": {str(c): self.seg.cb(c, "pid") for c in cpus}}

    def _parked(self, cpu: int) -> bool:
        return (self.seg.cb(cpu, "state") == L.ExecState.MWAIT
                and self.seg.mem_u32(self.seg.geo.mwait_cpu_dead_addr(cpu) + 4) == L.CPUDEAD_MWAIT_WAIT)

    def op_status(self) -> dict:
        self._refresh_gone()
        return status_snapshot(self.seg, self.procs)

    def op_ping(self) -> dict:
        return {"pid": os.getpid()}

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {"status": self.op_status, "offline": self.op_offline, "online": self.op_online,
                "poke": self.op_poke, "ping": self.op_ping, "kexec": self.op_kexec, "kick": self.op_kick,
                "reset": self.op_reset, "inject": self.op_inject, "bench_kick": self.op_bench_kick, "down": lambda: {"stopping": True}}

    # -- the serving loop ------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until `down`, SIGTERM/SIGINT (raises Stop), or the end of the world."""
        sel = selectors.DefaultSelector()
        sel.register(self.server.fileno(), selectors.EVENT_READ)
        try:
            while not self.stopping:
                if self.restart_janitor_if_gone():
                    continue
                if not sel.select(timeout=0.2):
                    continue
                conn = self.server.accept()
                if conn is None:
                    continue
                try:
                    self._answer(conn)
                finally:
                    conn.close()
        finally:
            sel.close()

    def _answer(self, conn) -> None:
        try:
            req = channel.recv_json(conn)
            op, args = req["op"], req.get("args", {})
            handler = self.handlers().get(op)
            if handler is None:
                raise BadInput(f"unknown request '{op}'")
            result = handler(**args)
            reply = {"ok": True, "result": result}
        except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, (OSError, EOFError)):
                return  # the client went away
            reply = channel.error_reply(BadInput(f"malformed request: {err}"))
        except SmpdError as err:
            reply = channel.error_reply(err)
        try:
            channel.send_json(conn, reply)
        except OSError:
            pass
        if reply.get("ok") and req["op"] == "down":
            self.stopping = True

    # -- teardown --------------------------------------------------------------

    def shutdown(self) -> None:
        """Power off every CPU, reap it, release the segment. Safe at any point of boot()."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.seg is not None and self.seg.buf is not None:
            self.seg.set_hdr("state", L.MachineState.STOPPING)
            alive = [c for c, p in self.procs.items() if p.is_alive()]
            for cpu in alive:
                try:
                    self.send_ipi(cpu, L.Ipi.POWER_OFF)
                except Exception:
                    pass
        deadline = time.monotonic() + self.cfg.get("timeouts", "shutdown_ms") / 1000
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(5)
            if p.exitcode is not None:
                p.close()
        self.procs.clear()
        if self.seg is not None:
            name = self.seg.name
            self.bus = None
            self.seg.close()
            self.seg = None
            unlink(name)
        if self.janitor is not None:
            try:
                os.write(self.janitor_w, JANITOR_DONE)
            except OSError:
                pass
            os.close(self.janitor_w)
            self.janitor_w = None
            self.janitor.join(5)
            if self.janitor.is_alive():
                self.janitor.kill()
                self.janitor.join(5)
            self.janitor = None


def status_snapshot(seg: Segment, procs: dict[int, Any] | None = None) -> dict:
    """Everything `smpd status` shows, read from the observation plane (and psutil for cores)."""
    geo = seg.geo
    now = time.monotonic_ns()
    cpus = []
    for cpu in range(geo.ncpus):
        cb = lambda f: seg.cb(cpu, f)  # noqa: E731
        pid = cb("pid")
        core = cb("core")
        if core < 0 and pid:
            try:
                core = psutil.Process(pid).cpu_num()
            except psutil.Error:
                core = -1
        md = geo.mwait_cpu_dead_addr(cpu)
        state = L.ExecState(cb("state"))
        cpus.append({
            "cpu": cpu, "pid": pid, "core": core,
            "hotplug": L.Hotplug(cb("hotplug")).name.lower(), "state": state.name,
            "wakeups": {"write": cb("wake_write"), "interrupt": cb("wake_irq"),
                        "ipi": cb("wake_ipi"), "spurious": cb("wake_spurious")},
            "mwait_entries": cb("mwait_entries"),
            "interrupts": {k: {"taken": cb(f"{k}_taken"), "pending": cb(f"{k}_pending"),
                               "held": cb(f"{k}_held")} for k in ("nmi", "smi", "mce")},
            "init": cb("init_count"), "sipi": cb("sipi_count"),
            "mwait_cpu_dead": {"addr": md, "control": seg.mem_u32(md), "status": seg.mem_u32(md + 4)},
            "monitor": {"armed": bool(cb("mon_armed")),
                        "addr": geo.line_addr(cb("mon_line")) if cb("mon_armed") else None},
        })
    states: dict[str, int] = {}
    for c in cpus:
        states[c["state"]] = states.get(c["state"], 0) + 1
    machine = {
        "name": seg.hdr_str("name"), "pid": seg.hdr("coordinator_pid"), "cpus": geo.ncpus,
        "watch": "spin" if seg.hdr("watch") == L.Watch.SPIN else "adaptive",
        "watch_reason": seg.hdr_str("watch_reason"), "pin": seg.hdr_str("pin"),
        "hot_path": "c" if seg.hdr("hot_path") == L.HotPath.C else "python",
        "hot_path_reason": seg.hdr_str("hot_path_reason"), "spin_yields": bool(seg.hdr("spin_yields")),
        "seed": seg.hdr("seed"), "generation": seg.hdr("generation"),
        "state": L.MachineState(seg.hdr("state")).name, "uptime_s": (now - seg.hdr("boot_ns")) / 1e9,
        "bringup_ms": seg.hdr("bringup_ns") / 1e6, "segment": seg.name,
        "segment_bytes": geo.size, "layout_version": L.LAYOUT_VERSION,
        "janitor_pid": seg.hdr("janitor_pid"), "respawns": seg.hdr("respawns"),
        "kexecs": seg.hdr("kexec_count"),
        "online": sum(1 for c in cpus if c["hotplug"] == "online"), "states": states,
    }
    return {"machine": machine, "cpus": cpus}


def janitor_main(r: int, w: int, seg_name: str, coord_pid: int, coord_ctime: float, close: list[int]) -> None:
    """Block until the coordinator is gone; if it went without cleaning up, clean up after it."""
    set_process_name("smpd-janitor")
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # it leaves by itself as soon as its job is done
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for fd in (w, *close):  # the pipe's write end, and what only the coordinator may hold open
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        data = os.read(r, 1)
    except OSError:
        data = b""
    if data == JANITOR_DONE:
        os._exit(0)
    try:
        # EOF comes when the coordinator's files close, a moment before it is a zombie.
        wait_gone(coord_pid, coord_ctime, 10.0)
        clean_stale_segment(seg_name, expect_pid=coord_pid, expect_ctime=coord_ctime)
    finally:
        os._exit(0)


def _fork_refused(err: OSError, what: str) -> HostTooSmall:
    return HostTooSmall(f"the host refused a process for {what} ({err.strerror or err}): too many "
                        f"processes for this user or host (see `ulimit -u` and pid_max); nothing was left behind")


def main(argv: list[str] | None = None) -> None:
    """``python -P -m smpd.coordinator FD``: the daemon behind `smpd up`, which holds FD's other end."""
    argv = sys.argv[1:] if argv is None else argv
    set_process_name(lifecycle.COORDINATOR_COMM)
    client = UpClient(int(argv[0]))
    try:
        spec = client.read_spec()
    except (Stop, OSError, ValueError):
        client.close()
        sys.exit(1)
    sys.exit(run(spec, up_client=client))


def run(spec: dict, up_client: UpClient | None = None, on_ready: Callable[[dict], None] | None = None) -> int:
    """Boot, report readiness (to `up` or ``on_ready``), serve, shut down. Exit status."""
    global _up_client
    set_process_name(lifecycle.COORDINATOR_COMM)  # what smpd.trust looks for before it signals us
    _up_client = up_client
    cfg = Config(spec["config"])
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    coord = Coordinator(cfg, spec["watch"], spec["watch_reason"], spec["seed"],
                        spec["hot_path"], spec["hot_path_reason"])
    coord.up_client = up_client
    status = 0
    boot_error: SmpdError | None = None
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # see check_stop()
    try:
        try:
            summary = coord.boot()
        except BaseException as err:
            if isinstance(err, SmpdError):
                boot_error = err
            msg = str(err) if isinstance(err, SmpdError) else f"{type(err).__name__}: {err}"
            if isinstance(err, Stop):
                msg = f"bring-up interrupted by {err}"
            if up_client is not None:
                up_client.answer({"ok": False, "error": msg,
                                  "exit": err.exit_status if isinstance(err, SmpdError) else 1})
            raise
        if on_ready is not None:
            on_ready(summary)
        if up_client is not None:
            if not up_client.answer({"ok": True, "summary": summary}):
                raise Stop("the exit of the `smpd up` that started it, before it took the answer")
            _up_client = coord.up_client = None
            up_client.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        coord.serve()
    except Stop:
        status = 0
    except SmpdError:
        status = 1
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        coord.shutdown()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones meet SIG_IGN
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if up_client is not None:
            _up_client = None
            up_client.close()
    if boot_error is not None and up_client is None and on_ready is not None:
        raise boot_error  # in the foreground, the caller says what went wrong (everything is gone now)
    return status


if __name__ == "__main__":
    main()
