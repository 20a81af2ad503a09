"""A machine of 1024 CPUs (the scale issue): it comes up, parks, is kicked and goes down, leaving
nothing. Behaviour only: how long each step takes is bench/bench_machine.py's business."""

from __future__ import annotations

import os
import signal

import psutil

from conftest import gone, patient_config, run_smpd, start_smpd, wait_until
from smpd.host import names
from smpd.machine import layout as L
from smpd.machine.segment import Segment

N = 1024


def test_a_1024_cpu_machine_comes_up_parks_is_kicked_and_goes_down_leaving_nothing(machine, tmp_path):
    cfg = patient_config(tmp_path, rounds=1_000_000)
    m = machine(N, "--watch", "adaptive", "--config", str(cfg))
    s = m.status()
    coordinator, janitor = s["machine"]["pid"], s["machine"]["janitor_pid"]
    assert s["machine"]["cpus"] == N and s["machine"]["online"] == N
    assert {c["state"] for c in s["cpus"]} == {"RUNNING"}
    pids = [c["pid"] for c in s["cpus"][1:]]
    assert len(set(pids)) == N - 1 and all(psutil.Process(p).name() == f"smpd-cpu{i}" for i, p in enumerate(pids, 1))

    m.request("offline", cpus=f"1-{N - 1}", timeout_s=300)

    def all_parked():
        cpus = m.status()["cpus"][1:]
        return all(c["state"] == "MWAIT" and c["monitor"]["armed"] for c in cpus) or None

    wait_until(all_parked, 120, "every CPU but CPU 0 parked in mwait_play_dead()")
    r = m.request("kick", timeout_s=300)
    assert r["kick"]["stuck"] == [] and len(r["kick"]["cpus"]) == N - 1, r["kick"]["stuck"]
    assert all(e["acknowledged"] for e in r["kick"]["cpus"].values())
    cpus = m.status()["cpus"][1:]
    assert {c["state"] for c in cpus} == {"HLT"}
    assert {c["mwait_cpu_dead"]["status"] for c in cpus} == {L.CPUDEAD_MWAIT_KEXEC_HLT}

    # Many CPUs: the human status lists the CPUs of each state, without a cell for each, and the
    # CPUs of each interrupt, every one of them (an NMI ends HLT; the CPU halts again).
    m.request("inject", kind="nmi", cpus=f"2,{N - 24}")
    out = run_smpd("status", name=m.name).stdout
    assert f"HLT            CPU 1-{N - 1}" in out and "RUNNING        CPU 0" in out
    assert f"NMI            taken by CPU 2,{N - 24}" in out
    assert "RUN=RUNNING" not in out  # the grid's legend: no grid

    m.down()
    # `smpd down` returns once the coordinator is gone, its segment with it (the fixture's own
    # clean-up would hide a segment left behind, so look now); every CPU process it killed and
    # reaped, and its janitor, are gone too.
    assert not os.path.exists(names.segment_path(m.name))
    assert gone(coordinator)
    wait_until(lambda: all(gone(p) for p in [janitor, *pids]) or None, 30, "the janitor and every CPU process gone")


def test_a_down_stopped_once_its_coordinator_answered_says_the_machine_goes_down_without_it(machine):
    """`smpd down` then waits for the coordinator to kill its CPU processes (~1 s for 1023 here): a
    Ctrl-C there stops the command, not the shutdown, and the command says so (it said only
    "stopped by SIGINT"). Up to three machines, until one such stop lands while the shutdown is
    still on (it is: the coordinator's state is STOPPING, and the command has read its answer)."""
    said = []
    for _ in range(3):
        m = machine(N, "--watch", "adaptive")
        coordinator = m.status()["machine"]["pid"]
        seg = Segment.attach(names.segment(m.name))
        try:
            p = start_smpd("down", name=m.name)
            wait_until(lambda: seg.hdr("state") == L.MachineState.STOPPING or p.poll() is not None, 60,
                       "the coordinator to answer `down`")
            wait_until(lambda: p.poll() is not None or not psutil.Process(p.pid).net_connections("unix"), 60,
                       "`down` to have read the answer")
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            seg.close()
        wait_until(lambda: gone(coordinator) and not os.path.exists(names.segment_path(m.name)), 60,
                   "the machine to go down without its command")
        if p.returncode == 130:
            said.append(err.strip())
            break
        assert p.returncode == 0, err  # the shutdown was over before the stop came: once more
    assert said == [f"Error: stopped by SIGINT; machine '{m.name}' is going down: its coordinator was told, and it "
                    f"(or its janitor, should it die) removes the rest by itself; `smpd status --name {m.name}` "
                    f"says when it is gone"], said
