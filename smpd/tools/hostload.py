"""Host load generators for soak runs, started and stopped by smpd.

    cpu:N        N processes in a busy loop
    mem:N        N processes streaming through 64 MiB buffers (memory bandwidth)
    io:N         N processes writing and fsyncing 1 MiB to an unlinked temporary file
    syscall:N    N processes making cheap system calls in a loop
    stress-ng:A  stress-ng with arguments A (commas separate them: stress-ng:--cpu,2);
                 it must come last, and stress-ng must be installed

Items are comma-separated: ``cpu:4,mem:1``. Every generator dies with the process
that started it (PR_SET_PDEATHSIG), so a SIGKILLed soak leaves no load behind;
``stop()`` ends them on every other path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field

import multiprocess

from smpd.host.proc import die_with_parent, set_process_name
from smpd.tools.hwfloor import TOOL_PATH
from smpd.errors import BadInput
from smpd.inputs import ascii_int

KINDS = ("cpu", "mem", "io", "syscall")
FORM = "comma-separated cpu:N, mem:N, io:N, syscall:N (N 1..64), and last stress-ng:ARGS; e.g. cpu:4,mem:1"


def _stress_ng() -> str | None:
    """stress-ng from the system's directories (TOOL_PATH, as hwfloor's compiler), never from the
    caller's PATH, where a directory another user can write would run their program as us."""
    return shutil.which("stress-ng", path=TOOL_PATH)


_ctx = multiprocess.get_context("fork")


@dataclass
class LoadSpec:
    counts: dict[str, int] = field(default_factory=dict)
    stress_ng: list[str] | None = None

    def text(self) -> str:
        parts = [f"{k}:{n}" for k, n in self.counts.items()]
        if self.stress_ng is not None:
            parts.append("stress-ng:" + ",".join(self.stress_ng))
        return ",".join(parts) or "none"


def parse(spec: str | None) -> LoadSpec:
    out = LoadSpec()
    if spec is None or spec.strip() in ("", "none"):
        return out
    head, sep, stress = spec.partition("stress-ng:")
    if sep:
        if head and not head.endswith(","):
            raise BadInput(f"--host-load '{spec}' is malformed; expected {FORM}")
        args = [a for a in stress.split(",") if a]
        if not args:
            raise BadInput(f"--host-load '{spec}': stress-ng needs arguments, e.g. stress-ng:--cpu,2")
        if _stress_ng() is None:
            raise BadInput(f"--host-load stress-ng:... needs stress-ng in {TOOL_PATH}, which is not installed "
                           "(apt-get install stress-ng), or use cpu:N, mem:N, io:N, syscall:N")
        out.stress_ng = args
        head = head.rstrip(",")
    for item in filter(None, head.split(",")) if head else []:
        kind, colon, n = item.partition(":")
        count = ascii_int(n)
        if kind not in KINDS or not colon or count is None or not 1 <= count <= 64:
            raise BadInput(f"--host-load '{spec}': item '{item}' is not valid; expected {FORM}")
        if kind in out.counts:
            raise BadInput(f"--host-load '{spec}': '{kind}' is given twice")
        out.counts[kind] = count
    return out


def _generator(kind: str, parent: int) -> None:
    die_with_parent(parent)
    set_process_name(f"smpd-load-{kind}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if kind == "cpu":
        while True:
            pass
    if kind == "mem":
        buf = bytearray(64 << 20)
        src = bytes(64 << 20)
        while True:
            buf[:] = src
    if kind == "syscall":
        while True:
            os.getppid()
            os.stat("/")
    if kind == "io":
        # An unlinked temporary file: real writes and fsyncs, and nothing left on disk
        # however the generator dies.
        chunk = os.urandom(1 << 20)
        with tempfile.TemporaryFile(prefix="smpd-load-io-") as f:
            while True:
                f.seek(0)
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())


class HostLoad:
    """The running generators of one LoadSpec."""

    def __init__(self, spec: LoadSpec):
        self.spec = spec
        self.procs: list = []
        self.stress: subprocess.Popen | None = None
        self.stress_err = None

    def start(self) -> None:
        try:
            for kind, n in self.spec.counts.items():
                for _ in range(n):
                    p = _ctx.Process(target=_generator, args=(kind, os.getpid()), daemon=True)
                    p.start()
                    self.procs.append(p)
            if self.spec.stress_ng is not None:
                self.stress_err = tempfile.TemporaryFile()  # unlinked: a pipe could fill and block it
                tool = _stress_ng()
                if tool is None:  # (gone since the arguments were checked: never a PATH lookup)
                    raise BadInput(f"--host-load stress-ng:...: stress-ng is no longer in {TOOL_PATH}")
                self.stress = subprocess.Popen([tool, *self.spec.stress_ng], stdout=subprocess.DEVNULL,
                                               stderr=self.stress_err, preexec_fn=die_with_parent)
                try:  # bad arguments make stress-ng leave at once: say so, not run unloaded
                    self.stress.wait(0.5)
                except subprocess.TimeoutExpired:
                    pass
                self.check()
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        """Raise if stress-ng has exited: the run would go on without the load it claims."""
        if self.stress is not None and self.stress.poll() is not None:
            self.stress_err.seek(0)
            err = self.stress_err.read().decode(errors="replace").strip().splitlines()[-1:]
            code = self.stress.returncode
            self.stress = None
            raise BadInput(f"stress-ng {' '.join(self.spec.stress_ng)} exited with status {code}"
                           + (f": {err[0]}" if err else ""))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs] + ([self.stress.pid] if self.stress else [])

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
        self.procs.clear()
        if self.stress is not None:
            try:
                self.stress.send_signal(signal.SIGINT)
                self.stress.wait(10)
            except subprocess.TimeoutExpired:
                self.stress.kill()
                self.stress.wait(5)
            self.stress = None
