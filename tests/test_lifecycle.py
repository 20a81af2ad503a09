"""Every exit path leaves nothing behind: down, SIGTERM, Ctrl-C, SIGKILL of the coordinator."""

import json
import os
import signal

import posix_ipc
import pytest

from conftest import Machine, gone, our_processes, run_name, run_smpd, segment_path, start_smpd, wait_until
from smpd.machine import layout as L
from smpd.machine.segment import SegmentBeingCreated
from smpd.tools import lifecycle
from smpd.host import names

pytestmark = pytest.mark.usefixtures("sweeps_alone")  # conftest: `smpd list`, stale machines


def _waitgone(pids: list[int], what: str = "exit") -> None:
    for pid in pids:
        wait_until(lambda: gone(pid), what=f"pid {pid} to {what}")


def _kill_unattended(pids: list[int]) -> None:
    """SIGKILL the janitor and the coordinator at once (`kill -9` of both): nobody is left to
    clean up. The coordinator is stopped first, or it would replace its janitor."""
    os.kill(pids[0], signal.SIGSTOP)
    os.kill(pids[1], signal.SIGKILL)
    _waitgone(pids[1:2], "die")
    os.kill(pids[0], signal.SIGKILL)
    _waitgone(pids, "die")


def _all_pids(m: Machine) -> list[int]:
    s = m.status()
    return [s["machine"]["pid"], s["machine"]["janitor_pid"], *(c["pid"] for c in s["cpus"][1:])]


@pytest.mark.parametrize("cpus", [4, 64])
def test_sigkill_of_the_coordinator_takes_every_cpu_process_and_the_segment_with_it(machine_name, cpus):
    m = Machine(machine_name, cpus, "--watch", "adaptive")
    m.request("offline", cpus=f"1-{cpus // 2}")
    pids = _all_pids(m)
    os.kill(pids[0], signal.SIGKILL)
    _waitgone(pids, "die with the coordinator")
    wait_until(lambda: not os.path.exists(segment_path(machine_name)), timeout=10,
               what="the janitor to unlink the segment")


def test_a_stale_machine_is_recovered_by_down(machine_name):
    m = Machine(machine_name, 4, "--watch", "adaptive")
    pids = _all_pids(m)
    _kill_unattended(pids)
    assert os.path.exists(segment_path(machine_name))  # the stale segment
    r = run_smpd("status", name=machine_name, check=False)
    assert r.returncode == 2 and "no machine named" in r.stderr
    assert not os.path.exists(segment_path(machine_name))


def test_an_error_about_another_machine_leaves_a_stale_one_for_its_own_command(machine_name):
    """A "not up" error lists the machines up now by looking only: a stale machine of another
    name is neither listed nor cleaned up by it; a command naming that machine recovers it."""
    m = Machine(machine_name, 2, "--watch", "adaptive")
    _kill_unattended(_all_pids(m))
    r = run_smpd("status", name=run_name("absent"), check=False)
    assert r.returncode == 2 and machine_name not in r.stderr
    assert os.path.exists(segment_path(machine_name))  # still there: the error changed nothing
    assert "stale" in run_smpd("down", name=machine_name).stdout
    assert not os.path.exists(segment_path(machine_name))


def test_up_over_a_stale_segment_recovers_it(machine_name):
    m = Machine(machine_name, 2, "--watch", "adaptive")
    pids = _all_pids(m)
    _kill_unattended(pids)
    again = Machine(machine_name, 2, "--watch", "adaptive")
    assert again.status()["machine"]["pid"] != pids[0]
    again.down()


def test_sigterm_to_the_coordinator_shuts_the_machine_down_cleanly(machine_name):
    m = Machine(machine_name, 8, "--watch", "adaptive")
    m.request("offline", cpus="1-7")
    pids = _all_pids(m)
    os.kill(pids[0], signal.SIGTERM)
    _waitgone(pids)
    assert not os.path.exists(segment_path(machine_name))


def test_foreground_machine_stops_on_ctrl_c(machine_name):
    p = start_smpd("up", "--cpus", "4", "--watch", "adaptive", "--foreground", name=machine_name)
    try:
        def up():
            if p.poll() is not None:
                pytest.fail(p.stderr.read())
            try:
                live = lifecycle.probe(machine_name)
            except SegmentBeingCreated:  # looked between its creation and its header: not up yet
                return None
            return live if live is not None and live.state() == L.MachineState.UP else None

        live = wait_until(up, what="foreground machine up")
        assert live.request("status")["machine"]["online"] == 4
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "is up" in out and "is down" in out
    assert not os.path.exists(segment_path(machine_name))


def test_ctrl_c_while_up_waits_leaves_no_half_made_machine(machine_name):
    """SIGINT to `smpd up` while the CPUs come up: the daemon is stopped and cleans up."""
    p = start_smpd("up", "--cpus", "200", "--watch", "adaptive", name=machine_name)
    # Wait until the coordinator exists (the segment is there), then interrupt the CLI.
    wait_until(lambda: os.path.exists(segment_path(machine_name)) or p.poll() is not None,
               what="the coordinator to create its segment")
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=120)
    if p.returncode == 0:  # the machine won the race and came up first: it must be whole
        assert lifecycle.probe(machine_name).request("status")["machine"]["online"] == 200
        lifecycle.down(machine_name)
    else:
        assert p.returncode == 130 and "nothing of it is left" in err, err
        assert not os.path.exists(segment_path(machine_name))


def test_the_channel_refuses_a_client_without_the_key(machine):
    m = machine(2, "--watch", "adaptive")
    from smpd.daemon import channel
    from smpd.errors import CoordinatorGone

    with pytest.raises((CoordinatorGone, Exception)) as e:
        channel.request(names.socket_address(m.name, m.live.token), b"\0" * 32, "status", timeout_s=5,
                        server_pid=m.live.pid)
    assert "digest" in str(e.value).lower() or "closed" in str(e.value).lower()
    assert m.status()["machine"]["state"] == "UP"  # and it keeps serving


def test_a_raw_result_is_the_coordinator_s_json_text_and_an_error_is_still_raised(machine):
    """request(raw=True) (what `status --json` prints) is the result as JSON text: the same object
    the parsed request returns; an error reply raises as it does without raw."""
    from smpd.errors import BadInput

    m = machine(4)
    text = m.live.request("status", raw=True, cpus="2,1")
    assert isinstance(text, str)
    raw, parsed = json.loads(text), m.live.request("status", cpus="2,1")
    for s in (raw, parsed):  # what may change between the two requests: the time, a CPU's host core
        del s["machine"]["uptime_s"]
        for c in s["cpus"]:
            del c["core"]
    assert raw == parsed and [c["cpu"] for c in raw["cpus"]] == [1, 2] and raw["machine"]["online"] == 4
    with pytest.raises(BadInput, match="names CPU 9"):
        m.live.request("status", raw=True, cpus="9")


def test_one_command_at_a_time_drives_a_machine_s_kernel(machine, tmp_path):
    """While the machine's lock is held (a soak, or a kexec, its replay of a soak's trial, a chain,
    kick, panic, reset, hotplug, poke, injection or kick benchmark by hand), each of those refuses
    with one line and exit 2, and changes nothing; once it is let go, they run."""
    m = machine(3, "--watch", "adaptive")
    recorded = tmp_path / "recorded.jsonl"
    run_smpd("soak", "--trials", "1", "--out", str(recorded), name=m.name)
    before = m.status()["machine"]["kexecs"], [(c["hotplug"], c["interrupts"]) for c in m.status()["cpus"]]
    with lifecycle.machine_lock(m.name, "the test"):
        for args in (("kick",), ("kexec",), ("kexec", "--replay", f"{recorded}:0"), ("chain", "--kexecs", "1"),
                     ("reset",), ("panic",), ("offline", "1"), ("online", "1"), ("poke", "mwait_cpu_dead[1]"),
                     ("inject", "nmi", "--cpus", "1"), ("bench", "kick", "--rounds", "1")):
            r = run_smpd(*args, name=m.name, check=False)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is busy" in r.stderr, (args, r.stderr)
        r = run_smpd("soak", "--trials", "1", "--out", str(tmp_path / "s.jsonl"), name=m.name, check=False)
        assert r.returncode == 2 and "another smpd soak is running" in r.stderr, r.stderr
        assert not (tmp_path / "s.jsonl").exists()
    assert (m.status()["machine"]["kexecs"], [(c["hotplug"], c["interrupts"]) for c in m.status()["cpus"]]) == before
    run_smpd("kick", name=m.name)


def test_segment_of_another_layout_version_is_refused_and_down_force_removes_it(machine_name):
    from smpd.machine import layout as L

    shm = posix_ipc.SharedMemory(names.segment(machine_name), posix_ipc.O_CREX, mode=0o600, size=L.PAGE)
    try:
        import mmap
        mm = mmap.mmap(shm.fd, L.PAGE)
        mm[0:8] = L.MAGIC
        mm[8:12] = (L.LAYOUT_VERSION + 1).to_bytes(4, "little")
        mm.close()
    finally:
        shm.close_fd()
    for args in (("status",), ("up", "--cpus", "2"), ("down",)):
        r = run_smpd(*args, name=machine_name, check=False)
        assert r.returncode == 2, args
        assert f"layout version {L.LAYOUT_VERSION + 1}" in r.stderr and "--force" in r.stderr
    assert os.path.exists(segment_path(machine_name))  # refused means untouched
    r = run_smpd("down", "--force", name=machine_name)
    assert "removed segment" in r.stdout
    assert not os.path.exists(segment_path(machine_name))


@pytest.mark.parametrize("size", [4097, 8196, 12289])
def test_a_segment_of_ours_of_no_smpd_size_is_refused_and_down_force_removes_it(machine_name, size):
    """Its size not a multiple of 8: the u32/u64 views of it cannot be made. `status` and `list`
    crashed on it (a memoryview TypeError) and `down --force` could not remove it."""
    from smpd.machine import layout as L

    shm = posix_ipc.SharedMemory(names.segment(machine_name), posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        import mmap
        mm = mmap.mmap(shm.fd, size)
        mm[0:8] = L.MAGIC
        mm[8:12] = L.LAYOUT_VERSION.to_bytes(4, "little")
        mm.close()
    finally:
        shm.close_fd()
    r = run_smpd("status", name=machine_name, check=False)
    assert r.returncode == 2 and f"is {size} bytes, not the size of an smpd segment" in r.stderr, r.stderr
    assert "Traceback" not in run_smpd("list", check=False).stderr
    r = run_smpd("down", "--force", name=machine_name)
    assert "removed segment" in r.stdout
    assert not os.path.exists(segment_path(machine_name))


def test_no_process_of_ours_survives_a_test(machine):
    """The leak check itself: it sees our processes while a machine is up."""
    machine(3, "--watch", "adaptive")
    names_seen = {n for _, n in our_processes()}
    assert {"smpd-coord", "smpd-janitor", "smpd-cpu1", "smpd-cpu2"} <= names_seen


def test_a_second_stop_signal_does_not_interrupt_the_shutdown(machine_name):
    m = Machine(machine_name, 6, "--watch", "adaptive")
    pids = _all_pids(m)
    os.kill(pids[0], signal.SIGTERM)
    os.kill(pids[0], signal.SIGHUP)
    os.kill(pids[0], signal.SIGINT)
    _waitgone(pids)
    assert not os.path.exists(segment_path(machine_name))


def test_probing_while_a_machine_comes_up_never_removes_it(machine_name):
    """`status`/`list`/`up` of others look at the segment while it is being created."""
    p = start_smpd("up", "--cpus", "16", "--watch", "adaptive", name=machine_name)
    try:
        while p.poll() is None:
            try:
                lifecycle.probe(machine_name)
            except Exception as err:  # "being created" is the one acceptable answer
                assert "being created" in str(err), err
        assert p.returncode == 0, p.stderr.read()
        live = lifecycle.probe(machine_name)
        assert live is not None and live.request("status")["machine"]["online"] == 16
    finally:
        lifecycle.down(machine_name)
