"""Fixtures: a leak check around every test, machine names of this run, a CLI runner, machines.

Every test runs real processes over a real segment; the autouse ``no_leaks``
fixture then proves that nothing of ours is left. "Ours" means this test run's,
and nothing else on the host: smpd runs on shared hosts, and a user's machine
(or another test run's) must survive a full test run (test_trust proves it).

* Segments: only /dev/shm entries of this uid whose machine name starts with this
  run's prefix (every machine the tests make is named ``machine_name`` or
  ``run_name``).
* Processes: only processes named smpd-* whose environment carries this run's
  token (SMPD_TEST_RUN, set below and inherited by everything the tests start),
  so even an orphan whose coordinator died is recognised, and nobody else's is.

Waits are bounded polls for a condition, never sleeps standing in for synchronisation.
CLI runs happen in a scratch directory, so nothing a command writes lands in the
repository.
"""

from __future__ import annotations

import atexit
import compileall
import contextlib
import fcntl
import itertools
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import psutil
import pytest

from smpd.machine import hotpath
from smpd.tools import lifecycle
from smpd.host import names, trust
from smpd.host.proc import die_with_parent
from smpd.machine import layout as L
from smpd.machine.segment import Segment

LEAK_BOUND_S = 15.0  # a loaded 2-core CI box may take a while to reap 64 processes
SWEEPS_WAIT_S = 600.0  # longer than any one test of the files that take sweeps_alone
_counter = itertools.count()

RUN_TOKEN = secrets.token_hex(3)
RUN_PREFIX = f"t{RUN_TOKEN}"  # every machine of this run is named RUN_PREFIX-...
os.environ["SMPD_TEST_RUN"] = RUN_TOKEN  # a fresh token even in a run started by a test
SCRATCH = tempfile.mkdtemp(prefix="smpd-tests-")  # the CLI's working directory in tests
_SCRATCH_OWNER = os.getpid()  # not a child forked by a test, which runs these exit handlers too
atexit.register(lambda: os.getpid() == _SCRATCH_OWNER and shutil.rmtree(SCRATCH, ignore_errors=True))  # no session
os.environ.setdefault("SMPD_TEST_SWEEPS_LOCK", os.path.join(SCRATCH, "sweeps.lock"))  # sweeps_alone
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_name(label: str = "") -> str:
    """A machine name of this run (the leak check looks at these and nothing else)."""
    return f"{RUN_PREFIX}-{label}{next(_counter)}"


@contextlib.contextmanager
def scratch_segment(label: str, geo: L.Geometry = L.Geometry(4, 16)):
    """A segment of this run's with this process as its coordinator (no machine, no CPU process),
    closed and unlinked after."""
    seg = Segment.create(names.segment(run_name(label)), geo, os.getpid(), trust.start_ticks(os.getpid()))
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


def in_forked_child(steps: Callable[[], object]):
    """``steps()`` run in a forked child of this process, its answer pickled back here. The child
    never returns into pytest, nor outlives it (PR_SET_PDEATHSIG); what it raises fails the test
    here, its repr said."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            die_with_parent(os.getppid())
            answer = ("ok", steps())
        except BaseException as err:  # noqa: B036 - whatever happened, said to the test
            answer = ("raised", repr(err))
        try:
            os.write(w, pickle.dumps(answer))
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            how, answer = pickle.loads(f.read() or pickle.dumps(("died", None)))
    finally:
        os.waitpid(pid, 0)
    assert how == "ok", (how, answer)
    return answer


def our_segments() -> set[str]:
    head = names.segment(RUN_PREFIX)[1:]
    return {e for e in os.listdir(names.SHM_DIR) if e.startswith(head)}


def of_this_run(p: psutil.Process) -> bool:
    """Started by this test run (its environment carries the run's token), whatever its name."""
    try:
        return p.environ().get("SMPD_TEST_RUN") == RUN_TOKEN
    except psutil.Error:
        return False


def our_processes() -> set[tuple[int, str]]:
    found = set()
    for p in psutil.process_iter(["name", "status"]):
        name = p.info["name"] or ""
        if name.startswith("smpd-") and p.info["status"] != psutil.STATUS_ZOMBIE and of_this_run(p):
            found.add((p.pid, name))
    return found


def pytest_sessionstart(session):
    """The suite starts smpd processes by the hundred (CLI runs, coordinators, templates), each
    importing smpd afresh. Give them the bytecode any install has: pip compiles what it installs,
    and an editable install compiles on first import, except where PYTHONDONTWRITEBYTECODE is set
    (as on some runners): then every process would compile smpd again, ~0.1 s each."""
    compileall.compile_dir(os.path.join(REPO, "smpd"), quiet=1)


@pytest.fixture
def sweeps_alone():
    """For the tests that run `smpd list` (it cleans up every stale machine of this user) and those
    that leave a machine stale on purpose to see it recovered (pytestmark of their files): no other
    such test of this run runs meanwhile, in the other xdist worker. One lock file for the run:
    named by the process that starts the workers, which inherit its environment (a run started
    by a test is given none, and makes its own)."""
    fd = os.open(os.environ["SMPD_TEST_SWEEPS_LOCK"], os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        def taken():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return None

        # Bounded: a test of the other worker that hangs (or a child that outlives its test,
        # holding the lock) fails this one rather than hang it too.
        wait_until(taken, SWEEPS_WAIT_S, "the other worker's test that sweeps or leaves stale machines")
        yield
    finally:
        os.close(fd)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SCRATCH, ignore_errors=True)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its parent (init, for the daemons) has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll ``cond`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


# Both hot paths (smpd.hotpath) run the tests that exercise a CPU's wake-up path;
# the compiled one is skipped, visibly, where pip could not build it.
_COMPILED = pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=hotpath.WHY_NOT or "")


def hot_paths(*watches: str) -> list:
    """Parameters: each hot path, or each (watch, hot path) pair when watches are given."""
    return [pytest.param(hp if not watches else (w, hp), marks=[_COMPILED] if hp == "c" else [],
                         id=hp if not watches else f"{w}-{hp}")
            for hp in ("c", "python") for w in (watches or (None,))]


HOT_PATHS = hot_paths()


@pytest.fixture(autouse=True)
def no_leaks():
    segs_before, procs_before = our_segments(), our_processes()
    yield
    leaks = wait_for_no_leaks(segs_before, procs_before)
    if leaks:
        pytest.fail(f"leaked segments {sorted(leaks[0])} and processes {sorted(leaks[1])}")


def wait_for_no_leaks(segs_before: set[str], procs_before: set) -> tuple[set, set] | None:
    """Wait (bounded) for this run's segments and processes to be back to ``before``; on a
    leak, remove what leaked (so one leak does not fail every later test) and return it."""
    deadline = time.monotonic() + LEAK_BOUND_S
    while time.monotonic() < deadline:
        segs = our_segments() - segs_before
        procs = our_processes() - procs_before
        if not segs and not procs:
            return None
        time.sleep(0.05)
    for pid, _ in procs:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if of_this_run(p):  # checked again right before the signal: pids are recycled
                p.kill()
    for s in segs:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(names.SHM_DIR, s))
    return segs, procs


PATIENT_ROUNDS = 200_000  # x 5 us = 1 s


def patient_config(tmp_path, extra: str = "", rounds: int = PATIENT_ROUNDS) -> str:
    """A config file whose kick waits ``rounds`` x 5 us instead of the kernel's 5 ms, plus ``extra``
    (TOML). For tests of a sequence and its outcomes, not of the kernel's budget: on a loaded 2-core
    box the host may not run a CPU process for 5 ms, and the kick is then STUCK (a host fault, which
    tests/test_mwait.py and the benchmarks cover)."""
    path = tmp_path / f"patient{next(_counter)}.toml"
    path.write_text(f"[kick]\nrounds = {rounds}\n" + extra)
    return str(path)


@pytest.fixture
def machine_name() -> str:
    return run_name()


def smpd_env(name: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: SMPD_NAME only when given, wide columns."""
    env = dict(os.environ)
    env.pop("SMPD_NAME", None)
    if name is not None:
        env["SMPD_NAME"] = name
    env["COLUMNS"] = "160"  # whatever the terminal (or a pytest worker) says: tests read whole lines
    env.update(extra)
    return env


def run_smpd(*args: str, name: str | None = None, check: bool = True, timeout: float = 120,
             **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", SCRATCH)
    r = subprocess.run([sys.executable, "-m", "smpd", *args], capture_output=True, text=True,
                       env=kw.pop("env", None) or smpd_env(name), timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"smpd {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def start_smpd(*args: str, name: str | None = None, **kw) -> subprocess.Popen:
    """`smpd ARGS` in the background, as a user would start it in a terminal."""
    kw.setdefault("cwd", SCRATCH)
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "smpd", *args], stderr=subprocess.PIPE, text=True,
                            env=kw.pop("env", None) or smpd_env(name), **kw)


class Machine:
    """A machine brought up through the CLI, observed through the channel (fast, in-process)."""

    def __init__(self, name: str, cpus: int, *extra: str):
        self.name, self.cpus = name, cpus
        self.up_result = run_smpd("up", "--cpus", str(cpus), *extra, name=name)
        self.live = lifecycle.require(name)

    def status(self) -> dict:
        return self.live.request("status")

    def cpu(self, n: int) -> dict:
        return self.status()["cpus"][n]

    @contextlib.contextmanager
    def segment(self):
        """The machine's segment, attached for a look the channel does not give (event rings,
        mailboxes, memory); closed afterwards."""
        seg = Segment.attach(names.segment(self.name))
        try:
            yield seg
        finally:
            seg.close()

    def request(self, op: str, **args):
        return self.live.request(op, **args)

    def wait_cpu(self, n: int, cond: Callable[[dict], bool], what: str, timeout: float = 10.0) -> dict:
        def check():
            c = self.cpu(n)
            return c if cond(c) else None

        return wait_until(check, timeout, f"CPU{n}: {what}")

    def down(self) -> None:
        run_smpd("down", name=self.name)


@pytest.fixture
def machine(machine_name):
    """Factory: ``machine(cpus, *up_args)``; every machine made is taken down after the test."""
    made: list[Machine] = []

    def make(cpus: int = 4, *extra: str, name: str | None = None) -> Machine:
        m = Machine(name or f"{machine_name}{'abcdefgh'[len(made)]}", cpus, *extra)
        made.append(m)
        return m

    yield make
    for m in made:
        lifecycle.down(m.name)


def segment_path(name: str) -> str:
    return names.segment_path(name)
