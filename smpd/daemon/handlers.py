"""The coordinator's requests: one handler per op, arguments checked, errors classified.

The request boundary (``answer``): a request is a JSON object ``{"op", "args"}``.
Before a handler runs, the op must be known and the arguments must bind to its
signature with the types its annotations name; anything else is ``BadInput``
(exit 2). What a handler raises on purpose is an ``SmpdError`` with its own exit
status (a CPU lost, a machine still coming up: 1). Anything else is a bug: it is
logged with its traceback to the coordinator's stderr (SMPD_COORDINATOR_LOG) and
answered as ``InternalError`` (exit 1), and the machine stays up. A client that
leaves before its reply costs a line in the log, nothing more.
"""

from __future__ import annotations

import inspect
import os
import struct
import sys
import time
import traceback
import types
import typing
from typing import Any, Callable

from smpd import cpulist
from smpd.daemon import channel, soakhold
from smpd.daemon.kernel_ops import (KernelOps, end_if_faulted, ending_faults, require_alive, require_running_kernel,
                                    settle_then_end_if_faulted)
from smpd.daemon.status import status_snapshot
from smpd.daemon.stopping import Stop
from smpd.errors import BadInput, CoordinatorGone, InternalError, SmpdError
from smpd.kernel import boot as kboot
from smpd.kernel.generations import Generations
from smpd.machine import layout as L



class Handlers:
    """Every op a client may ask of the coordinator ``sup`` (smpd.daemon.supervisor)."""

    def __init__(self, sup):
        self.sup = sup
        k = KernelOps(sup)
        self.table: dict[str, Callable[..., Any]] = {
            "status": self.op_status, "offline": self.op_offline, "online": self.op_online,
            "poke": self.op_poke, "ping": self.op_ping, "down": self.op_down,
            "kexec": k.op_kexec, "chain": k.op_chain, "kick": k.op_kick, "panic": k.op_panic,
            "reset": k.op_reset, "inject": k.op_inject, "bench_kick": k.op_bench_kick, "soak_hold": k.op_soak_hold,
        }
        self.client = None  # the connection of the request being answered,
        self.client_pid = 0  # and its client's pid (SO_PEERCRED, when it connected)
        # Each handler's signature and argument types, read at its first request (get_type_hints()
        # of op_kexec takes ~0.25 ms; a soak trial makes two requests)
        self.signatures: dict[str, tuple[inspect.Signature, dict[str, Any]]] = {}

    # -- the boundary ------------------------------------------------------------

    def answer(self, conn, pid: int = 0) -> None:
        """Read one request from ``conn`` (of client ``pid``), run it, send the reply (see the module's
        docstring)."""
        try:
            req = channel.recv_json(conn)
        except (OSError, EOFError):
            return  # the client went away (or its request did not come in time)
        except ValueError as err:
            self._reply(conn, channel.error_reply(BadInput(f"malformed request: {err}")))
            return
        op = req.get("op") if isinstance(req, dict) else None
        self.client, self.client_pid = conn, pid
        try:
            handler, args = self.bind(req)
            reply = {"ok": True, "result": handler(**args)}
        except SmpdError as err:
            reply = channel.error_reply(err)
        except Stop as err:  # the machine goes down: say so to the request's client, then go on stopping
            self._reply(conn, channel.error_reply(CoordinatorGone(
                f"the machine '{self.sup.name}' was stopped by {err} during '{op}'; it is going down")))
            raise
        except Exception as err:  # noqa: BLE001 - the boundary: a bug must not take the machine down
            traceback.print_exc(file=sys.stderr)
            reply = channel.error_reply(InternalError(
                f"internal error in '{op}': {type(err).__name__}: {err}; the machine is still up "
                f"(the coordinator's log has the traceback: set SMPD_COORDINATOR_LOG=FILE before `smpd up`)"))
        finally:
            self.client, self.client_pid = None, 0
        self._reply(conn, reply)
        if reply.get("ok") and op == "down":
            self.sup.stopping = True

    def client_left(self) -> bool:
        """Has the client of the request being answered gone (Ctrl-C, a kill: its end closed)? It
        sends nothing after its request, so anything to read on the connection is that end closing."""
        try:
            return self.client is not None and self.client.poll(0)
        except OSError:
            return True

    def bind(self, req: Any) -> tuple[Callable[..., Any], dict]:
        """The handler for ``req`` and its checked arguments; BadInput otherwise."""
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise BadInput("malformed request: expected {\"op\": NAME, \"args\": {...}}")
        op, args = req["op"], req.get("args", {})
        handler = self.table.get(op)
        if handler is None:
            raise BadInput(f"unknown request '{op}'; known: {', '.join(sorted(self.table))}")
        if not isinstance(args, dict):
            raise BadInput(f"request '{op}': args must be an object")
        if op not in self.signatures:
            self.signatures[op] = (inspect.signature(handler), typing.get_type_hints(handler))
        signature, hints = self.signatures[op]
        try:
            bound = signature.bind(**args)
        except TypeError as err:
            raise BadInput(f"request '{op}': {err}") from None
        for name, value in bound.arguments.items():
            if not _is(value, hints.get(name, Any)):
                raise BadInput(f"request '{op}': argument '{name}' is {value!r}, not {hints[name]}")
        return handler, bound.arguments

    @staticmethod
    def _reply(conn, reply: dict) -> None:
        try:
            channel.send_reply(conn, reply)
        except OSError as err:
            print(f"smpd-coord: the client left before its reply ({err})", file=sys.stderr)

    # -- the machine's own ops (the kernel's are smpd.daemon.kernel_ops) ---------------

    def _cpus_arg(self, text: str) -> list[int]:
        return cpulist.parse(text, self.sup.ncpus)

    def _require_alive(self, cpus: list[int]) -> None:
        require_alive(self.sup, cpus)

    def op_offline(self, cpus: str) -> dict:
        """cpu_down() for each online CPU of the list: play_dead() into mwait_play_dead()."""
        wanted = self._cpus_arg(cpus)
        if 0 in wanted:
            raise BadInput("CPU 0 is the boot CPU (and the kexec CPU) and cannot go offline; "
                           "name CPUs 1-%d" % (self.sup.ncpus - 1))
        require_running_kernel(self.sup, "CPU hotplug")
        self._require_alive(wanted)
        todo = [c for c in wanted if self.sup.seg.cb(c, "hotplug") == L.Hotplug.ONLINE]
        soakhold.drop_if_users_choice(self.sup)  # the user's own offline set now
        t0 = time.monotonic_ns()
        self.sup.ipi_all(todo, L.Ipi.CPU_DOWN, self.sup.ipi_timeout_s + 0.002 * len(todo), "offline")
        return {"offlined": todo, "already_offline": [c for c in wanted if c not in todo],
                "ms": (time.monotonic_ns() - t0) / 1e6}

    def op_online(self, cpus: str) -> dict:
        """INIT, then SIPI, to each offline CPU of the list; smp_callin() clears mwait_cpu_dead.
        Under nosmt, cpu_up() refuses an SMT sibling this kernel has booted once (EPERM), and one
        it never booted (maxcpus) comes up once and parks in mwait_play_dead() again (ECANCELED)."""
        wanted = self._cpus_arg(cpus)
        require_running_kernel(self.sup, "CPU hotplug")
        m, seg = self._map(), self.sup.seg
        if refused := [c for c in wanted if m.boot.smt_sibling(c) and seg.cb(c, "cpu_gen") == m.gen]:
            raise BadInput(f"CPU {cpulist.format_list(refused, grouped=True)} "
                           f"{'is an SMT sibling' if len(refused) == 1 else 'are SMT siblings'} and the running "
                           f"kernel booted with nosmt: cpu_up() refuses {'it' if len(refused) == 1 else 'them'} "
                           f"(cpu_smt_allowed(), cpu_bootable() from v6.7: EPERM); nothing was onlined. Name "
                           f"CPUs that are not siblings (in this machine's topology, the even ones)")
        self._require_alive(wanted)
        todo = [c for c in wanted if c != 0 and seg.cb(c, "hotplug") == L.Hotplug.OFFLINE]
        soakhold.drop_if_users_choice(self.sup)
        t0 = time.monotonic_ns()
        budget = self.sup.ipi_timeout_s + 0.002 * len(todo)
        before = ending_faults(self.sup)
        results = self.sup.ipi_all(todo, L.Ipi.INIT, budget, "online (INIT, SIPI)", then=(L.Ipi.SIPI,))
        self._require_sipi_taken(todo, results, before)
        parked = [c for c in todo if m.boot.smt_sibling(c)]
        kboot.wait_parked(self.sup, parked)
        return {"onlined": [c for c in todo if c not in parked], "parked": parked,
                "already_online": [c for c in wanted if c not in todo], "ms": (time.monotonic_ns() - t0) / 1e6}

    def _require_sipi_taken(self, todo: list[int], results: dict[int, int], before: dict[int, int]) -> None:
        """Raise when a CPU of ``todo`` did not take its SIPI: it was no longer waiting for one, as
        when an MCE reached it between INIT and SIPI (SHUTDOWN: INIT cleared CR4.MCE), which ends
        the machine (end_if_faulted)."""
        refused = kboot.sipi_ignored(self.sup.seg, results)
        if not refused:
            return
        ended = end_if_faulted(self.sup, before, f"`smpd online` started CPU {cpulist.format_list(todo)}")
        raise SmpdError(f"online: {kboot.did_not_take(refused)}"
                        + (f"; the machine {ended}: nothing runs on it until `smpd reset`" if ended else ""))

    def _map(self):
        return Generations(self.sup.seg).current()

    def op_poke(self, target: str, value: int | None = None) -> dict:
        """One u32 write through the bus (the same value again when ``value`` is None)."""
        addr = self._map().resolve(target, self.sup.ncpus, self.sup.seg.geo.npages)
        if value is not None and (type(value) is not int or not 0 <= value <= 0xFFFFFFFF):
            raise BadInput(f"value {value} does not fit a u32 (0..0xffffffff)")
        seg = self.sup.seg
        old = seg.mem_u32(addr)
        new = old if value is None else value
        owner = seg.u16[seg.geo.dir_off // 2 + seg.geo.addr_line(addr)]
        before = ending_faults(self.sup)
        woken = self.sup.bus.write(addr, struct.pack("<I", new))
        symbol = self._map().symbol(addr)
        # The CPU it woke resumes where it slept, which may be memory that is no longer its kernel's.
        ended = (settle_then_end_if_faulted(self.sup, before, f"a write to {symbol} woke CPU {owner - 1}")
                 if woken else None)
        return {"addr": addr, "symbol": symbol, "old": old, "new": new,
                "woken": woken, "woken_cpus": [owner - 1] if woken and owner else [], "ended": ended}

    def op_status(self, brief: bool = False, cpus: str | None = None) -> dict:
        only = None if cpus is None else self._cpus_arg(cpus)
        self.sup.refresh_gone()
        s = status_snapshot(self.sup.seg, brief, only)
        # how it ended (a kexec's outcome, a stray interrupt, a reset cut short): only we know
        s["machine"]["ended_by"] = self.sup.ended_by if s["machine"]["state"] == "ENDED" else None
        hold = soakhold.orphaned(self.sup)  # what a plain reset would restore after a killed soak
        s["machine"]["left_by_soak"] = None if hold is None else {
            "offline": hold.offline, "kernel": hold.kernel, "pid": hold.pid}
        return s

    def op_ping(self) -> dict:
        return {"pid": os.getpid()}


    def op_down(self) -> dict:
        return {"stopping": True}


def _is(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a handler's annotation (str, int, bool, None, list[str], X | None)?"""
    if hint is Any:
        return True
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, p) for p in params)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_is(v, params[0]) for v in value)
    if hint is int:
        return type(value) is int  # not a bool, not a float
    return isinstance(value, hint)
