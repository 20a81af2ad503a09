"""The supervisor: the coordinator process, CPU 0, the boot CPU and (later) the kexec CPU.

It alone owns the machine's resources, each with one cleanup path:

* the segment (created O_EXCL; unlinked in ``shutdown``);
* the CPU processes 1..N-1 (our children, forked by a lean template, smpd.daemon.template, and
  held as multiprocess Processes, smpd.daemon.cpuproc; each dies with us through
  PR_SET_PDEATHSIG; SIGKILLed and reaped in ``shutdown``: the power cut;
  a dead one is replaced by ``respawn_gone``);
* the template, for as long as it forks (``_fork_cpus``);
* the janitor (smpd.daemon.janitor), replaced at once if it is killed;
* the control channel (an abstract socket; nothing to remove).

It carries IPIs to the CPUs (``ipi_wait``) and serves one request at a time
(smpd.daemon.handlers): a CLI command is short, and serialising them means no two
hotplug operations ever race on a mailbox.

Run as a daemon by ``smpd up`` (``python -P -m smpd.daemon``), or in the
foreground with ``smpd up --foreground``.
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import sys
import time
from typing import Any, Callable, Iterable

import multiprocess

from smpd import cpulist
from smpd.config import Config
from smpd.daemon import channel, stopping
from smpd.daemon.cpuproc import CpuProcess, alive_among, mark_gone
from smpd.daemon.template import Template
from smpd.daemon.handlers import Handlers
from smpd.daemon.janitor import COORDINATOR_COMM, Janitor, same_file
from smpd.daemon.stopping import STOP_SIGNALS, Stop, UpClient, check_stop
from smpd.errors import CpuLost, HostTooSmall, MachineAlreadyUp, SmpdError, Timeout
from smpd.host import hostinfo, names, trust
from smpd.host.proc import fork_refused, set_process_name
from smpd.kernel import boot as kboot, image
from smpd.machine import layout as L
from smpd.machine.bus import Bus
from smpd.machine.mailbox import Mailbox, Then, following
from smpd.machine.segment import Segment, SegmentExists, unlink

_ctx = multiprocess.get_context("fork")
SPIN_BUDGET_US = 50  # [watch] spin_budget_us = "auto" where the CPU processes fit the host's cores


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
        self.mailbox: Mailbox | None = None  # the IPI mailboxes' coordinator half
        self.procs: dict[int, Any] = {}
        self.template: Template | None = None  # what forks the CPU processes, while it does
        self.janitor: Janitor | None = None
        self.start_ticks = 0  # when we started (ticks since boot): with our pid, who we are (smpd.host.trust)
        self.server: channel.Server | None = None
        self.up_client: UpClient | None = None  # the `smpd up` waiting for us (None: foreground)
        self.stopping = False
        self.handlers = Handlers(self)
        self.reset_offline: list[int] | None = None  # the offline set `smpd reset` restores
        self.soak_hold = None  # a soak's hold: the user's setup, for a reset after it is killed (soakhold)
        self.boot1 = cfg.boot()  # generation 1's kernel: what `smpd up` and every `smpd reset` boot
        self.ended_by = ""  # how the machine ended (a kexec's outcome, a panic), once it has
        self.plan: list[int | None] = []  # host core of each CPU (pin policy)

    # -- bring-up --------------------------------------------------------------

    def boot(self) -> dict:
        """Create the segment, load the old kernel, fork and start every CPU. Returns a summary."""
        t0 = time.monotonic_ns()
        sizes = self.cfg.sizes()
        geo = L.Geometry(self.ncpus, sizes.ram)
        hostinfo.raise_file_limit()
        self.start_ticks = trust.start_ticks(os.getpid())
        image.keep_images()
        self._start_janitor()  # first: from here on, whatever kills us, someone cleans up after us
        self.template = self.template or Template()  # `python -m smpd.daemon` started it before its imports
        self.template.start()  # its interpreter starts while we make the segment and load the kernel
        try:
            self.seg = seg = Segment.create(names.segment(self.name), geo, os.getpid(), self.start_ticks, self.name)
        except SegmentExists:
            raise MachineAlreadyUp(self.name, None) from None
        seg.set_hdr("janitor_pid", self.janitor.pid)
        self.plan = plan = hostinfo.pin_plan(self.pin, self.ncpus)  # the header's spin_yields counts its cores
        for field, value in _header(self, t0, sizes):
            seg.set_hdr(field, value)
        check_stop()
        self.bus = Bus(seg)
        self.mailbox = Mailbox(seg, self.bus, self.cpus_alive, self._mark_gone, check_stop, spin=self._fits_host())
        gen1 = kboot.load_first(seg, self.boot1)  # its RAM is written while the template forks
        if plan[0] is not None:
            os.sched_setaffinity(0, {plan[0]})
        for field, value in (("pid", os.getpid()), ("core", _core_word(plan[0])),
                             ("hotplug", L.Hotplug.ONLINE), ("state", L.ExecState.RUNNING),
                             ("start_ticks", self.start_ticks), ("cpu_gen", 1)):
            seg.set_cb(0, field, value)
        seg.set_hdr("state", L.MachineState.BOOTING)
        self._fork_cpus({cpu: plan[cpu] for cpu in range(1, self.ncpus)}, lambda: kboot.write_ram(seg, self.bus, gen1))
        t_sipi = time.monotonic_ns()
        budget = (self.cfg.get("timeouts", "bringup_ms")
                  + self.cfg.get("timeouts", "bringup_ms_per_cpu") * self.ncpus) / 1000
        self.start_aps(gen1, budget, "bring-up")
        bringup_ns = time.monotonic_ns() - t0
        seg.set_hdr("bringup_ns", bringup_ns)
        self.server = channel.Server(names.socket_address(self.name, seg.hdr_str("channel")), seg.hdr("authkey"))
        seg.set_hdr("state", L.MachineState.UP)
        return {
            "name": self.name, "pid": os.getpid(), "cpus": self.ncpus, "watch": self.watch,
            "watch_reason": self.watch_reason, "pin": self.pin, "seed": self.seed,
            "hot_path": self.hot_path, "hot_path_reason": self.hot_path_reason,
            "spin_yields": bool(seg.hdr("spin_yields")), "spin_budget_us": seg.hdr("spin_budget_ns") // 1000,
            "segment": seg.name, "segment_bytes": geo.size, "bringup_ms": bringup_ns / 1e6,
            "sipi_to_online_ms": (time.monotonic_ns() - t_sipi) / 1e6,
            "kernel": self.boot1.text(), "generation": 1,
            "online": sum(1 for c in range(self.ncpus) if seg.cb(c, "hotplug") == L.Hotplug.ONLINE),
        }

    def _spin_budget_us(self) -> int:
        """[watch] spin_budget_us; "auto": SPIN_BUDGET_US when the CPU processes and the coordinator
        fit the host's cores, else 0. On fewer cores a CPU that spins after each wake-up holds a
        core the waker needs: a 64-CPU soak on 2 cores spent 40% of its CPU processes' host time
        spinning (85 ms a trial, 53 without; 11.3 -> 14.5 trials/s)."""
        asked = self.cfg.get("watch", "spin_budget_us")
        if asked != "auto":
            return asked
        return SPIN_BUDGET_US if self._fits_host() else 0

    def _fits_host(self) -> bool:
        """Do the CPU processes and the coordinator have a host core each (of those the pin policy leaves them)?"""
        return self.ncpus <= hostinfo.machine_cores(self.plan)

    def start_aps(self, m, budget: float, what: str, offline: list[int] = ()) -> dict:
        """Kernel ``m`` starts the APs its boot parameters keep (smpd.kernel.boot), and takes those
        of ``offline`` offline again; a CPU that does not answer, or does not take its SIPI, is an
        error here (a cold boot has nothing to blame but the host)."""
        r = kboot.start_aps(self, m, list(range(1, self.ncpus)), budget, offline)
        if r["missing"]:
            self.refresh_gone()
            self.raise_unanswered(r["missing"], L.Ipi.INIT, r["messages"], budget, what)
        kboot.require_sipi_taken(r, what)
        return r

    # -- what a kexec needs of us (smpd.kernel.kexec.Port) ------------------------

    def cpu_alive(self, cpu: int) -> bool:
        p = self.procs.get(cpu)
        if p is not None and p.is_alive():
            return True
        if p is not None and self.seg.cb(cpu, "pid"):
            self._mark_gone(cpu)  # cleared before its reap already (smpd.daemon.cpuproc): whatever is left
        return False

    def cpus_alive(self, cpus: Iterable[int]) -> set[int]:
        return alive_among(self.procs, cpus, self.cpu_alive)

    def _mark_gone(self, cpu: int) -> None:
        mark_gone(self.seg, cpu)

    def cpu_process(self, cpu: int):
        return self.procs.get(cpu)

    def send_interrupt(self, cpu: int, kind: str) -> None:
        """NMI, SMI or MCE as a signal to the CPU's process (our own child: its pid is its own)."""
        p = self.procs.get(cpu)
        if p is not None and p.is_alive():
            try:
                os.kill(p.pid, self.signals[kind])
            except ProcessLookupError:
                pass

    def kick_params(self) -> tuple[int, int]:
        return self.cfg.get("kick", "delay_us") * 1000, self.cfg.get("kick", "rounds")

    def _inherited_fds(self) -> list[int]:
        """Descriptors a forked child must close: each holds something only we may hold open."""
        fds = [fd for fd in (self.janitor.w if self.janitor else None,) if fd is not None]
        if self.up_client is not None:
            fds.append(self.up_client.sock.fileno())
        if self.server is not None:
            fds.append(self.server.fileno())
        if self.seg is not None and self.seg.fd >= 0:
            fds.append(self.seg.fd)
        if self.template is not None and self.template.sock is not None:  # started before the janitor
            fds.append(self.template.sock.fileno())
        return fds

    def _start_janitor(self) -> None:
        if self.janitor is None:
            self.janitor = Janitor(_ctx, names.segment(self.name), os.getpid(), self.start_ticks)
        try:
            pid = self.janitor.start(self._inherited_fds())
        except OSError as err:
            raise fork_refused(err, "the janitor") from None
        if self.seg is not None:
            self.seg.set_hdr("janitor_pid", pid)

    def restart_janitor_if_gone(self, sel: selectors.BaseSelector) -> None:
        """A janitor killed (by anyone) is replaced at once (Janitor.tend: its sentinel in ``sel``)."""
        if self.janitor and (pid := self.janitor.tend(sel, self._inherited_fds)) is not None and self.seg:
            self.seg.set_hdr("janitor_pid", pid)  # (0: none runs now, the host refused it)

    def _fork_cpus(self, plan: dict[int, int | None], meanwhile: Callable[[], None] = lambda: None) -> None:
        """A process for each CPU of ``plan`` (cpu -> host core), forked by the template, which ends here;
        ``meanwhile`` runs once the template has the request."""
        template, self.template = self.template or Template(), None
        template.fork(self.seg, self.signals, plan, check_stop, self._adopt, self.ipi_timeout_s, meanwhile)

    def _adopt(self, cpu: int, pid: int) -> None:
        self.procs[cpu] = p = CpuProcess(name=f"smpd-cpu{cpu}", daemon=True).adopt(pid, self.seg, cpu)
        for field, value in (("core", _core_word(self.plan[cpu])), ("pid", pid), ("start_ticks", p.start_ticks())):
            self.seg.set_cb(cpu, field, value)  # its core, where cpu_main pins it; its pid, which the janitor checks

    # -- IPIs ------------------------------------------------------------------

    def send_ipi(self, cpu: int, cmd: L.Ipi) -> int:
        return self.mailbox.send(cpu, cmd)

    def ipi_wait(self, cpus: list[int], cmd: L.Ipi, timeout_s: float,
                 then: Then = ()) -> tuple[dict[int, int], list[int]]:
        """smpd.machine.mailbox: send ``cmd`` (and what follows it, ``then``) to ``cpus``, wait
        (bounded); (acked results, missing)."""
        return self.mailbox.send_and_wait(cpus, cmd, timeout_s, then)

    def ipi_all(self, cpus: list[int], cmd: L.Ipi, timeout_s: float, what: str,
                then: Then = ()) -> dict[int, int]:
        """``ipi_wait`` for requests that must not half-succeed: raise naming the CPUs that failed."""
        results, missing = self.ipi_wait(cpus, cmd, timeout_s, then)
        self.raise_unanswered(missing, cmd, then, timeout_s, what)
        return results

    def raise_unanswered(self, missing: list[int], cmd: L.Ipi, then: Then, timeout_s: float, what: str) -> None:
        """Raise for the CPUs that did not acknowledge the message ``cmd`` (then ``then``) within
        ``timeout_s``: CpuLost for a dead one, else Timeout; nothing when none."""
        dead = [c for c in missing if not self.cpu_alive(c)]  # each marked GONE by cpu_alive()
        if dead:
            p = self.procs.get(dead[0])  # none: its respawn was cut short (the host refused a process)
            raise CpuLost(f"{what}: CPU{dead[0]} " + (f"(pid {p.pid}) died with exit code {p.exitcode}" if p else
                          "has no process") + "; `smpd reset` gives it a new process")
        if missing:
            message = (cmd, *following(then, missing[0]))
            raise Timeout(f"{what}: the process of CPU {cpulist.format_list(missing)} did not acknowledge "
                          f"{' then '.join(ipi.name for ipi in message)} in its mailbox within {timeout_s:.1f} s "
                          f"(stopped, or starved of the host's cores): a host fault, not the machine's")

    def refresh_gone(self) -> None:
        """GONE: every CPU whose process died, or that has none (a respawn cut short)."""
        for cpu in set(range(1, self.ncpus)) - self.cpus_alive(range(1, self.ncpus)):
            self._mark_gone(cpu)

    def respawn_gone(self) -> list[int]:
        """Fork a new process for every GONE CPU (an emulator fault), so the machine can go on.

        The dead process may have left its monitor in the line directory and its
        mailbox half-answered; both are cleared before the new process starts, in
        wait-for-SIPI like any AP after power-on.
        """
        self.refresh_gone()
        gone = [c for c in range(1, self.ncpus) if self.seg.cb(c, "state") == L.ExecState.GONE]
        for cpu in gone:
            if (old := self.procs.pop(cpu, None)) is not None:
                old.join(1)
            self.bus.clear_left_monitor(cpu)
            for field, value in (("mbox_ack", self.seg.cb(cpu, "mbox_seq")), ("wake", 0), ("mon_write", 0), ("sleeping", 0),
                                 ("mon_watch", 0), ("mon_armed", 0), ("busy", 0), ("hotplug", L.Hotplug.OFFLINE)):
                self.seg.set_cb(cpu, field, value)
        if gone:
            self._fork_cpus({cpu: self.plan[cpu] for cpu in gone})
            self.seg.set_hdr("respawns", self.seg.hdr("respawns") + len(gone))
        return gone

    # -- the serving loop ------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until `down`, SIGTERM/SIGINT (raises Stop), or the end of the world."""
        sel = selectors.DefaultSelector()
        sel.register(self.server.fileno(), selectors.EVENT_READ, "channel")
        try:
            while not self.stopping:
                self.restart_janitor_if_gone(sel)  # its sentinel wakes the select() below the moment it dies
                if self.seg.fd >= 0 and not same_file(names.segment(self.name), self.seg.fd):  # (rm, down --force)
                    raise Stop("the removal of its segment's name: no command could reach it any more")
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "janitor":
                        continue
                    client = self.server.accept()
                    if client is None:
                        continue
                    conn, pid = client
                    try:
                        self.handlers.answer(conn, pid)
                    finally:
                        conn.close()
        finally:
            sel.close()

    # -- teardown --------------------------------------------------------------

    def shutdown(self) -> None:
        """Cut the power: every CPU process is SIGKILLed, reaped, and the segment released. Safe at
        any point of boot().

        A CPU process is our own child, not yet reaped, so its pid is still its own. The kill is
        the whole power-off: the host tears the process down without waking its interpreter (a
        POWER_OFF IPI rang each sleeping CPU's doorbell and ran Python to exit, ~0.4 ms a CPU on
        a loaded host; the segment and everything in it go with the machine anyway)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.seg is not None and self.seg.buf is not None:
            self.seg.set_hdr("state", L.MachineState.STOPPING)
        if self.template is not None:  # started, but boot() stopped before it was handed the segment
            self.template.stop()
            self.template = None
        for p in self.procs.values():
            p.kill()
        for p in self.procs.values():
            p.join(5)
            if p.exitcode is not None:
                p.close()
        self.procs.clear()
        if self.seg is not None:
            name = self.seg.name
            # Only the file we made: if someone removed it, the name may be another machine's by now.
            ours = self.seg.fd >= 0 and same_file(name, self.seg.fd)
            self.bus = None
            self.seg.close()
            self.seg = None
            if ours:
                unlink(name)
        if self.janitor is not None:
            self.janitor.release()
            self.janitor = None


def _core_word(core: int | None) -> int:
    """A CPU's host core in its control block: -1 when not pinned."""
    return -1 if core is None else core


def _header(c: Coordinator, t0: int, sizes) -> tuple[tuple[str, object], ...]:
    """What ``c``'s segment header says of its machine from the start (smpd.machine.layout HEADER)."""
    return (
        ("state", L.MachineState.CREATING), ("generation", 1), ("seed", c.seed),
        ("watch", L.Watch.SPIN if c.watch == "spin" else L.Watch.ADAPTIVE),
        ("boot_ns", t0), ("boot_wall", time.time()),
        ("spin_budget_ns", c._spin_budget_us() * 1000),
        ("spurious_per_s", float(c.cfg.get("watch", "spurious_per_s"))),
        ("authkey", secrets.token_bytes(32)), ("channel", secrets.token_hex(16).encode()),
        ("coordinator_sid", os.getsid(0)),
        ("pin", c.pin.encode()), ("watch_reason", c.watch_reason.encode()[:200]),
        ("hot_path", L.HotPath.C if c.hot_path == "c" else L.HotPath.PYTHON),
        ("hot_path_reason", c.hot_path_reason.encode()[:200]),
        ("spin_yields", int(c.watch == "spin" and not c._fits_host())),
        ("text_pages", sizes.text), ("data_pages", sizes.data), ("pgtable_pages", sizes.pgtables),
        ("stack_pages_per_cpu", sizes.stack_per_cpu), ("crash_pages", sizes.crash),
        ("smi_auto_halt_restart", int(c.cfg.get("firmware", "smi_auto_halt_restart"))),
        ("smm_hangs_in_init", int(c.cfg.get("firmware", "smm_hangs_with_cpus_in_init"))),
    )


def main(argv: list[str] | None = None, template: Template | None = None) -> None:
    """``python -P -m smpd.daemon FD``: the daemon behind `smpd up`, which holds FD's other end;
    ``template``: the one smpd.daemon.__main__ started."""
    argv = sys.argv[1:] if argv is None else argv
    set_process_name(COORDINATOR_COMM)
    client = UpClient(int(argv[0]))
    try:
        spec = client.read_spec()
    except (Stop, OSError, ValueError):  # `up` hung up first (bad input, say: smpd.tools.early)
        client.close()
        if template is not None:
            template.stop()  # killed and reaped: `up` waits for us, and then nothing is left
        sys.exit(1)
    sys.exit(run(spec, up_client=client, template=template))


def run(spec: dict, up_client: UpClient | None = None, on_ready: Callable[[dict], None] | None = None,
        template: Template | None = None) -> int:
    """Boot, report readiness (to `up` or ``on_ready``), serve, shut down. Exit status."""
    set_process_name(COORDINATOR_COMM)  # what smpd.trust looks for before it signals us
    # A CPU process stays our zombie until we reap it, so its pid is its own until then (shutdown
    # SIGKILLs by pid): a SIGCHLD ignored by whoever started us would have the kernel reap it at
    # once, and its pid be free for anyone's next process.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    stopping.watch_up(up_client)
    cfg = Config(spec["config"])
    old = {s: signal.signal(s, stopping.on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    coord = Coordinator(cfg, spec["watch"], spec["watch_reason"], spec["seed"],
                        spec["hot_path"], spec["hot_path_reason"])
    coord.up_client = up_client
    coord.template = template
    status = 0
    boot_error: SmpdError | None = None
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # see check_stop()
    try:
        try:
            summary = coord.boot()
        except BaseException as err:
            if isinstance(err, HostTooSmall):  # shutdown() below removes all boot() made
                err = HostTooSmall(f"{err}; nothing was left behind")
            if isinstance(err, SmpdError):
                boot_error = err
            msg = str(err) if isinstance(err, SmpdError) else f"{type(err).__name__}: {err}"
            if isinstance(err, Stop):
                msg = f"bring-up interrupted by {err}"
            if up_client is not None:
                up_client.answer({"ok": False, "error": msg,
                                  "exit": err.exit_status if isinstance(err, SmpdError) else 1})
            raise err
        if on_ready is not None:
            on_ready(summary)
        if up_client is not None:
            if not up_client.answer({"ok": True, "summary": summary}):
                raise Stop("the exit of the `smpd up` that started it, before it took the answer")
            stopping.watch_up(None)
            coord.up_client = None
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
            stopping.watch_up(None)
            up_client.close()
    if boot_error is not None and up_client is None and on_ready is not None:
        raise boot_error  # in the foreground, the caller says what went wrong (everything is gone now)
    return status


if __name__ == "__main__":
    main()
