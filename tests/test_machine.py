"""Bring-up, hotplug and teardown of a machine of real processes over a real segment."""

import json
import os
import stat
import subprocess
import sys

import psutil
import pytest

from conftest import Machine, gone, run_smpd, segment_path, wait_until
from smpd.host import proc, trust
from smpd.machine import events, layout as L


@pytest.mark.parametrize("cpus", [2, 8, 64])
def test_up_brings_every_cpu_online_as_its_own_process_and_down_removes_all(machine_name, cpus):
    m = Machine(machine_name, cpus, "--watch", "adaptive")
    assert f"{cpus} CPUs online" in m.up_result.stdout
    s = m.status()
    assert s["machine"]["cpus"] == cpus and s["machine"]["state"] == "UP"
    assert [c["cpu"] for c in s["cpus"]] == list(range(cpus))
    assert all(c["hotplug"] == "online" and c["state"] == "RUNNING" for c in s["cpus"])
    coord = psutil.Process(s["machine"]["pid"])
    assert coord.name() == "smpd-coord" and s["cpus"][0]["pid"] == coord.pid
    pids = [c["pid"] for c in s["cpus"][1:]]
    assert len(set(pids)) == cpus - 1 and coord.pid not in pids
    for c in s["cpus"][1:]:
        assert psutil.Process(c["pid"]).name() == f"smpd-cpu{c['cpu']}"
    with m.segment() as seg:  # each CPU's identity as the janitor will check it, should we die
        assert all(trust.is_our_process(seg.cb(c, "pid"), seg.cb(c, "start_ticks"), f"smpd-cpu{c}")
                   for c in range(1, cpus))
    mode = os.stat(segment_path(machine_name)).st_mode
    assert stat.S_IMODE(mode) == 0o600
    janitor = s["machine"]["janitor_pid"]

    r = run_smpd("down", name=machine_name)
    assert "is down" in r.stdout
    assert not os.path.exists(segment_path(machine_name))
    for pid in [coord.pid, janitor, *pids]:
        wait_until(lambda: gone(pid), what=f"pid {pid} to exit")


def test_down_is_idempotent(machine_name):
    r = run_smpd("down", name=machine_name)
    assert r.returncode == 0 and "not up" in r.stdout


def test_offline_parks_cpus_in_mwait_play_dead(machine):
    m = machine(8, "--watch", "adaptive")
    r = run_smpd("offline", "1-7", name=m.name)
    assert "CPU 1-7 offline" in r.stdout and "mwait_play_dead()" in r.stdout
    s = m.status()
    assert s["cpus"][0]["state"] == "RUNNING"
    for c in s["cpus"][1:]:
        assert c["hotplug"] == "offline" and c["state"] == "MWAIT"
        md = c["mwait_cpu_dead"]
        assert md["control"] == md["status"] == L.CPUDEAD_MWAIT_WAIT
        # The monitor sits on the dedicated mwait_cpu_dead line (the fix), armed.
        assert c["monitor"]["armed"] and c["monitor"]["addr"] == md["addr"]
        assert c["mwait_entries"] == 1


def test_offline_of_an_offline_cpu_is_a_no_op(machine):
    m = machine(4, "--watch", "adaptive")
    run_smpd("offline", "2", name=m.name)
    r = run_smpd("offline", "1-2", name=m.name)
    assert "CPU 1 offline" in r.stdout and "CPU 2 already offline" in r.stdout
    assert m.cpu(2)["mwait_entries"] == 1


def test_online_brings_cpus_back_through_init_sipi_and_smp_callin_zeroes_mwait_cpu_dead(machine):
    m = machine(10, "--watch", "adaptive")
    run_smpd("offline", "1-9", name=m.name)
    r = run_smpd("online", "5,7-9", name=m.name)
    assert "CPU 5,7-9 online" in r.stdout
    s = m.status()
    for c in s["cpus"]:
        if c["cpu"] in (5, 7, 8, 9):
            assert c["hotplug"] == "online" and c["state"] == "RUNNING"
            assert c["mwait_cpu_dead"]["control"] == c["mwait_cpu_dead"]["status"] == 0
            assert not c["monitor"]["armed"]
            assert c["init"] == 2 and c["sipi"] == 2  # INIT/SIPI at bring-up, and now
        elif c["cpu"] != 0:
            assert c["state"] == "MWAIT" and c["mwait_cpu_dead"]["status"] == L.CPUDEAD_MWAIT_WAIT


def test_init_then_sipi_is_one_mailbox_message_the_ap_takes_in_one_go(machine):
    """The BSP's INIT and SIPI travel as one message: one sequence number, one acknowledgement,
    and the AP counts each IPI once."""
    m = machine(4, "--watch", "adaptive")
    run_smpd("offline", "2-3", name=m.name)
    with m.segment() as seg:
        before = {c: (seg.cb(c, "mbox_seq"), seg.cb(c, "init_count"), seg.cb(c, "sipi_count")) for c in (2, 3)}
        run_smpd("online", "2-3", name=m.name)
        for c in (2, 3):
            seq, init, sipi = before[c]
            assert seg.cb(c, "mbox_seq") == seq + 1 and seg.cb(c, "mbox_ack") == seq + 1
            assert (seg.cb(c, "init_count"), seg.cb(c, "sipi_count")) == (init + 1, sipi + 1)
            assert seg.cb(c, "state") == L.ExecState.RUNNING
    assert {c["state"] for c in m.status()["cpus"][1:]} == {"RUNNING"}


@pytest.mark.parametrize("hot_path, boot", [("c", "smt"), ("c", "nosmt"), ("python", "smt")])
def test_a_cpu_takes_its_first_init_and_sipi_in_its_compiled_wait_unless_its_kernel_parks_it(machine, hot_path, boot):
    """The template teaches each CPU it forks generation 1 (Handoff.learn_boot): on the compiled
    path the bring-up's INIT and SIPI are taken in one step, both events at one clock read, as a
    SIPI into any generation the CPU ran in before; a nosmt sibling's, which that kernel parks at
    boot through play_dead(), is the Python path's (its events apart), and so is every CPU's on a
    machine of the Python hot path. Either way each is counted once and the CPU ends where its
    kernel puts it."""
    m = machine(4, "--hot-path", hot_path, "--boot", boot)
    with m.segment() as seg:
        for c in (1, 2, 3):
            logged, lost = events.read_since(seg, c, 0)
            at = {code: ns for ns, code, _arg in logged if code in (L.Ev.INIT, L.Ev.SIPI)}
            sibling = boot == "nosmt" and c % 2 == 1
            assert lost == 0 and set(at) == {L.Ev.INIT, L.Ev.SIPI}, logged
            assert (at[L.Ev.INIT] == at[L.Ev.SIPI]) == (hot_path == "c" and not sibling), (c, logged)
            assert (seg.cb(c, "init_count"), seg.cb(c, "sipi_count"), seg.cb(c, "cpu_gen")) == (1, 1, 1)
            assert seg.cb(c, "mbox_ack") == seg.cb(c, "mbox_seq") and seg.cb(c, "mbox_result") == 0  # IPI_DONE
            assert (seg.cb(c, "state"), seg.cb(c, "hotplug")) == \
                ((L.ExecState.MWAIT, L.Hotplug.OFFLINE) if sibling else (L.ExecState.RUNNING, L.Hotplug.ONLINE))


@pytest.mark.parametrize("hot_path", ["c", "python"])
def test_a_cpu_process_holds_no_descriptor_but_0_to_2_and_its_pid_and_core_are_in_its_control_block(
        machine, hot_path):
    """The fork loop (compiled, or its Python peer) closes every descriptor a CPU process inherited
    but 0-2: the template's socket, the segment's, the pipe it waited on; its memory is the inherited
    mapping. Its pid and core are in its control block from its adoption (unpinned: -1 there)."""
    m = machine(3, "--hot-path", hot_path)
    with m.segment() as seg:
        for c in (1, 2):
            pid = seg.cb(c, "pid")
            assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]
            assert psutil.Process(pid).name() == f"smpd-cpu{c}" and seg.cb(c, "core") == -1


def test_a_reset_takes_its_offline_cpus_down_in_the_message_that_starts_them(machine):
    """Two mailbox messages per CPU: the power cycle's INIT, then INIT, SIPI and, for a CPU the
    reset leaves offline, CPU_DOWN, acknowledged once it is parked."""
    m = machine(4, "--watch", "adaptive")
    m.request("offline", cpus="3")
    with m.segment() as seg:
        before = {c: (seg.cb(c, "mbox_seq"), seg.cb(c, "init_count"), seg.cb(c, "sipi_count"),
                      seg.cb(c, "mwait_entries")) for c in (1, 2, 3)}
        m.request("reset", offline="2-3")
        for c in (1, 2, 3):
            seq, init, sipi, entries = before[c]
            assert seg.cb(c, "mbox_seq") == seg.cb(c, "mbox_ack") == seq + 2
            assert (seg.cb(c, "init_count"), seg.cb(c, "sipi_count")) == (init + 2, sipi + 1)
            assert seg.cb(c, "mwait_entries") == entries + (c != 1)
    s = m.status()["cpus"]
    assert [(c["state"], c["hotplug"]) for c in s[1:]] == [("RUNNING", "online"), ("MWAIT", "offline"),
                                                         ("MWAIT", "offline")]
    assert s[2]["monitor"]["armed"] and s[3]["monitor"]["armed"]


def test_offline_online_round_trips_repeat_cleanly(machine):
    m = machine(4, "--watch", "adaptive")
    for i in range(1, 6):
        m.request("offline", cpus="1-3")
        assert {c["state"] for c in m.status()["cpus"][1:]} == {"MWAIT"}
        m.request("online", cpus="1-3")
        s = m.status()
        assert {c["state"] for c in s["cpus"][1:]} == {"RUNNING"}
        assert all(c["mwait_entries"] == i and c["mwait_cpu_dead"]["control"] == 0 for c in s["cpus"][1:])


def test_status_json_has_the_documented_shape(machine):
    m = machine(3, "--watch", "adaptive")
    run_smpd("offline", "2", name=m.name)
    s = json.loads(run_smpd("status", "--json", name=m.name).stdout)
    assert set(s) == {"machine", "cpus"}
    mach = s["machine"]
    for key in ("name", "pid", "cpus", "watch", "generation", "uptime_s", "state", "seed", "segment"):
        assert key in mach
    assert mach["name"] == m.name and mach["cpus"] == 3 and mach["watch"] == "adaptive"
    assert mach["generation"] == 1
    c2 = s["cpus"][2]
    assert c2["cpu"] == 2 and c2["hotplug"] == "offline" and c2["state"] == "MWAIT"
    assert set(c2["wakeups"]) == {"write", "interrupt", "ipi", "spurious"}
    assert set(c2["interrupts"]) == {"nmi", "smi", "mce"}


def test_status_human_output_is_a_table_for_few_cpus_and_a_grid_for_many(machine):
    small = machine(4, "--watch", "adaptive")
    out = run_smpd("status", name=small.name).stdout
    assert "HOTPLUG" in out and "mwait_cpu_dead" in out and f"machine '{small.name}'" in out
    big = machine(40, "--watch", "adaptive")
    run_smpd("offline", "1-39", name=big.name)
    out = run_smpd("status", name=big.name).stdout
    assert "MWAIT          CPU 1-39" in out and "RUNNING        CPU 0" in out
    assert "MWT" in out and "HOTPLUG" not in out


def test_status_watch_refreshes_the_given_number_of_times(machine):
    m = machine(2, "--watch", "adaptive")
    r = run_smpd("status", "--watch", "--interval", "0.05", "--count", "3", name=m.name)
    assert r.returncode == 0 and f"machine '{m.name}'" in r.stdout


def test_two_named_machines_run_side_by_side(machine):
    a = machine(3, "--watch", "adaptive")
    b = machine(5, "--watch", "adaptive")
    run_smpd("offline", "1-2", name=a.name)
    assert b.status()["machine"]["online"] == 5
    assert a.status()["machine"]["online"] == 1
    assert a.status()["machine"]["segment"] != b.status()["machine"]["segment"]


def test_pin_places_cpu_processes_on_host_cores(machine):
    cores = sorted(os.sched_getaffinity(0))
    m = machine(4, "--watch", "adaptive", "--pin", "compact")
    s = m.status()
    for c in s["cpus"]:
        assert c["core"] == cores[c["cpu"] % len(cores)]
        if c["cpu"]:
            assert psutil.Process(c["pid"]).cpu_affinity() == [c["core"]]


def test_pin_one_puts_every_process_on_one_core_and_the_machine_counts_one_core(machine):
    """--pin one: the coordinator and every CPU process on the first host core (on a VM, a sleeping
    CPU's wake-up then never waits for an idle vCPU). The machine has that one core for its
    spinners: a spin watch's CPUs yield it to the kicker (spin_yields), and `auto` chooses adaptive
    where two processes would otherwise have fitted two cores."""
    cores = sorted(os.sched_getaffinity(0))
    m = machine(2, "--watch", "spin", "--pin", "one")  # two processes: unpinned, they fit a 2-core host
    s = m.status()
    assert s["machine"]["pin"] == "one" and s["machine"]["spin_yields"] is True, s["machine"]
    for c in s["cpus"]:
        assert c["core"] == cores[0] and psutil.Process(c["pid"]).cpu_affinity() == [cores[0]], c
    m.request("offline", cpus="1")
    assert all(e["acknowledged"] for e in m.request("kick")["kick"]["cpus"].values())
    a = machine(2, "--pin", "one")
    assert a.status()["machine"]["watch"] == "adaptive", a.status()["machine"]["watch_reason"]
    assert "the host has 1" in a.status()["machine"]["watch_reason"]


def test_an_unpinned_cpu_s_core_is_the_one_its_process_last_ran_on(machine):
    """Status reads where an unpinned CPU's process last ran from /proc/PID/stat itself: the same
    figure psutil gives for a process that sleeps (and so stays put), parsed past a name that
    holds spaces and parentheses; a process that is gone has none."""
    m = machine(3, "--watch", "adaptive")
    pids = [c["pid"] for c in m.status()["cpus"][1:]]
    # Each asleep, idle (status wakes none of them): the core psutil reads stays the one status read.
    wait_until(lambda: all(psutil.Process(p).status() == psutil.STATUS_SLEEPING for p in pids) or None, 30,
               "the CPU processes asleep")
    assert [c["core"] for c in m.status()["cpus"][1:]] == [psutil.Process(p).cpu_num() for p in pids]
    odd = subprocess.Popen([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(None).prctl(15, b') 7 8 (x', 0, 0, 0); "
                            "print(flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        odd.stdout.readline()  # named, and about to sleep in read()
        wait_until(lambda: psutil.Process(odd.pid).status() == psutil.STATUS_SLEEPING or None, 30, "it sleeps")
        assert psutil.Process(odd.pid).name() == ") 7 8 (x"
        assert proc.last_core(odd.pid) == psutil.Process(odd.pid).cpu_num()
    finally:
        odd.stdin.close()
        odd.wait(30)
    assert proc.last_core(odd.pid) == -1


def test_same_seed_gives_the_same_kernel_image(machine):
    a = machine(2, "--watch", "adaptive", "--seed", "42")
    b = machine(2, "--watch", "adaptive", "--seed", "42")
    with a.segment() as sa, b.segment() as sb:
        mem = slice(sa.geo.mem_off, sa.geo.size)
        assert sa.buf[mem] == sb.buf[mem]
    assert a.status()["machine"]["seed"] == 42
