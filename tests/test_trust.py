"""smpd acts only on what the invoking user provably owns (issue 10's attacks, as a second user).

Each attack is run by a second, unprivileged user (tests/adversary.py) against root's
smpd, and each test asserts that nothing of the victim's is signalled, read or
removed, and that the attacker's entries are left as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys

import psutil
import pytest

import adversary
from adversary import needs_root
from conftest import REPO, Machine, our_processes, our_segments, run_name, run_smpd, smpd_env, wait_until
from smpd.daemon import channel
from smpd.machine import layout as L
from smpd.tools import lifecycle
from smpd.host import names, trust
from smpd.errors import NotOurs
from smpd.machine.segment import Segment

pytestmark = needs_root


@pytest.fixture(scope="module")
def evil() -> int:
    return adversary.unused_uid()


@pytest.fixture
def victim():
    """A process of root's that no smpd command has any business signalling."""
    p = subprocess.Popen(["sleep", "600"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def forged_segment(coord_pid: int, coord_ctime: float, cpus: dict[int, tuple[int, float]], ncpus: int = 4,
                   name: str = "") -> bytes:
    """The bytes of a valid smpd segment header (made by smpd itself, under a scratch name),
    naming the given coordinator and CPU processes: what a forger would write."""
    scratch = names.segment(run_name("forge"))
    geo = L.Geometry(ncpus, 4, 1, 1)
    seg = Segment.create(scratch, geo, coord_pid, coord_ctime)
    try:
        seg.set_hdr("authkey", bytes(32))
        seg.set_hdr("channel", b"f" * 32)
        seg.set_hdr("name", name.encode())
        for cpu, (pid, ctime) in cpus.items():
            seg.set_cb(cpu, "pid", pid)
            seg.set_cb(cpu, "ctime_ms", int(ctime * 1000))
        return bytes(seg.buf)
    finally:
        seg.close()
        seg.unlink()


@contextlib.contextmanager
def planted(evil: int, path: str, how: str, data: bytes = b""):
    """The attacker's entry at ``path`` (a file with ``data``, or a symlink to /etc/passwd); removed after."""
    if how == "link":
        adversary.run_as(evil, adversary.symlink, "/etc/passwd", path)
    else:
        adversary.run_as(evil, adversary.write_file, path, data, 0o644)
    try:
        yield os.lstat(path)
    finally:
        adversary.run_as(evil, adversary.remove, path)


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def _untouched(path: str, before: os.stat_result) -> None:
    after = os.lstat(path)
    assert (after.st_ino, after.st_uid, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_uid, before.st_size, before.st_mtime_ns)


COMMANDS = [("status",), ("up", "--cpus", "2", "--watch", "adaptive"), ("down",), ("down", "--force"),
            ("offline", "1"), ("kexec",)]


def test_a_forged_segment_cannot_make_root_kill_a_process(evil, victim, machine_name):
    """Item 1: a segment with a dead coordinator and a victim as "CPU 1"."""
    ctime = psutil.Process(victim.pid).create_time()
    blob = forged_segment(_dead_pid(), 1.0, {1: (victim.pid, ctime), 2: (os.getpid(), psutil.Process().create_time())})
    path = names.segment_path(machine_name)
    with planted(evil, path, "file", blob) as st:
        r = run_smpd("list", name=machine_name)
        assert f"{machine_name}: left alone:" in r.stdout and f"uid {evil}" in r.stdout
        for args in COMMANDS:
            r = run_smpd(*args, name=machine_name, check=False)
            assert r.returncode == 2, (args, r.stderr)
            line = _error_line(r)
            assert f"belongs to uid {evil}, not to you" in line and "pick another --name" in line, line
        assert victim.poll() is None, "the victim was killed"
        _untouched(path, st)


def test_a_forged_segment_naming_a_live_coordinator_cannot_stop_that_machine(evil, machine):
    """Item 2: `down --name fake` must not SIGTERM the real machine the forgery names."""
    real = machine(2, "--watch", "adaptive")
    pid = real.status()["machine"]["pid"]
    fake = run_name("fake")
    blob = forged_segment(pid, real.live.ctime, {})
    with planted(evil, names.segment_path(fake), "file", blob) as st:
        for args in (("down",), ("down", "--force"), ("status",)):
            r = run_smpd(*args, name=fake, check=False)
            assert r.returncode == 2 and f"uid {evil}" in _error_line(r)
        _untouched(names.segment_path(fake), st)
    assert real.status()["machine"]["pid"] == pid and real.status()["machine"]["state"] == "UP"


def test_a_server_on_the_channel_is_believed_only_if_it_is_the_coordinator(evil, machine):
    """Item 3: a fake server that knows the key (the worst case) gets no request: the client
    checks SO_PEERCRED (uid and the coordinator's pid) before the handshake."""
    real = machine(2, "--watch", "adaptive")
    address = names.socket_address(run_name("evil"), "0" * 32)
    with adversary.holding(evil, adversary.fake_server, address, real.live.authkey.hex()):
        with pytest.raises(NotOurs) as e:
            channel.request(address, real.live.authkey, "status", 5, server_pid=real.live.pid)
    assert f"uid {evil}" in str(e.value) and "sent it nothing" in str(e.value)


def test_a_forged_segment_with_a_fake_server_answers_nothing(evil, machine_name):
    """Item 3, end to end: the forger's segment names its own server and key; root's commands
    refuse the segment before they look for a socket."""
    blob = forged_segment(os.getpid(), psutil.Process().create_time(), {})
    address = names.socket_address(machine_name, "f" * 32)
    with adversary.holding(evil, adversary.fake_server, address, bytes(32).hex()):
        with planted(evil, names.segment_path(machine_name), "file", blob):
            for args in (("status", "--json"), ("kexec", "--json")):
                r = run_smpd(*args, name=machine_name, check=False)
                assert r.returncode == 2 and "forged" not in r.stdout and f"uid {evil}" in _error_line(r)


@pytest.mark.parametrize("how", ["empty", "link"])
def test_a_squatted_segment_name_is_refused_with_its_owner_and_left_alone(evil, machine_name, how):
    """Item 4: an empty file or a symlink to /etc/passwd under root's segment name."""
    path = names.segment_path(machine_name)
    passwd = _sha("/etc/passwd")
    with planted(evil, path, how) as st:
        r = run_smpd("list", name=machine_name)
        assert f"{machine_name}: left alone:" in r.stdout
        for args in COMMANDS:
            r = run_smpd(*args, name=machine_name, check=False)
            assert r.returncode == 2, (args, r.stderr)
            line = _error_line(r)
            assert f"uid {evil}" in line, line
            if how == "link":
                assert "symbolic link" in line
        _untouched(path, st)
    assert _sha("/etc/passwd") == passwd


def test_squatted_socket_names_block_neither_up_nor_soak(evil, machine_name, tmp_path):
    """Item 4: the names smpd once used for its channel and its soak lock, bound by the attacker."""
    old = f"\0smpd-root-{machine_name}"
    new_prefix = f"\0smpd-0-{machine_name}"
    with contextlib.ExitStack() as stack:
        for address in (old, old + "-soak", new_prefix, new_prefix + "-soak"):
            stack.enter_context(adversary.holding(evil, adversary.bind_abstract, address))
        m = Machine(machine_name, 3, "--watch", "adaptive")
        try:
            run_smpd("offline", "1-2", name=machine_name)
            out = tmp_path / "s.jsonl"
            r = run_smpd("soak", "--trials", "2", "--seed", "1", "--out", str(out), name=machine_name)
            assert "2 trials in" in r.stdout
        finally:
            m.down()


def test_another_users_machine_names_are_not_ours(evil, machine_name):
    """Item 5: names are keyed by uid, so another user's segment never looks like ours."""
    assert names.segment(machine_name) != adversary.run_as(evil, names.segment, machine_name)
    theirs = "/dev/shm" + adversary.run_as(evil, names.segment, machine_name)
    with planted(evil, theirs, "file", b"\0" * 4096) as st:
        assert machine_name not in lifecycle.our_machines()
        r = run_smpd("down", name=machine_name)
        assert "is not up; nothing to do" in r.stdout
        _untouched(theirs, st)


def test_a_process_is_signalled_only_if_every_identity_fact_matches(evil, victim):
    """Uid, creation time, name and session: a pid alone, even with its true creation time, is
    not enough (the words of a segment, even our own, are only numbers)."""
    p = psutil.Process(victim.pid)
    ctime = p.create_time()
    assert not trust.signal_ours(victim.pid, signal.SIGKILL, ctime, name="smpd-cpu1")
    assert not trust.signal_ours(victim.pid, signal.SIGKILL, ctime + 1.0)
    assert not trust.signal_ours(victim.pid, signal.SIGKILL, ctime, sid=os.getsid(victim.pid) + 1)
    with adversary.holding(evil, lambda ready: ready(os.getpid())) as theirs:
        their = psutil.Process(theirs["pid"])
        assert not trust.signal_ours(their.pid, signal.SIGKILL, their.create_time())
        assert their.is_running()
    assert victim.poll() is None
    assert trust.signal_ours(victim.pid, signal.SIGTERM, ctime, name=p.name(), sid=os.getsid(victim.pid))
    wait_until(lambda: victim.poll() is not None, what="the victim to take the one signal meant for it")


def test_a_stale_segment_of_our_own_kills_only_its_own_cpu_processes(victim, machine_name):
    """Our own stale segment naming a foreign pid (a bug, a reused pid): cleaned, nothing killed."""
    ctime = psutil.Process(victim.pid).create_time()
    blob = forged_segment(_dead_pid(), 1.0, {1: (victim.pid, ctime)}, name=machine_name)
    path = names.segment_path(machine_name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    r = run_smpd("status", name=machine_name, check=False)
    assert r.returncode == 2 and "no machine named" in r.stderr
    assert not os.path.exists(path)
    assert victim.poll() is None


def test_a_segment_of_ours_with_loose_permissions_is_not_trusted(machine_name):
    path = names.segment_path(machine_name)
    blob = forged_segment(_dead_pid(), 1.0, {})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.chmod(path, 0o666)
    try:
        r = run_smpd("status", name=machine_name, check=False)
        assert r.returncode == 2 and "has mode 0666" in _error_line(r) and "down --force" in _error_line(r)
        assert os.path.exists(path)
    finally:
        r = run_smpd("down", "--force", name=machine_name)
    assert not os.path.exists(path)


def test_a_users_machine_survives_a_test_run():
    """The suite touches only its own run's machines: a user's machine, up before a test run
    (this one runs the lifecycle tests that kill and clean up), is whole after it."""
    name = f"bystander{os.getpid()}"  # not this run's prefix: a user's machine
    env = smpd_env(name)
    env.pop("SMPD_TEST_RUN")
    run_smpd("up", "--cpus", "3", "--watch", "adaptive", env=env)
    try:
        live = lifecycle.require(name)
        before = live.request("status")
        pids = {before["machine"]["pid"], before["machine"]["janitor_pid"], *(c["pid"] for c in before["cpus"])}
        assert not {pid for pid, _ in our_processes()} & pids
        assert not any(name in s for s in our_segments())
        inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/test_lifecycle.py", "-k", "stale or sigkill or leak"],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
        assert inner.returncode == 0, inner.stdout[-3000:]
        after = live.request("status")
        assert after["machine"]["pid"] == before["machine"]["pid"] and after["machine"]["state"] == "UP"
        assert [c["pid"] for c in after["cpus"]] == [c["pid"] for c in before["cpus"]]
        assert all(psutil.pid_exists(pid) for pid in pids)
    finally:
        lifecycle.down(name)


def test_a_second_name_for_a_machines_segment_is_not_trusted(machine):
    """A hard link (fs.protected_hardlinks=0 lets anyone make one) or a rename gives one of our
    segments a name that is not its machine's: `down` of that name must not stop the machine."""
    real = machine(2, "--watch", "adaptive")
    other = run_name("alias")
    os.link(names.segment_path(real.name), names.segment_path(other))
    try:
        r = run_smpd("down", name=other, check=False)
        assert r.returncode == 2 and "2 names (hard links)" in _error_line(r)
    finally:
        os.unlink(names.segment_path(other))
    assert real.status()["machine"]["state"] == "UP"


def test_a_renamed_segment_is_not_that_machines(machine_name):
    blob = forged_segment(_dead_pid(), 1.0, {}, name="elsewhere")
    path = names.segment_path(machine_name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    r = run_smpd("status", name=machine_name, check=False)
    assert r.returncode == 2 and "holds machine 'elsewhere'" in _error_line(r)
    run_smpd("down", "--force", name=machine_name)
    assert not os.path.exists(path)
