"""smpd acts only on what the invoking user provably owns (issue 10's attacks, as a second user).

Each attack is run by a second, unprivileged user (tests/adversary.py) against root's
smpd, and each test asserts that nothing of the victim's is signalled, read or
removed, and that the attacker's entries are left as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import sys

import psutil
import pytest

import adversary
from adversary import needs_root
from conftest import (REPO, Machine, our_processes, our_segments, run_name, run_smpd, scratch_segment, smpd_env,
                      start_smpd, wait_until)
from smpd.daemon import channel
from smpd.machine import layout as L
from smpd.tools import lifecycle
from smpd.host import names, trust
from smpd.errors import CoordinatorGone, NotOurs
from smpd.machine.segment import Segment

pytestmark = [needs_root, pytest.mark.usefixtures("sweeps_alone")]  # conftest: `smpd list`, stale machines


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


def forged_segment(coord_pid: int, coord_start: int, cpus: dict[int, tuple[int, int]], ncpus: int = 4,
                   name: str = "", sid: int = 0) -> bytes:
    """The bytes of a valid smpd segment header (made by smpd itself, under a scratch name),
    naming the given coordinator (of session ``sid``) and CPU processes: what a forger would write."""
    scratch = names.segment(run_name("forge"))
    geo = L.Geometry(ncpus, 16)
    seg = Segment.create(scratch, geo, coord_pid, coord_start)
    try:
        seg.set_hdr("authkey", bytes(32))
        seg.set_hdr("channel", b"f" * 32)
        seg.set_hdr("name", name.encode())
        seg.set_hdr("coordinator_sid", sid)
        for cpu, (pid, start) in cpus.items():
            seg.set_cb(cpu, "pid", pid)
            seg.set_cb(cpu, "start_ticks", start)
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
    start = trust.start_ticks(victim.pid)
    blob = forged_segment(_dead_pid(), 1, {1: (victim.pid, start), 2: (os.getpid(), trust.start_ticks(os.getpid()))})
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
    blob = forged_segment(pid, real.live.start, {})
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


def test_a_client_is_not_held_by_a_squatter_on_a_freed_channel_name(evil, machine):
    """The channel's name is free the moment its coordinator closes it (`down`, a crash), and its
    token is in /proc/net/unix for anyone to read: a squatter that binds it and never accepts held
    a client's connect() for ever. Now the client tries a second at a time, and says the
    coordinator is gone once it is."""
    m = machine(2, "--watch", "adaptive")
    live = m.live
    address = names.socket_address(m.name, live.token)
    with adversary.holding(evil, adversary.squat_when_freed, address):
        run_smpd("down", name=m.name)
        wait_until(lambda: "@" + address[1:] in open("/proc/net/unix").read(), 20, "the squatter bound the name")
        time.sleep(0.2)  # its backlog filled
        result: list = []
        t = threading.Thread(target=lambda: result.append(_outcome(lambda: live.request("status"))), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the client is still held in connect()"
    assert result and isinstance(result[0], CoordinatorGone), result


def test_a_channel_name_taken_while_its_coordinator_goes_down_is_said_so(evil):
    """A coordinator going down closes its channel first, and another user may bind the freed name
    while it tears its CPUs down: the client said the name was held and that `smpd down` cleans up
    a machine whose coordinator died, of a coordinator alive and busy going down (hostile review).
    It says which of the two it is now; it sends nothing either way."""
    address = "\0smpd-test-taken-" + secrets.token_hex(8)
    with adversary.holding(evil, adversary.bind_abstract, address):
        for alive, says in ((True, "its coordinator still runs: the machine is going down"),
                            (False, "`smpd down` cleans up a machine whose coordinator died")):
            with pytest.raises(NotOurs) as err:
                channel.request(address, bytes(32), "status", server_pid=os.getpid(), server_alive=lambda: alive)
            assert f"pid {os.getpid()}" not in str(err.value).split("not by")[0] and str(evil) in str(err.value)
            assert says in str(err.value), str(err.value)


def _outcome(fn):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - the test looks at what it was
        return err


def test_a_forged_segment_with_a_fake_server_answers_nothing(evil, machine_name):
    """Item 3, end to end: the forger's segment names its own server and key; root's commands
    refuse the segment before they look for a socket."""
    blob = forged_segment(os.getpid(), trust.start_ticks(os.getpid()), {})
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
            assert "2 trials, " in r.stdout
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
    """Uid, start time, name and session: a pid alone, even with its true start time, is
    not enough (the words of a segment, even our own, are only numbers)."""
    p = psutil.Process(victim.pid)
    start = trust.start_ticks(victim.pid)
    assert start > 0
    assert not trust.signal_ours(victim.pid, signal.SIGKILL, start, name="smpd-cpu1")
    assert not trust.signal_ours(victim.pid, signal.SIGKILL, start + 1 + trust.START_TOLERANCE_TICKS)
    assert not trust.signal_ours(victim.pid, signal.SIGKILL, start, sid=os.getsid(victim.pid) + 1)
    with adversary.holding(evil, lambda ready: ready(os.getpid())) as theirs:
        their = psutil.Process(theirs["pid"])
        assert not trust.signal_ours(their.pid, signal.SIGKILL, trust.start_ticks(their.pid))
        assert their.is_running()
    assert victim.poll() is None
    assert trust.signal_ours(victim.pid, signal.SIGTERM, start, name=p.name(), sid=os.getsid(victim.pid))
    wait_until(lambda: victim.poll() is not None, what="the victim to take the one signal meant for it")


def test_a_pid_word_beyond_pid_t_names_no_process(victim):
    """A segment's pid words are u32s: one above pid_t's range is no process (os.pidfd_open would
    raise OverflowError, and a stale segment's clean-up with it), never signalled."""
    start = trust.start_ticks(victim.pid)
    for pid in (2**31, 2**32 - 1):
        assert not trust.is_our_process(pid, start)
        assert not trust.signal_ours(pid, signal.SIGKILL, start)
    assert victim.poll() is None


@needs_root
def test_a_set_uid_process_another_user_started_is_not_ours(evil):
    """Hostile review: the identity check looked at the effective uid alone, so another user's
    set-uid program (their `su` behind a link named smpd-coord: euid ours, real uid theirs) passed
    it. Here such a process, made directly (real uid theirs, effective and saved ours), named as
    our CPU process would be: never ours, never signalled."""
    p = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from smpd.host.proc import set_process_name; "
                          f"os.setresuid({evil}, 0, 0); set_process_name('smpd-cpu5'); print(flush=True); "
                          "time.sleep(600)"], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        their = psutil.Process(p.pid)
        assert their.uids()[:2] == (evil, 0) and their.name() == "smpd-cpu5"
        start = trust.start_ticks(p.pid)
        assert not trust.is_our_process(p.pid, start, name="smpd-cpu5", sid=os.getsid(p.pid))
        assert not trust.signal_ours(p.pid, signal.SIGKILL, start, name="smpd-cpu5")
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def _named_process(comm: str) -> subprocess.Popen:
    """A child of this test that names itself ``comm`` and sleeps; returned once named."""
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from smpd.host.proc import set_process_name; "
                          "set_process_name(sys.argv[1]); print(flush=True); time.sleep(600)", comm],
                         stdout=subprocess.PIPE)
    p.stdout.readline()
    return p


def _recovered_as_stale(machine_name: str, blob: bytes) -> None:
    """``blob`` planted as our segment of ``machine_name``: `smpd status` finds it stale, cleans it
    up (smpd.daemon.janitor.clean_stale_segment) and says there is no such machine."""
    path = names.segment_path(machine_name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    r = run_smpd("status", name=machine_name, check=False)
    assert r.returncode == 2 and "no machine named" in r.stderr
    assert not os.path.exists(path)


def test_a_stale_segment_of_our_own_kills_only_its_own_cpu_processes(victim, machine_name):
    """Our own stale segment naming a foreign pid (a bug, a reused pid): cleaned, nothing killed."""
    _recovered_as_stale(machine_name, forged_segment(_dead_pid(), 1, {1: (victim.pid, trust.start_ticks(victim.pid))},
                                                     name=machine_name))
    assert victim.poll() is None


def test_a_stale_segment_of_our_own_kills_the_cpu_processes_that_outlived_their_coordinator(victim, machine_name):
    """CPU processes that outlived their coordinator (no death signal reached them): the next command
    to find its stale segment kills each process the segment names that is ours (our uid, named
    smpd-cpuN for its CPU, started when recorded, in the coordinator's session), unlinks the
    segment, and leaves alone a process of ours named for no CPU of it."""
    survivors = {cpu: _named_process(f"smpd-cpu{cpu}") for cpu in (1, 2)}
    try:
        named = {cpu: (p.pid, trust.start_ticks(p.pid)) for cpu, p in survivors.items()}
        named[3] = (victim.pid, trust.start_ticks(victim.pid))  # ours, same session, but `sleep`, not smpd-cpu3
        _recovered_as_stale(machine_name, forged_segment(_dead_pid(), 1, named, name=machine_name, sid=os.getsid(0)))
        assert [p.wait(10) for p in survivors.values()] == [-signal.SIGKILL, -signal.SIGKILL]
        assert victim.poll() is None
    finally:
        for p in survivors.values():
            p.kill()
            p.wait()


@pytest.mark.parametrize("answer", ["init", "the template", "a child of ours", "a CPU answered twice"])
def test_a_pid_the_template_answers_is_adopted_only_if_it_forked_it_for_that_cpu(answer):
    """The coordinator adopts as a CPU process only what the template forked for that CPU: a child
    of ours, not the template itself nor a pid answered already, named for the CPU. Anything else
    (as a broken or subverted template might answer) ends the batch as CpuLost, never adopted, so
    no liveness check or doorbell is aimed at it. The template's side is played by this test over
    the real socket; its CPU processes are children of this test named as the fork loop names them."""
    import socket

    from smpd.daemon.template import _PAIR, Template
    from smpd.errors import CpuLost

    kids = [_named_process("smpd-cpu1"), _named_process("smpd-cpu2"), _named_process("smpd-janitor")]
    with scratch_segment("adopt") as seg:
        t = Template()
        t.proc = subprocess.Popen(["sleep", "60"])  # what the coordinator kills at the end, as its template
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t.sock = ours
        adopted = []
        second = {"init": (2, 1), "the template": (2, t.proc.pid), "a child of ours": (2, kids[2].pid),
                  "a CPU answered twice": (2, kids[0].pid)}[answer]

        def play_template():
            socket.recv_fds(theirs, 4096, 1)  # the segment handed down
            theirs.recv(4096)  # the request
            theirs.send(_PAIR.pack(1, kids[0].pid))  # CPU 1: a process forked for it
            theirs.send(_PAIR.pack(*second))

        peer = threading.Thread(target=play_template)
        peer.start()
        try:
            with pytest.raises(CpuLost, match=f"answered CPU2 pid {second[1]}, which is not a process it forked"):
                t.fork(seg, {}, {1: None, 2: None}, lambda: None, lambda cpu, pid: adopted.append((cpu, pid)), 5.0)
        finally:
            peer.join(10)
            theirs.close()
            for k in kids:
                k.kill()
                k.wait()
        assert adopted == [(1, kids[0].pid)] and t.proc is None and t.sock is None


def test_a_cpu_process_s_name_read_mid_rename_is_read_again_before_it_is_refused():
    """The kernel copies a process's name without a lock: one read while the fork loop renames a
    child may be neither name. A name that becomes the CPU's within the batch's patience is adopted;
    one that stays another's is not, and uses the patience up: the next name is read once."""
    from smpd.daemon.template import _forked_for

    renaming = subprocess.Popen([sys.executable, "-c", "import sys, time; from smpd.host.proc import set_process_name; "
                                 "set_process_name('smpd-cp'); print(flush=True); time.sleep(0.005); "
                                 "set_process_name('smpd-cpu2'); time.sleep(600)"], stdout=subprocess.PIPE)
    other = _named_process("smpd-cpu3")
    try:
        renaming.stdout.readline()
        patience = [0.05]
        assert _forked_for(2, renaming.pid, None, set(), patience) and 0 < patience[0] < 0.05
        assert not _forked_for(2, other.pid, None, set(), patience) and patience[0] == 0
        assert not _forked_for(3, renaming.pid, None, set(), patience)  # its own name, read once: no patience left
        assert _forked_for(3, other.pid, None, set(), patience)
    finally:
        for p in (renaming, other):
            p.kill()
            p.wait()


def test_a_segment_handed_down_is_mapped_only_if_its_header_fits_its_size():
    """The template maps the segment by the descriptor the coordinator hands it (Segment.inherit):
    a header whose geometry does not fit the segment's size (a same-uid writer's ncpus) is refused,
    as attach() refuses it, before anything is sized from it."""
    from smpd.errors import LayoutMismatch
    from smpd.machine.segment import Segment

    with scratch_segment("inherit") as seg:
        Segment.inherit(seg.name, os.dup(seg.fd)).close()
        seg.set_hdr("ncpus", 4096)
        with pytest.raises(LayoutMismatch, match="does not match its size"):
            Segment.inherit(seg.name, os.dup(seg.fd))


def test_a_segment_of_ours_with_loose_permissions_is_not_trusted(machine_name):
    path = names.segment_path(machine_name)
    blob = forged_segment(_dead_pid(), 1, {})
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
        inner_env = {k: v for k, v in os.environ.items() if k != "SMPD_TEST_SWEEPS_LOCK"}  # this test holds ours
        inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                                "tests/test_lifecycle.py", "-k", "stale or sigkill or leak"],
                               capture_output=True, text=True, cwd=REPO, timeout=300, env=inner_env)
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
    blob = forged_segment(_dead_pid(), 1, {}, name="elsewhere")
    path = names.segment_path(machine_name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    r = run_smpd("status", name=machine_name, check=False)
    assert r.returncode == 2 and "holds machine 'elsewhere'" in _error_line(r)
    run_smpd("down", "--force", name=machine_name)
    assert not os.path.exists(path)


# -- the hostile review's findings: files a user names, as a second user would plant them ----------

def _plant_link(evil: int, target: str, path: str) -> None:
    adversary.run_as(evil, adversary.symlink, target, path)


def _link_to_a_root_file(evil: int, drop: str, secret: str, text: str, link: str) -> tuple[str, str]:
    """A root-only file ``secret`` holding ``text`` in the shared ``drop``, and the attacker's
    link named ``link`` to it: (the file, the link)."""
    victim = os.path.join(drop, secret)
    with open(victim, "w") as f:
        f.write(text)
    os.chmod(victim, 0o600)
    path = os.path.join(drop, link)
    _plant_link(evil, victim, path)
    return victim, path


@pytest.fixture
def drop(evil):
    """A directory both users can write, like /tmp (but ours alone to remove)."""
    import tempfile

    d = tempfile.mkdtemp(prefix="smpd-drop-", dir="/tmp")
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", d])


@pytest.fixture(scope="module")
def parked3():
    m = Machine(run_name("hostile"), 3, "--watch", "adaptive")
    m.request("offline", cpus="1-2")
    yield m
    m.down()


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_outputs_never_follow_a_planted_link(evil, drop, parked3, option):
    victim, out = _link_to_a_root_file(evil, drop, "root-secret", "SECRET\n", "kick.out")
    r = run_smpd("bench", "kick", "--rounds", "5", option, out, name=parked3.name, check=False)
    assert r.returncode == 2 and "is a symbolic link" in _error_line(r)
    assert open(victim).read() == "SECRET\n"


def test_a_link_planted_during_the_bench_is_refused_at_the_write(evil, drop, parked3):
    """The name was free when the run began; the attacker plants a link to a file that does not
    exist yet (root would create it) while the bench runs."""
    out, target = os.path.join(drop, "k.json"), os.path.join(drop, "created-by-root")
    p = start_smpd("bench", "kick", "--duration", "3s", "--json", out, name=parked3.name)
    try:
        wait_until(lambda: parked3.cpu(1)["mwait_entries"] > 3 or p.poll() is not None, 30, "the bench to run")
        _plant_link(evil, target, out)
        _out, err = p.communicate(timeout=60)
    finally:  # a failure here must not leave the bench holding this module's machine for the next tests
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 2 and "is a symbolic link" in err
    assert not os.path.lexists(target)
    kept = re.search(r"the report's JSON is in (\S+) instead", " ".join(err.split()))  # the run not lost
    assert kept and os.stat(kept.group(1)).st_uid == os.geteuid(), err
    os.unlink(kept.group(1))


@needs_root
def test_a_bench_record_is_never_written_through_another_users_link_or_fifo(evil, drop, tmp_path, monkeypatch):
    """Hostile review: every bench's --record was written with a plain open(path, "w"), so root's
    record went through the attacker's link into any file, into theirs, or hung on their FIFO.
    Now a bench refuses such a path before it runs (exit 2, nothing measured); one planted during
    the run is refused at the end, and the record is kept in a new file of ours in $TMPDIR."""
    victim, link = _link_to_a_root_file(evil, drop, "root-secret", "SECRET\n", "rec.json")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_chain.py"), "--record", link],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "is a symbolic link" in r.stderr and not r.stdout, (r.stdout, r.stderr)
    fifo = os.path.join(drop, "rec.fifo")
    adversary.run_as(evil, os.mkfifo, fifo)
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    import record

    monkeypatch.setattr(tempfile, "tempdir", None)  # (TMPDIR read again)
    for planted in (link, fifo):  # planted after the check: refused at the write, the record kept
        rec = record.Record("bench_test")
        rec.add("a figure", "ms", [1.0, 2.0])
        with pytest.raises(SystemExit) as ended:
            rec.finish(planted)
        assert ended.value.code == 2
    assert open(victim).read() == "SECRET\n"
    kept = sorted(tmp_path.glob("smpd-bench_test-record-*.json"))
    assert len(kept) == 2 and all(json.loads(k.read_text())["figures"][0]["median"] == 1.5 for k in kept)


def test_resume_refuses_another_users_soak_file_and_a_link(evil, drop, parked3, tmp_path):
    mine = tmp_path / "mine.jsonl"
    run_smpd("soak", "--trials", "2", "--seed", "1", "--out", str(mine), name=parked3.name)
    theirs = os.path.join(drop, "theirs.jsonl")
    adversary.run_as(evil, adversary.write_file, theirs, mine.read_bytes(), 0o666)
    before = open(theirs, "rb").read()
    r = run_smpd("soak", "--resume", theirs, name=parked3.name, check=False)
    assert r.returncode == 2 and f"belongs to uid {evil}" in _error_line(r)
    assert open(theirs, "rb").read() == before
    link = os.path.join(drop, "link.jsonl")
    _plant_link(evil, str(mine), link)
    size = mine.stat().st_size
    r = run_smpd("soak", "--resume", link, name=parked3.name, check=False)
    assert r.returncode == 2 and "is a symbolic link" in _error_line(r)
    assert mine.stat().st_size == size


def test_the_coordinator_log_never_follows_a_planted_link(evil, drop, machine_name):
    log, target = os.path.join(drop, "coord.log"), os.path.join(drop, "created-by-root")
    _plant_link(evil, target, log)
    env = smpd_env(machine_name, SMPD_COORDINATOR_LOG=log)
    r = run_smpd("up", "--cpus", "2", env=env, check=False)
    assert r.returncode == 2 and "is a symbolic link" in _error_line(r)
    assert not os.path.lexists(target) and not os.path.exists(names.segment_path(machine_name))


@pytest.mark.parametrize("args", [
    ("up", "--config", "{fifo}"), ("soak", "--summary", "{fifo}"), ("soak", "--resume", "{fifo}"),
    ("kexec", "--replay", "{fifo}:0"), ("bench", "kick", "--json", "{fifo}"),
])
def test_a_fifo_never_hangs_a_command(evil, drop, parked3, args):
    fifo = os.path.join(drop, "fifo")
    adversary.run_as(evil, os.mkfifo, fifo)
    r = run_smpd(*(a.format(fifo=fifo) for a in args), name=parked3.name, check=False, timeout=30)
    assert r.returncode == 2 and "not a regular file" in _error_line(r)


@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_a_directory_or_socket_under_our_name_is_one_line_and_breaks_nothing_else(evil, machine_name, kind):
    path = names.segment_path(machine_name)
    if kind == "directory":
        adversary.run_as(evil, os.mkdir, path)
    else:
        adversary.run_as(evil, adversary.bind_unix, path)
    try:
        for args in (("status",), ("up", "--cpus", "2"), ("down", "--force")):
            r = run_smpd(*args, name=machine_name, check=False)
            assert r.returncode == 2 and f"uid {evil}" in _error_line(r), (args, r.stderr)
        r = run_smpd("list")
        assert f"{machine_name}: left alone:" in r.stdout
        r = run_smpd("status", name=run_name("absent"), check=False)
        assert r.returncode == 2 and "no machine named" in _error_line(r)
    finally:
        adversary.run_as(evil, adversary.remove, path)


def test_a_soak_file_cannot_write_to_the_terminal(parked3, tmp_path):
    out = tmp_path / "s.jsonl"
    run_smpd("soak", "--trials", "1", "--seed", "1", "--out", str(out), name=parked3.name)
    text = out.read_text().replace('"host_load":"none"', '"host_load":"\\u001b]0;pwned\\u0007"', 1)
    out.write_text(text)
    r = run_smpd("soak", "--summary", str(out), check=False)
    assert r.returncode == 2 and "control character" in _error_line(r) and "\x1b" not in r.stdout + r.stderr


def test_a_huge_line_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB of zeros, no newline
    r = run_smpd("soak", "--summary", str(big), check=False, timeout=60)
    assert r.returncode == 2 and "over 64 KiB" in _error_line(r)


def test_a_huge_file_of_short_lines_is_read_only_as_far_as_it_is_good(parked3, tmp_path):
    """A valid start, then a newline every MiB for 8 GiB (sparse): reading stops at the first
    line that is not a record, and nothing past it is kept."""
    out = tmp_path / "s.jsonl"
    run_smpd("soak", "--trials", "1", "--seed", "1", "--out", str(out), name=parked3.name)
    with open(out, "r+b") as f:
        f.seek(0, os.SEEK_END)
        for i in range(1, 8 << 10, 512):
            f.seek(i << 20)
            f.write(b"\n")
    for args in (("soak", "--summary", str(out)), ("kexec", "--replay", f"{out}:0")):
        r = run_smpd(*args, name=parked3.name, check=False, timeout=60)
        line = _error_line(r)
        assert r.returncode == 2 and ("line 3 is over 64 KiB" in line or "line 3 is not JSON" in line), r.stderr


def test_an_output_is_never_written_through_a_planted_directory_link(evil, drop, parked3, tmp_path):
    """A symbolic link the attacker made on the way to the file (the hostile review's finding A):
    root's own directory must not receive the output."""
    secret = tmp_path / "rootdir"
    secret.mkdir(mode=0o700)
    (secret / "out.json").write_text("ROOTDATA\n")
    hop = os.path.join(drop, "hop")
    _plant_link(evil, str(secret), hop)
    for args in (("bench", "kick", "--rounds", "3", "--json", f"{hop}/out.json"),
                 ("bench", "kick", "--rounds", "3", "--json", f"{hop}/new.json"),
                 ("soak", "--trials", "1", "--out", f"{hop}/soak.jsonl")):
        r = run_smpd(*args, name=parked3.name, check=False)
        assert r.returncode == 2 and "symbolic link made by" in _error_line(r), r.stderr
    assert (secret / "out.json").read_text() == "ROOTDATA\n" and sorted(os.listdir(secret)) == ["out.json"]


def test_an_output_is_never_written_into_a_directory_another_user_controls(evil, drop, parked3):
    theirs = os.path.join(drop, "theirs")
    adversary.run_as(evil, os.mkdir, theirs, 0o777)
    r = run_smpd("bench", "kick", "--rounds", "3", "--json", f"{theirs}/k.json", name=parked3.name, check=False)
    assert r.returncode == 2 and f"is uid {evil}'s or writable by others" in _error_line(r)
    assert os.listdir(theirs) == []


@pytest.mark.parametrize("target", ["/dev/shm/{seg}", "/proc/sys/kernel/hostname"])
def test_an_output_on_proc_sys_dev_or_shm_is_refused(parked3, target):
    path = target.format(seg=names.segment(parked3.name)[1:])
    before = open(path, "rb").read()
    r = run_smpd("bench", "kick", "--rounds", "3", "--json", path, name=parked3.name, check=False)
    assert r.returncode == 2 and "/proc, /sys, /dev or /dev/shm" in _error_line(r), r.stderr
    assert open(path, "rb").read() == before
    assert parked3.status()["machine"]["state"] == "UP"


@pytest.mark.parametrize("args", [("config", "show", "--config"), ("soak", "--summary")])
def test_inputs_are_not_read_through_another_users_link(evil, drop, args):
    """A link planted in a shared directory to a root file (or to /proc/kmsg, whose read would hang
    and steal the kernel log) is refused by name and owner; nothing is read."""
    _secret, link = _link_to_a_root_file(evil, drop, "root-only.toml", "[machine]\ncpus = 3\n", "config.toml")
    r = run_smpd(*args, link, check=False, timeout=30)
    assert r.returncode == 2 and "is a symbolic link of" in _error_line(r), r.stderr


@pytest.mark.parametrize("args", [("config", "show", "--config"), ("soak", "--summary")])
def test_inputs_are_not_read_from_another_users_file_or_through_a_directory_link(evil, drop, args):
    """The hostile review: a config another user wrote (or a directory link of hers on the way to
    one of ours) turned on a setting root never chose; both are refused, with the owner named."""
    theirs = os.path.join(drop, "theirs.toml")
    adversary.run_as(evil, adversary.write_file, theirs, b"[kernel]\ninit_only_from_boot_cpu = false\n", 0o644)
    r = run_smpd(*args, theirs, check=False, timeout=30)
    assert r.returncode == 2 and "belongs to" in _error_line(r) and "copy it" in _error_line(r), r.stderr
    ours = tempfile.mkdtemp(prefix="smpd-ours-", dir="/tmp")
    try:
        with open(os.path.join(ours, "ours.toml"), "w") as f:
            f.write("[machine]\ncpus = 3\n")
        _plant_link(evil, ours, os.path.join(drop, "dir"))
        r = run_smpd(*args, os.path.join(drop, "dir", "ours.toml"), check=False, timeout=30)
        assert r.returncode == 2 and "is a symbolic link made by" in _error_line(r), r.stderr
    finally:
        shutil.rmtree(ours)


def test_a_wall_clock_step_does_not_make_our_own_machine_look_stale(machine, monkeypatch):
    """psutil's create_time() is the wall-clock boot time *now* plus the start in ticks: a clock
    step (settimeofday, an NTP step, a VM resumed) or a day of NTP slewing moves it. Our processes'
    identity is the start in ticks itself, which nothing moves. Here the step is what psutil
    would report after it (the host's clock is not ours to change): the machine stays ours,
    running and reachable, where it used to be taken for stale and its segment unlinked under
    its live coordinator and CPUs."""
    m = machine(3, "--watch", "adaptive")
    pids = [c["pid"] for c in m.status()["cpus"]]
    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 3600.0)
    cleaned: list[str] = []
    live = lifecycle.probe(m.name, cleaned)
    assert live is not None and not cleaned, cleaned
    assert os.path.exists(names.segment_path(m.name))
    assert [c["pid"] for c in live.request("status")["cpus"]] == pids
    monkeypatch.undo()


def test_a_machine_is_ours_from_every_time_namespace(machine):
    """The kernel shows each reader start times shifted by its time namespace's boot-time offset:
    smpd takes it off, so a command run in another time namespace (unshare -T) sees the machine as
    up, where it used to take it for stale, remove its segment and leave its processes running."""
    if subprocess.run(["unshare", "-T", "--boottime", "1", "true"], capture_output=True).returncode:
        pytest.skip("no time namespaces here (unshare -T failed)")
    m = machine(2, "--watch", "adaptive")
    for offset in ("1", "100000"):
        r = subprocess.run(["unshare", "-T", "--boottime", offset, sys.executable, "-m", "smpd", "status", "--json"],
                           capture_output=True, text=True, env=smpd_env(m.name), cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["machine"]["pid"] == m.status()["machine"]["pid"]
    assert os.path.exists(names.segment_path(m.name))
    inside = subprocess.run(["unshare", "-T", "--boottime", "5000", sys.executable, "-c",
                             f"from smpd.host import trust; print(trust.start_ticks({os.getpid()}))"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert inside.returncode == 0, inside.stderr
    assert abs(int(inside.stdout) - trust.start_ticks(os.getpid())) <= trust.START_TOLERANCE_TICKS


def test_a_bench_runs_smpd_without_the_working_directory_on_its_path(tmp_path, monkeypatch):
    """The bench scripts run `python -P -m smpd` (bench/smpdrun.py): run from a directory another
    user can write, a planted smpd/ there is not what runs, as root or not (hostile review)."""
    planted = tmp_path / "smpd"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('planted')\n")
    (tmp_path / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('planted')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import smpdrun

    for theirs in ("", "/nonexistent-x:", "relative/dir", "/nonexistent-y::/nonexistent-z"):
        monkeypatch.setenv("PYTHONPATH", theirs)  # an empty or relative entry means the working directory
        r = smpdrun.smpd("status", name=run_name("bench"), timeout=60, ok=(2,))  # no such machine: bad input
        assert "no machine named" in r.stderr and not marker.exists(), theirs


def _sockets_of(pid: int) -> list[str]:
    """The socket descriptors process ``pid`` holds now."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # (closed meanwhile)
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [link for link in links if link.startswith("socket:")]


def _stalled_status_client(lc):
    """A client of the machine's own user that asks for the full status and reads nothing yet."""
    import socket
    from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(names.socket_address(lc.name, lc.token))
    conn = Connection(s.detach())
    answer_challenge(conn, lc.authkey)
    deliver_challenge(conn, lc.authkey)
    channel.send_json(conn, {"op": "status", "args": {}})
    return conn


def test_a_client_that_never_reads_its_reply_does_not_wedge_the_coordinator(machine):
    """Clients of the machine's own user ask for the full status of 768 CPUs (~450 KB, more than the
    socket's buffer) and read nothing (a `smpd status --json` stopped with ^Z). The coordinator used
    to sit in its send until such a client exited, every other command failing meanwhile (hostile
    review). Now such a reply goes from a thread of its own: `smpd status` is answered meanwhile, and
    the stalled client, when it reads, gets its whole reply. Past channel.REPLY_SENDERS of them, the
    next is sent in the serving loop under REPLY_STALL_S: that one is cut off, the coordinator free."""
    m = machine(768, "--watch", "adaptive")
    lc = lifecycle.require(m.name)
    stalled = []
    try:
        for _ in range(channel.REPLY_SENDERS + 1):
            stalled.append(_stalled_status_client(lc))
            time.sleep(0.2)  # answered (its reply waiting in a thread, or for the last, in the loop)
        r = run_smpd("status", name=m.name, check=False)
        assert r.returncode == 0, r.stderr
        for conn in stalled[:-1]:
            reply = json.loads(conn.recv_bytes(1 << 24))
            assert reply["ok"] and len(reply["result"]["cpus"]) == 768
        with pytest.raises((EOFError, OSError)):  # the one past the threads: cut off, not sent whole
            while True:
                stalled[-1].recv_bytes(1 << 24)
    finally:
        for conn in stalled:
            conn.close()


def test_a_janitor_forked_while_a_reply_is_sent_apart_holds_no_client_socket(machine):
    """The coordinator forks a new janitor at once when someone kills its janitor. A fork while a
    reply thread still sends to a client that does not read copied that client's connection into
    the janitor, which held it for the machine's life (the client would never see EOF from a
    coordinator that went). Now the janitor closes every socket it inherited."""
    m = machine(768, "--watch", "adaptive")
    lc = lifecycle.require(m.name)
    first = m.status()["machine"]["janitor_pid"]
    conn = _stalled_status_client(lc)
    try:
        time.sleep(0.2)  # answered: its reply waits in a thread of its own
        os.kill(first, signal.SIGKILL)  # our own machine's janitor
        wait_until(lambda: m.status()["machine"]["janitor_pid"] not in (0, first), timeout=30,
                   what="a new janitor")
        janitor = m.status()["machine"]["janitor_pid"]
        wait_until(lambda: psutil.Process(janitor).name() == "smpd-janitor", timeout=10, what="the janitor named")
        # (it closes them first thing, before it blocks on its pipe)
        wait_until(lambda: not _sockets_of(janitor), timeout=10, what="the janitor to hold no socket")
        reply = json.loads(conn.recv_bytes(1 << 24))
        assert reply["ok"] and len(reply["result"]["cpus"]) == 768
    finally:
        conn.close()
