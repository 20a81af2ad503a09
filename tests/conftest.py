"""Fixtures: a leak check around every test, unique machine names, a CLI runner, machines.

Every test runs real processes over a real segment; the autouse ``no_leaks``
fixture then proves that nothing of ours is left: no /dev/shm entry named
smpd*, no live process named smpd-*. Waits are bounded polls for a condition,
never sleeps standing in for synchronisation.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from typing import Callable

import psutil
import pytest

from smpd import hotpath, lifecycle, names
from smpd.segment import Segment

LEAK_BOUND_S = 15.0  # a loaded 2-core CI box may take a while to reap 64 processes
_counter = itertools.count()


def our_segments() -> set[str]:
    return {e for e in os.listdir("/dev/shm") if e.startswith("smpd") or e.startswith("sem.smpd")}


def our_processes() -> set[tuple[int, str]]:
    found = set()
    for p in psutil.process_iter(["name", "status"]):
        name = p.info["name"] or ""
        if name.startswith("smpd-") and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.add((p.pid, name))
    return found


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
    deadline = time.monotonic() + LEAK_BOUND_S
    while time.monotonic() < deadline:
        segs = our_segments() - segs_before
        procs = our_processes() - procs_before
        if not segs and not procs:
            return
        time.sleep(0.05)
    # Clean up so one leak does not fail every later test, then fail this one.
    for pid, _ in procs:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    for s in segs:
        try:
            os.unlink(f"/dev/shm/{s}")
        except OSError:
            pass
    pytest.fail(f"leaked segments {sorted(segs)} and processes {sorted(procs)}")


@pytest.fixture
def machine_name() -> str:
    return f"t{os.getpid() % 100000}-{next(_counter)}"


def run_smpd(*args: str, name: str | None = None, check: bool = True, timeout: float = 120,
             **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SMPD_NAME", None)
    if name is not None:
        env["SMPD_NAME"] = name
    env.setdefault("COLUMNS", "160")
    r = subprocess.run([sys.executable, "-m", "smpd", *args], capture_output=True, text=True,
                       env=env, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"smpd {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


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
    return "/dev/shm" + names.segment(name)
