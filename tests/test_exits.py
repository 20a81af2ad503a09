"""SIGINT, SIGTERM and SIGHUP mean the same clean stop for every long-running command.

For each of up, demo, kexec, kick, bench kick and soak, and each of the three
signals: the command stops with one line (or, where stopping early is the way to
end it, its report), and nothing is left behind (the autouse leak check). A
machine that a stopped client was talking to is still up and serving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import Machine, gone, in_forked_child, run_name, run_smpd, scratch_segment, start_smpd, wait_until
from smpd.errors import SmpdError
from smpd.tools import lifecycle
from smpd.host import names, proc
from smpd.machine import layout as L

pytestmark = pytest.mark.usefixtures("sweeps_alone")  # conftest: `smpd list`, stale machines

SIGNALS = [pytest.param(s, id=s.name) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def _finish(p, timeout: float = 120) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def slow_kick(tmp_path_factory):
    """A machine whose kick waits 2 s for a CPU that does not answer (a frozen CPU 3), so that
    a kexec or a kick is surely in flight when its client is stopped."""
    cfg = tmp_path_factory.mktemp("exits") / "slow-kick.toml"
    cfg.write_text("[kick]\nrounds = 400000\n")  # x 5 us = 2 s
    m = Machine(run_name("exits"), 4, "--watch", "adaptive", "--config", str(cfg))
    m.request("offline", cpus="1-3")
    yield m
    m.down()


def _connected(pid: int) -> bool:
    """The CLI opens exactly one Unix socket: its request to the coordinator."""
    try:
        return bool(psutil.Process(pid).net_connections(kind="unix"))
    except psutil.Error:
        return False


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("command", ["kexec", "kick"])
def test_a_request_in_flight_stops_in_one_line_and_the_machine_goes_on(slow_kick, command, sig):
    frozen = slow_kick.cpu(3)["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        p = start_smpd(command, name=slow_kick.name)
        wait_until(lambda: _connected(p.pid) or p.poll() is not None, what=f"smpd {command} to send its request")
        p.send_signal(sig)
        _out, err = _finish(p)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert p.returncode == STOPPED[sig], err
    line = _one_error_line(err)
    assert f"stopped by {sig.name}" in line and f"if '{command}' had reached its coordinator" in line
    wait_until(lambda: slow_kick.status()["machine"]["state"] in ("UP", "KEXECED"), timeout=30,
               what="the machine to serve again")
    slow_kick.request("reset")
    assert all(c["state"] == "MWAIT" for c in slow_kick.status()["cpus"][1:])


def test_a_chain_whose_client_is_stopped_ends_after_the_kexec_in_flight(machine):
    """Ctrl-C of `smpd chain --kexecs 100`: the coordinator, whose client has gone, kexecs no further
    than the link in flight, which it finishes: the machine runs that link's kernel, not the 100th."""
    m = machine(16, "--watch", "adaptive")
    m.request("offline", cpus="1-15")
    p = start_smpd("chain", "--kexecs", "100", "--kernel", "6.6", name=m.name)
    wait_until(lambda: _connected(p.pid) or p.poll() is not None, what="smpd chain to send its request")
    time.sleep(1.0)  # a few links (tens of ms each here)
    p.send_signal(signal.SIGINT)
    _out, err = _finish(p)
    assert p.returncode == STOPPED[signal.SIGINT], err
    assert "if 'chain' had reached its coordinator, it stops after the kexec in flight" in _one_error_line(err)
    first = m.status()["machine"]  # answered once the chain has stopped
    time.sleep(0.5)
    last = m.status()["machine"]
    assert first["generation"] == last["generation"] < 101 and last["state"] == "KEXECED", (first, last)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_stop_signal_to_the_coordinator_mid_request_stops_the_machine_and_tells_the_client(machine_name, sig):
    """The coordinator waits for a frozen CPU's answer (`online`): a stop signal then takes the
    machine down, and the request's client is told so in one line; it was answered as an
    internal error, and the machine went on ignoring every later stop signal."""
    m = Machine(machine_name, 3, "--watch", "adaptive")
    m.request("offline", cpus="1")
    s = m.status()
    cpu1, coordinator = s["cpus"][1]["pid"], s["machine"]["pid"]
    os.kill(cpu1, signal.SIGSTOP)
    try:
        p = start_smpd("online", "1", name=m.name)
        with m.segment() as seg:  # the IPI is posted: the coordinator waits for its answer
            wait_until(lambda: seg.cb(1, "mbox_seq") != seg.cb(1, "mbox_ack") or p.poll() is not None,
                       what="the coordinator to post CPU_UP")
        os.kill(coordinator, sig)
        _out, err = _finish(p)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cpu1, signal.SIGCONT)
    assert p.returncode == 1, err
    line = _one_error_line(err)
    assert f"was stopped by {sig.name} during 'online'" in line and "internal error" not in line, line
    wait_until(lambda: not os.path.exists(names.segment_path(machine_name)) and gone(coordinator),
               timeout=30, what="the machine to go down")


def test_a_coordinator_with_a_core_of_its_own_does_not_burn_it_waiting_for_a_frozen_cpu(machine, tmp_path):
    """A machine that fits the host (2 CPUs here) has its coordinator poll IPI answers without
    sleeping, briefly (smpd.machine.mailbox.SPIN_S): a CPU that never answers must not hold that
    core for the whole wait (it held 100% of it for the 10 s of ipi_ack_ms)."""
    cfg = tmp_path / "short-ipi.toml"
    cfg.write_text("[timeouts]\nipi_ack_ms = 2000\n")
    m = machine(2, "--watch", "adaptive", "--config", str(cfg))
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a machine of 2 CPUs fits only a host of 2 cores or more")
    m.request("offline", cpus="1")
    s = m.status()
    cpu1, coordinator = psutil.Process(s["cpus"][1]["pid"]), psutil.Process(s["machine"]["pid"])
    cpu1.suspend()
    try:
        before, t0 = sum(coordinator.cpu_times()[:2]), time.monotonic()
        r = run_smpd("online", "1", name=m.name, check=False)
        used, wall = sum(coordinator.cpu_times()[:2]) - before, time.monotonic() - t0
    finally:
        cpu1.resume()
    assert r.returncode == 1 and "did not acknowledge" in r.stderr, r.stderr
    assert wall >= 2 and used < 0.5 * wall, (used, wall)  # it slept while it waited


@pytest.mark.parametrize("sig", SIGNALS)
def test_bench_kick_stops_and_reports_what_it_measured(machine, sig):
    m = machine(3, "--watch", "adaptive")
    m.request("offline", cpus="1-2")
    p = start_smpd("bench", "kick", "--rounds", "10000000", name=m.name)
    wait_until(lambda: m.cpu(1)["mwait_entries"] > 20 or p.poll() is not None, what="some kick rounds")
    p.send_signal(sig)
    out, err = _finish(p)
    assert p.returncode == 0, err
    assert "(interrupted)" in out and "rtt" in out
    assert [c["state"] for c in m.status()["cpus"][1:]] == ["MWAIT", "MWAIT"]


@pytest.mark.parametrize("sig", SIGNALS)
def test_soak_stops_after_the_trial_in_flight(machine, sig, tmp_path):
    m = machine(3, "--watch", "adaptive")
    m.request("offline", cpus="2")
    out = tmp_path / "s.jsonl"
    p = start_smpd("soak", "--trials", "100000", "--seed", "4", "--out", str(out), name=m.name)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) > 2 or p.poll() is not None,
               timeout=60, what="two trials")
    p.send_signal(sig)
    stdout, err = _finish(p)
    assert p.returncode == 0, err
    assert "interrupted after trial" in stdout
    s = m.status()
    assert s["machine"]["state"] == "UP"
    assert [c["hotplug"] for c in s["cpus"][1:]] == ["online", "offline"]  # as the user had it


def test_a_coordinator_killed_during_a_request_is_said_to_have_died(machine):
    """Killed, it closes its channel on its way out, a moment before it is gone: the command waits
    that moment out and says the coordinator died (it said only that the channel was closed)."""
    m = machine(1024, "--watch", "adaptive")  # many children: a longer way out (each is handed to init)
    m.request("offline", cpus="1-1023", timeout_s=300)
    coordinator = m.status()["machine"]["pid"]
    p = start_smpd("kexec", name=m.name)
    wait_until(lambda: p.poll() is not None or psutil.Process(p.pid).net_connections("unix"), timeout=60,
               what="the kexec to be asked")
    os.kill(coordinator, signal.SIGKILL)
    _, err = _finish(p)
    assert p.returncode == 1 and _one_error_line(err) == (
        f"Error: the coordinator of machine '{m.name}' (pid {coordinator}) died; `smpd down --name {m.name}` "
        f"cleans up what is left"), err
    wait_until(lambda: not os.path.exists(names.segment_path(m.name)), timeout=30, what="the janitor's clean-up")


def test_a_stopped_coordinator_is_said_to_be_stopped_and_down_takes_it_down_at_once(machine):
    """SIGSTOP (or a debugger): a request times out saying so, with the way on; `down` lets the
    coordinator go on (SIGCONT, ours checked first) and shut down as asked, not after 30 s of
    waiting for an answer and 5 more for the SIGTERM it could not take."""
    m = machine(3, "--watch", "adaptive")
    pid = m.status()["machine"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    r = run_smpd("status", name=m.name, check=False)
    assert r.returncode == 1 and _one_error_line(r.stderr) == (
        f"Error: the coordinator of machine '{m.name}' (pid {pid}) is stopped (SIGSTOP, ^Z) and did not answer "
        f"'status'; `kill -CONT {pid}` lets it go on"), r.stderr
    p = start_smpd("down", name=m.name)
    # It goes on at once (before: stopped until the SIGKILL that ended 35 s of waiting for it)
    wait_until(lambda: gone(pid) or not proc.stop_state(pid), timeout=20, what="the coordinator to go on")
    out, err = _finish(p)
    assert p.returncode == 0 and out.strip() == f"machine '{m.name}' is down", err
    assert gone(pid) and not os.path.exists(names.segment_path(m.name))


def test_soak_stopped_before_its_first_trial_says_so_as_the_soak(machine, tmp_path):
    """Its requests before the first trial (the status, the idle kick measurement) are the soak's
    own: a stop while one is in flight says what the soak did, not the internal request's name.
    The coordinator is stopped (SIGSTOP), so the soak waits on its first request when SIGTERM comes."""
    m = machine(3, "--watch", "adaptive")
    out = tmp_path / "s.jsonl"
    coordinator = m.status()["machine"]["pid"]
    os.kill(coordinator, signal.SIGSTOP)
    try:
        p = start_smpd("soak", "--trials", "5", "--seed", "4", "--out", str(out), name=m.name)
        wait_until(lambda: p.poll() is not None or psutil.Process(p.pid).net_connections("unix"), timeout=60,
                   what="the soak to ask its machine")
        p.send_signal(signal.SIGTERM)
        _, err = _finish(p)
    finally:
        os.kill(coordinator, signal.SIGCONT)
    assert p.returncode == 143 and _one_error_line(err) == (
        f"Error: stopped by SIGTERM; the soak stopped before its first trial, nothing written to {out}; machine "
        f"'{m.name}' is up (a reset or the idle kick measurement the soak had asked for ends there first)"), err
    assert not out.exists() and m.status()["machine"]["state"] == "UP"


@pytest.mark.parametrize("sig", SIGNALS)
def test_up_stopped_while_cpus_come_up_leaves_nothing(machine_name, sig):
    p = start_smpd("up", "--cpus", "64", "--watch", "adaptive", name=machine_name)
    wait_until(lambda: os.path.exists(names.segment_path(machine_name)) or p.poll() is not None,
               what="the coordinator to create its segment")
    p.send_signal(sig)
    _out, err = _finish(p)
    if p.returncode == 0:  # the machine won the race and came up first: it must be whole
        assert lifecycle.require(machine_name).request("status")["machine"]["online"] == 64
        lifecycle.down(machine_name)
    else:
        assert p.returncode == STOPPED[sig]
        assert "nothing of it is left" in _one_error_line(err)
    assert not os.path.exists(names.segment_path(machine_name))


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_stop_just_after_up_printed_its_summary_leaves_it_successful(machine_name, sig):
    """A stop in the milliseconds between `up`'s summary and its process's end finds the command
    done: it exits 0, the machine it said is up stays up. Its handlers were restored to the
    default there, and the stop killed it (SIGINT: status -2, no word) after it had succeeded, so
    that a script took the machine it had just made for a failure. A few delays into that end;
    one that lands while the summary is still being written cuts it short, and says the machine is up."""
    for delay in (0, 0.002, 0.005, 0.01, 0.02):
        p = start_smpd("up", "--cpus", "2", name=machine_name)
        try:
            assert p.stdout.read(1), p.communicate()[1]  # the summary's first byte: the machine is up
            time.sleep(delay)
            p.send_signal(sig)
            _out, err = _finish(p)
            assert p.returncode == 0, (delay, p.returncode, err)
            assert not err or err == (f"smpd: machine '{machine_name}' is up; its summary was cut short by "
                                      f"{sig.name}\n"), err
            assert lifecycle.require(machine_name).request("status")["machine"]["online"] == 2
        finally:
            run_smpd("down", name=machine_name, check=False)


@pytest.mark.parametrize("sig", SIGNALS)
def test_up_blocked_on_a_reader_that_does_not_read_still_stops(machine_name, sig):
    """Its stdout a full pipe nobody reads (a terminal paused with ^S is the same): `up` waits in
    its summary's write. It ignored every stop signal there (hostile review of the fix above), so
    only SIGKILL ended it. Now a stop ends it at once: exit 0, the machine up, and said."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 65536)
    os.set_blocking(w, True)
    try:
        p = start_smpd("up", "--cpus", "2", name=machine_name, stdout=w)
    finally:
        os.close(w)
    try:
        def up():
            try:
                return lifecycle.require(machine_name).request("status")["machine"]["online"] == 2
            except SmpdError:  # not yet, or still coming up
                return False

        wait_until(up, timeout=60, what="the machine up")
        wait_until(lambda: psutil.Process(p.pid).status() == psutil.STATUS_SLEEPING, what="up blocked")
        time.sleep(0.5)  # in its summary's write, on the full pipe
        p.send_signal(sig)
        err = p.communicate(timeout=30)[1]
        assert p.returncode == 0, err
        assert err == f"smpd: machine '{machine_name}' is up; its summary was cut short by {sig.name}\n", err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(r)
        run_smpd("down", name=machine_name, check=False)


def test_up_whose_reader_left_says_its_machine_is_up_and_exits_0(machine_name):
    """`smpd up --cpus 2 | true`: the summary meets a pipe with no reader. rich's console ended the
    process with status 1 and no word (hostile review), for a machine that was up. Now: exit 0,
    and stderr says the machine is up."""
    p = start_smpd("up", "--cpus", "2", name=machine_name)
    p.stdout.close()  # the reader leaves before anything is written
    try:
        err = p.stderr.read()
        p.wait(120)
        assert p.returncode == 0, err
        assert f"machine '{machine_name}' is up; its summary could not be written (Broken pipe)" in err
        assert lifecycle.require(machine_name).request("status")["machine"]["online"] == 2
    finally:
        run_smpd("down", name=machine_name, check=False)


def test_a_machine_whose_segment_name_is_removed_goes_down_by_itself(machine_name):
    """`rm /dev/shm/smpd-0-NAME` (or a `down --force` whose SIGTERM the coordinator did not take in
    time) left a machine running with no name: no command could reach it, and its 64 processes ran
    until the host rebooted (found after a review session: one such machine had run for an hour).
    Its coordinator now notices within a second and takes it down; nothing is left."""
    run_smpd("up", "--cpus", "8", "--watch", "adaptive", name=machine_name)
    live = lifecycle.require(machine_name)
    cpus = [c["pid"] for c in live.request("status")["cpus"][1:]]
    os.unlink(names.segment_path(machine_name))
    wait_until(lambda: not lifecycle.is_coordinator(live.pid, live.start), timeout=30, what="the coordinator to go")
    wait_until(lambda: all(gone(p) for p in cpus), timeout=30, what="its CPU processes to go")


def test_up_killed_by_sigkill_while_cpus_come_up_leaves_nothing(machine_name):
    """Nobody is left to clean up for it but the coordinator itself: it sees its `up` gone. (Or the
    machine won the race: its answer was in `up`'s socket before the kill, and it is whole.)"""
    p = start_smpd("up", "--cpus", "64", "--watch", "adaptive", name=machine_name)
    wait_until(lambda: os.path.exists(names.segment_path(machine_name)) or p.poll() is not None,
               what="the coordinator to create its segment")
    live = None
    try:
        live = lifecycle.probe(machine_name)
    except Exception:  # noqa: BLE001 - "being created" is fine: we only want the pid if there is one
        pass
    p.kill()
    _finish(p)

    def removed_or_whole():
        if not os.path.exists(names.segment_path(machine_name)):
            return "removed"
        try:
            s = lifecycle.require(machine_name).request("status")["machine"]
        except SmpdError:  # being made or taken down: not answering yet, or any more
            return None
        return "whole" if s["state"] == "UP" and s["online"] == 64 else None

    if wait_until(removed_or_whole, timeout=30, what="the half-made machine to remove itself") == "whole":
        lifecycle.down(machine_name)
        assert not os.path.exists(names.segment_path(machine_name))
    if live is not None:
        wait_until(lambda: not lifecycle.is_coordinator(live.pid, live.start), what="the coordinator to exit")


@pytest.mark.parametrize("sig", SIGNALS)
def test_demo_stopped_takes_its_machine_down(machine_name, sig):
    p = start_smpd("demo", "--cpus", "32", "--watch", "adaptive", "--name", machine_name)

    def kexecs_begun():  # the demo's twelve kexecs on 32 CPUs take about a second from here
        try:
            live = lifecycle.probe(machine_name)
            return live is not None and live.request("status")["machine"]["kexecs"] >= 1
        except Exception:  # noqa: BLE001 - being created, or busy coming up
            return False

    wait_until(lambda: kexecs_begun() or p.poll() is not None, timeout=60, what="the demo's first kexec")
    p.send_signal(sig)
    out, err = _finish(p)
    assert p.returncode == STOPPED[sig], out + err
    assert f"stopped by {sig.name}" in err.splitlines()[-1]
    assert not os.path.exists(names.segment_path(machine_name))


def test_a_janitor_killed_is_replaced_so_a_coordinator_killed_later_is_cleaned_up(machine_name):
    m = Machine(machine_name, 3, "--watch", "adaptive")
    s = m.status()["machine"]
    os.kill(s["janitor_pid"], signal.SIGKILL)
    new = wait_until(lambda: (j := m.status()["machine"]["janitor_pid"]) != s["janitor_pid"] and j,
                     what="a new janitor")
    # (forked by the coordinator: it bears the coordinator's name until it has set its own)
    wait_until(lambda: psutil.Process(new).name() == "smpd-janitor", what="the new janitor's name")
    os.kill(s["pid"], signal.SIGKILL)
    wait_until(lambda: not os.path.exists(names.segment_path(machine_name)), timeout=30,
               what="the new janitor to remove the segment")


def test_a_full_disk_during_a_soak_is_one_line_and_the_file_stays_valid(machine, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write fails with EFBIG as it would with ENOSPC."""
    import resource

    from smpd.tools import soak

    m = machine(3, "--watch", "adaptive")
    m.request("offline", cpus="1-2")
    out = tmp_path / "full.jsonl"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.RLIM_INFINITY))

    r = run_smpd("soak", "--trials", "1000", "--seed", "2", "--out", str(out), name=m.name, check=False,
                 preexec_fn=small_files)
    assert r.returncode == 1
    line = _one_error_line(r.stderr)
    assert "could not be written" in line and "--resume" in line
    _plan, records, _note = soak.read(str(out))
    assert records and [t["trial"] for t in records] == list(range(len(records)))
    assert m.status()["machine"]["state"] == "UP"


def test_a_full_disk_at_the_start_leaves_no_file(machine, tmp_path):
    import resource

    m = machine(2, "--watch", "adaptive")
    out = tmp_path / "none.jsonl"

    def no_room():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10, resource.RLIM_INFINITY))

    r = run_smpd("soak", "--trials", "3", "--out", str(out), name=m.name, check=False, preexec_fn=no_room)
    assert r.returncode == 1 and "header could not be written" in _one_error_line(r.stderr)
    assert not out.exists()


def _coordinator_of_this_run(name: str) -> psutil.Process | None:
    from conftest import RUN_TOKEN

    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "smpd-coord":
            try:
                if p.environ().get("SMPD_TEST_RUN") == RUN_TOKEN and p.environ().get("SMPD_NAME") == name:
                    return p
            except psutil.Error:
                pass
    return None


def test_a_coordinator_killed_the_moment_its_segment_appears_leaves_nothing(machine_name):
    """Its janitor starts before the segment is made: a blank or half-made segment is removed too.
    `up` says how its coordinator ended: by which signal (a SIGBUS, say, is not an exit status)."""
    p = start_smpd("up", "--cpus", "512", "--watch", "adaptive", name=machine_name)
    path = names.segment_path(machine_name)
    wait_until(lambda: os.path.lexists(path) or p.poll() is not None, what="the segment to appear")
    coord = _coordinator_of_this_run(machine_name)
    assert coord is not None
    coord.kill()
    _, err = _finish(p)
    assert p.returncode == 1
    assert _one_error_line(err).startswith("Error: the coordinator was killed by signal 9 (Killed) before the machine "
                                           "came up"), err
    wait_until(lambda: not os.path.lexists(path), timeout=30, what="the janitor to remove the segment")


def test_a_stop_signal_while_the_command_starts_is_one_line():
    """A signal during the imports (here sent by the import of the CLI itself)."""
    code = ("import builtins, os, signal\n"
            "from smpd.tools import entry\n"
            "real = builtins.__import__\n"
            "def slow(name, *a, **k):\n"
            "    if name == 'smpd.tools.cli':\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = slow\n"
            "entry.main(['list'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and _one_error_line(r.stderr) == \
        "Error: stopped by SIGTERM while starting; nothing was done"


def test_an_output_that_is_a_device_is_refused_before_the_run(machine):
    m = machine(2, "--watch", "adaptive")
    m.request("offline", cpus="1")
    r = run_smpd("bench", "kick", "--json", "/dev/full", name=m.name, check=False)
    assert r.returncode == 2 and "not a regular file" in _one_error_line(r.stderr)
    assert m.cpu(1)["mwait_entries"] == 1  # nothing was kicked


def test_cleaners_of_a_stale_machine_never_remove_the_new_one(machine_name):
    """Several commands find the machine stale at once while a new `up` of the name starts:
    each cleaner removes only the very file it checked, so the new machine keeps its segment."""
    for _ in range(3):
        m = Machine(machine_name, 2, "--watch", "adaptive")
        s = m.status()["machine"]
        os.kill(s["pid"], signal.SIGSTOP)
        os.kill(s["janitor_pid"], signal.SIGKILL)
        os.kill(s["pid"], signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(s["pid"]) or psutil.Process(s["pid"]).status() == "zombie",
                   what="the coordinator to die")
        ps = [start_smpd("status", name=machine_name) for _ in range(4)]
        up = start_smpd("up", "--cpus", "2", "--watch", "adaptive", name=machine_name)
        ps += [start_smpd("list") for _ in range(2)]
        for p in ps:
            _finish(p)
        _finish(up)
        if up.returncode == 0:
            assert lifecycle.require(machine_name).request("status")["machine"]["state"] == "UP"
        lifecycle.down(machine_name)
        assert not os.path.lexists(names.segment_path(machine_name))


def test_a_group_sigkill_of_the_coordinator_leaves_nothing(machine_name):
    """`kill -9 -- -PGID`, `timeout -s KILL`, a service manager's stop: the janitor has left the
    coordinator's process group and session, so it survives to clean up."""
    m = Machine(machine_name, 4, "--watch", "adaptive")
    s = m.status()["machine"]
    assert os.getpgid(s["janitor_pid"]) != os.getpgid(s["pid"])
    os.killpg(os.getpgid(s["pid"]), signal.SIGKILL)
    wait_until(lambda: not os.path.exists(names.segment_path(machine_name)), timeout=30,
               what="the janitor to remove the segment")


def test_down_force_stops_the_coordinator_of_a_segment_it_cannot_read(machine_name):
    """Its header overwritten (by a stray --json, say): --force finds the coordinator that maps it."""
    import mmap

    m = Machine(machine_name, 3, "--watch", "adaptive")
    s = m.status()["machine"]
    with open(names.segment_path(machine_name), "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        mm[0:8] = b"garbage!"
    r = run_smpd("down", name=machine_name, check=False)
    assert r.returncode == 2 and "no smpd magic" in r.stderr
    r = run_smpd("down", "--force", name=machine_name)
    assert "removed segment" in r.stdout
    wait_until(lambda: not lifecycle.is_coordinator(s["pid"], m.live.start), what="the coordinator to stop")
    assert not os.path.exists(names.segment_path(machine_name))


def test_a_coordinator_started_with_sigchld_ignored_still_reaps_its_cpus_itself(machine_name):
    """A parent that ignores SIGCHLD hands that on through exec: the kernel would reap each CPU
    process the moment it died, the coordinator would not see it die (waitpid: ECHILD), and its
    pid would be free for anyone's next process while `smpd down` still held it for a SIGKILL.
    The coordinator restores the default: a CPU killed from outside is found GONE."""
    r = run_smpd("up", "--cpus", "3", "--watch", "adaptive", name=machine_name,
                 preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert r.returncode == 0
    try:
        live = lifecycle.require(machine_name)
        pid = live.request("status")["cpus"][2]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: live.request("status")["cpus"][2]["state"] == "GONE", 30, "CPU 2 found GONE")
        assert live.request("status")["cpus"][2]["pid"] == 0  # never a doorbell at a recycled pid
    finally:
        lifecycle.down(machine_name)


def test_cpu_processes_are_the_coordinators_own_children_and_the_template_is_gone(machine_name):
    """The template forks each CPU process with CLONE_PARENT (smpd.daemon.template): the
    coordinator is its parent, reaps it and holds its pid; the template ends with the bring-up."""
    m = Machine(machine_name, 8, "--watch", "adaptive")
    try:
        s = m.status()
        coordinator = psutil.Process(s["machine"]["pid"])
        children = {p.pid: p.name() for p in coordinator.children()}
        for c in s["cpus"][1:]:
            assert children.get(c["pid"]) == f"smpd-cpu{c['cpu']}"
        assert "smpd-template" not in children.values()
        assert len(children) == 7 + 1  # the CPUs and the janitor
    finally:
        m.down()


def _template_forking(machine_name: str, up: subprocess.Popen) -> psutil.Process:
    """The template of the bring-up ``up`` runs, once it has forked a few CPUs. A CPU process it just
    forked bears its name too until the fork loop renames it: the template is the oldest of them
    (its interpreter started before it forked any)."""
    def template():
        try:
            coordinator = _coordinator_of_this_run(machine_name)
            named = [q for q in coordinator.children() if q.name() == "smpd-template"]
            return min(named, key=lambda q: (q.create_time(), q.pid)) if named else None
        except (psutil.Error, AttributeError):  # not started yet, or gone
            return None

    t = wait_until(lambda: template() or up.poll() is not None, timeout=60, what="the template to start")
    assert t is not True and up.poll() is None, "the bring-up ended before its template was seen"
    wait_until(lambda: len(psutil.Process(t.ppid()).children()) > 10, timeout=60, what="some CPUs forked")
    return t


def test_a_template_stopped_while_it_forks_ends_the_bring_up_within_the_ipi_budget(machine_name, tmp_path):
    """Whoever SIGSTOPs the process CPU processes are forked from (mid-bring-up): the coordinator
    used to wait for its next answer for ever; now it gives up after ipi_ack_ms without one, kills
    it, and `up` says so in one line, leaving nothing."""
    cfg = tmp_path / "stall.toml"
    cfg.write_text("[timeouts]\nipi_ack_ms = 1000\n")
    p = start_smpd("up", "--cpus", "1024", "--watch", "adaptive", "--config", str(cfg), name=machine_name)

    t = _template_forking(machine_name, p)
    t.suspend()
    _out, err = _finish(p)
    assert p.returncode == 1, err
    line = _one_error_line(err)
    assert f"the process CPU processes are forked from (pid {t.pid}) forked" in line, line
    assert "and then none for 1000 ms" in line, line
    assert gone(t.pid)
    assert not os.path.exists(names.segment_path(machine_name))


def test_a_template_killed_while_it_forks_is_one_line_and_leaves_nothing(machine_name):
    """Whoever kills the process CPU processes are forked from (mid-bring-up), `up` says so in one
    line, and the CPUs forked so far go with the machine."""
    p = start_smpd("up", "--cpus", "1024", "--watch", "adaptive", name=machine_name)

    t = _template_forking(machine_name, p)
    t.kill()
    _out, err = _finish(p)
    assert p.returncode == 1, err
    assert f"the process CPU processes are forked from (pid {t.pid}) exited" in _one_error_line(err)
    assert not os.path.exists(names.segment_path(machine_name))


def test_a_coordinator_whose_segment_was_removed_leaves_the_next_machine_of_its_name_alone(machine_name):
    """Machine A's segment is removed under it (by hand, or by a command that took it for stale)
    and machine B comes up under the same name. A's coordinator, stopped, removes only the file it
    made: it used to unlink by name, taking B's segment and leaving B's processes running."""
    a = Machine(machine_name, 3, "--watch", "adaptive")
    a_pid, a_cpus = a.status()["machine"]["pid"], [c["pid"] for c in a.status()["cpus"][1:]]
    os.unlink(names.segment_path(machine_name))
    b = Machine(machine_name, 2, "--watch", "adaptive")
    try:
        os.kill(a_pid, signal.SIGTERM)
        wait_until(lambda: all(gone(p) for p in (a_pid, *a_cpus)), timeout=30, what="machine A to stop")
        assert os.path.exists(names.segment_path(machine_name)), "A's coordinator removed B's segment"
        assert b.status()["machine"]["cpus"] == 2
    finally:
        b.down()


def test_the_janitor_holds_no_socket_of_the_coordinators(machine):
    """The janitor inherits only what it needs (a pipe to notice our death): not the `up` client's
    socket, not the channel, not the template's socketpair, which the coordinator opens before it
    (smpd.daemon.__main__). One it held would outlive the coordinator's end for the machine's life."""
    m = machine(4)
    janitor = psutil.Process(m.status()["machine"]["janitor_pid"])
    assert janitor.name() == "smpd-janitor"
    sockets = [f for f in os.listdir(f"/proc/{janitor.pid}/fd")
               if os.readlink(f"/proc/{janitor.pid}/fd/{f}").startswith("socket:")]
    assert sockets == []


def _sleeping_cpu_processes(*cpus: int) -> dict:
    """A CpuProcess for each of ``cpus``: a child of this process that sleeps (and dies with it)."""
    from smpd.daemon.cpuproc import CpuProcess

    procs = {}
    for cpu in cpus:
        if (kid := os.fork()) == 0:
            proc.die_with_parent(os.getppid())  # and so with the test, whatever becomes of this one
            time.sleep(60)
            os._exit(0)
        procs[cpu] = CpuProcess(name=f"smpd-cpu{cpu}", daemon=True).adopt(kid)
    return procs


def test_a_status_asks_only_after_the_cpus_whose_process_may_have_exited():
    """smpd.daemon.cpuproc.maybe_gone, in a process of its own (whose only children are the test's):
    while every child runs, only a CPU with no process is named; once one has exited unreaped,
    every CPU is; once it is reaped, that CPU stays named; and with no child left at all (one was
    reaped by another wait), every CPU whose Process did not reap it is named, and that process is
    dead to its Process, with its exit code unknown."""
    from smpd.daemon.cpuproc import EXIT_LOST, CpuProcess, maybe_gone

    def steps():
        procs = _sleeping_cpu_processes(1, 2)
        seen = [maybe_gone(procs, [1, 2, 3])]
        os.kill(procs[1].pid, signal.SIGKILL)
        while os.waitid(os.P_PID, procs[1].pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.01)
        seen.append(maybe_gone(procs, [1, 2, 3]))
        procs[1].join(5)
        seen.append(maybe_gone(procs, [1, 2, 3]))
        procs[2].kill()
        procs[2].join(5)
        if (kid := os.fork()) == 0:
            os._exit(0)
        procs[4] = CpuProcess(name="smpd-cpu4", daemon=True).adopt(kid)
        os.waitpid(kid, 0)  # reaped by another wait than its Process's: no child of ours is left
        seen.append(maybe_gone(procs, [1, 2, 4]))
        seen.append([procs[4].is_alive(), procs[4].exitcode, procs[4].reaped()])
        return seen

    seen = in_forked_child(steps)  # whose only children are the ones steps() makes
    assert seen == [[3], [1, 2, 3], [1, 3], [1, 2, 4], [False, EXIT_LOST, True]]


def test_the_liveness_of_many_cpus_asks_only_those_whose_process_may_have_exited():
    """smpd.daemon.cpuproc.alive_among, in a process of its own (whose only children are the
    test's): while every child runs, only a CPU with no process is asked about; once one has
    exited, unreaped, every CPU is asked, and that one is found dead."""
    from smpd.daemon.cpuproc import alive_among

    def steps():
        procs = _sleeping_cpu_processes(1, 2)
        asked = []

        def alive(cpu):
            asked.append(cpu)
            return cpu in procs and procs[cpu].is_alive()

        seen = [(sorted(alive_among(procs, [1, 2, 3], alive)), sorted(asked))]
        os.kill(procs[1].pid, signal.SIGKILL)
        while os.waitid(os.P_PID, procs[1].pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.01)
        asked.clear()
        seen.append((sorted(alive_among(procs, [1, 2, 3], alive)), sorted(asked)))
        procs[2].kill()
        procs[2].join(5)
        return seen

    assert in_forked_child(steps) == [([1, 2], [3]), ([2], [1, 2, 3])]


def test_a_cpu_process_s_pid_leaves_the_segment_while_it_is_still_its_own():
    """The coordinator clears a dead CPU's pid from the segment (where its siblings read it to ring
    its doorbell) before it reaps the process, wherever the reap happens: the CPU is GONE with no
    pid while the process is still a zombie, once, and its exit code is kept."""
    from smpd.daemon.cpuproc import CpuProcess

    with scratch_segment("reap") as seg:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            os._exit(3)
        seg.set_cb(1, "pid", pid)
        seg.set_cb(1, "sleeping", 1)
        seen = []

        def before_reap():
            seen.append((proc.stat_fields(pid)[0], seg.cb(1, "pid"), seg.cb(1, "sleeping"), seg.cb(1, "state")))

        p = CpuProcess(name="smpd-cpu1", daemon=True).adopt(pid, seg, 1, before_reap)
        wait_until(lambda: not p.is_alive() or None, 30, "the child's exit seen")
        assert seen == [(b"Z", 0, 0, L.ExecState.GONE)] and p.exitcode == 3
        p.join(0)
        assert len(seen) == 1
    assert not os.path.exists(f"/proc/{pid}") or psutil.Process(pid).ppid() != os.getpid()  # reaped
