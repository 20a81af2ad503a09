"""`smpd soak --cluster` on Ray's own multi-node test cluster: several raylets on this host.

Each node's slot brings up a real machine; the driver writes one file. These tests check
what a campaign promises: every trial number exactly once, each with its node; the same
scenarios (and, where the host did not interfere, the same outcomes) as a single-host run
of the same seed; a node lost mid-run or a SIGKILLed driver loses nothing; and nothing of
any slot's machine is left (the autouse leak check sees every slot: their machines are
named after --name, this run's prefix).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import adversary
from adversary import needs_root
from conftest import REPO, SCRATCH, Machine, run_name, run_smpd, smpd_env

pytest.importorskip("ray", reason="the 'cluster' extra (ray) is in the test extra")

TRIALS = 200
SEED = 7
CPUS = 4
SCENARIO = ("trial", "seed", "park", "offline", "order", "inject")


class RayCluster:
    def __init__(self, nodes: int):
        self.nodes = nodes
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "raycluster.py"), str(nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=SCRATCH)
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("127.0.0.1:"), self.address

    def remove_node(self) -> str:
        self.proc.stdin.write("remove\n")
        self.proc.stdin.flush()
        self.nodes -= 1
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def ray_cluster(request):
    """One cluster per node count, shared by the tests that ask for it (pytest groups them);
    the test that removes a node is the last one of its cluster."""
    c = RayCluster(request.param)
    yield c
    c.close()


def soak_cluster(c: RayCluster, name: str, out: str, *extra: str, trials: int = TRIALS, **kw):
    args = ["soak", "--cluster", c.address, "--cpus", str(CPUS), "--trials", str(trials), "--seed", str(SEED),
            "--out", out, *extra]
    return subprocess.Popen([sys.executable, "-m", "smpd", *args], env=smpd_env(name), cwd=SCRATCH,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def records(path: str) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in open(path)]
    return lines[0], lines[1:]


def written(path: str) -> int:
    try:
        return max(0, sum(1 for _ in open(path)) - 1)
    except OSError:
        return 0


def complete_and_unique(rs: list[dict], trials: int = TRIALS) -> None:
    assert [r["trial"] for r in rs] == list(range(trials))  # in order, each once
    assert all(isinstance(r["node"], str) and isinstance(r["slot"], int) for r in rs)


@pytest.fixture(scope="module")
def single_host():
    """The same seed on one host: a plain `smpd soak` on an 8-CPU machine."""
    m = Machine(run_name("one"), CPUS, "--watch", "adaptive", "--seed", str(SEED))  # as the slots' machines
    out = os.path.join(SCRATCH, f"{m.name}.jsonl")
    try:
        run_smpd("soak", "--trials", str(TRIALS), "--seed", str(SEED), "--out", out, name=m.name, timeout=600)
    finally:
        m.down()
    return records(out)


def matches_one_host(rs: list[dict], one: list[dict]) -> None:
    """The same scenarios as a single-host run of the same seed, and the same outcomes except
    where the host got in the way: a CPU it kept from its kick (STUCK), an interrupt not taken
    in time (said in the notes)."""
    assert [{k: r[k] for k in SCENARIO} for r in rs] == [{k: r[k] for k in SCENARIO} for r in one]
    differ = [(a["trial"], a["outcome"], b["outcome"], a["evidence"][:200], b["evidence"][:200])
              for a, b in zip(rs, one) if a["outcome"] != b["outcome"]
              and not {"STUCK", "CPU_LOST"} & {a["outcome"], b["outcome"]} and not _host_touched(a, b)]
    assert not differ, differ


def _host_touched(*rs: dict) -> bool:
    """The host got in the way: an interrupt not taken in time, or a CPU that missed its kick
    (stuck; what the copy then did to it may rank above STUCK, e.g. a triple fault)."""
    return any("not taken within" in n for r in rs for n in r.get("notes", [])) or \
        any((r.get("kick") or {}).get("stuck") for r in rs)


def started(c: RayCluster, until: int) -> tuple[str, subprocess.Popen]:
    """A campaign of TRIALS trials, once ``until`` of them are in its file: (file, driver)."""
    name = run_name("cl")
    out = os.path.join(SCRATCH, f"{name}.jsonl")
    p = soak_cluster(c, name, out)
    deadline = time.monotonic() + 300
    while written(out) < until and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return out, p


def every_node_ran_trials(c: RayCluster, header: dict, rs: list[dict], nodes: int, stdout: str) -> None:
    assert header["cluster"]["address"] == c.address and header["cpus"] == CPUS
    per_node = {n: sum(r["node"] == n for r in rs) for n in {r["node"] for r in rs}}
    assert len(per_node) == nodes, (per_node, stdout[-2000:])
    assert "per node" in stdout


@pytest.mark.parametrize("ray_cluster", [2], indirect=True)
def test_two_nodes_a_sigkilled_driver_and_resume_run_each_trial_once_as_one_host_would(ray_cluster, single_host):
    """The file a SIGKILLed driver leaves is valid; --resume runs only the missing numbers."""
    out, p = started(ray_cluster, 60)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    _, before = records(out)
    assert 60 <= len(before) < TRIALS
    assert [r["trial"] for r in before] == list(range(len(before)))
    r = run_smpd("soak", "--resume", out, name=os.path.basename(out)[:-len(".jsonl")], timeout=600)
    header, rs = records(out)
    complete_and_unique(rs)
    assert rs[:len(before)] == before  # what was written stays; only the missing numbers ran
    every_node_ran_trials(ray_cluster, header, rs, 2, r.stdout)
    matches_one_host(rs, single_host[1])


@pytest.mark.parametrize("ray_cluster", [3], indirect=True)
def test_three_nodes_one_lost_mid_run_run_each_trial_once_as_one_host_would(ray_cluster, single_host):
    """A node removed mid-run: its slot's trial goes to another; no machine is left on it (the
    autouse leak check sees every slot's segment and processes)."""
    out, p = started(ray_cluster, 60)
    assert ray_cluster.remove_node().startswith("removed")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    header, rs = records(out)
    complete_and_unique(rs)
    assert "lost" in stdout  # the slot on the removed node, said
    every_node_ran_trials(ray_cluster, header, rs, 3, stdout)
    matches_one_host(rs, single_host[1])


def test_without_ray_cluster_says_how_to_install_it_and_makes_nothing(tmp_path, machine_name):
    shim = tmp_path / "noray"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\nsys.modules['ray'] = None  # as in a venv without the 'cluster' extra\n")
    env = smpd_env(machine_name, PYTHONPATH=str(shim))
    out = tmp_path / "c.jsonl"
    r = run_smpd("soak", "--cluster", "auto", "--trials", "5", "--out", str(out), env=env, check=False)
    assert r.returncode == 2 and "pip install -e '.[cluster]'" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, says", [
    (("--slots-per-node", "2"), "give --cluster"),
    (("--cpus", "8"), "give --cluster"),
    (("--cluster", "auto", "--slots-per-node", "0"), "0 is not in the range 1..64"),
    (("--cluster", "nohost"), "expected HOST:PORT of a Ray cluster"),
    (("--cluster", "127.0.0.1:1"), "no Ray cluster answers there"),  # at once, not after Ray's minutes
])
def test_cluster_options_are_checked_before_anything_runs(tmp_path, machine_name, args, says):
    out = tmp_path / "c.jsonl"
    r = run_smpd("soak", "--trials", "5", "--out", str(out), *args, name=machine_name, check=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not out.exists()


def test_an_address_where_something_else_listens_is_refused_in_seconds_not_minutes(tmp_path, machine_name):
    """A port that accepts connections but is no Ray cluster (another service, a proxy that takes
    any address): ray.init() would retry it for many minutes (a test run once hung on one)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        out = tmp_path / "c.jsonl"
        t0 = time.monotonic()
        r = run_smpd("soak", "--trials", "5", "--out", str(out), "--cluster", f"127.0.0.1:{port}",
                     name=machine_name, check=False, timeout=60)
    assert r.returncode == 2 and "something accepts connections there, but no Ray cluster answers" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60 and not out.exists()


@needs_root
def test_a_cluster_of_another_user_on_this_host_is_refused(tmp_path, machine_name):
    """A local Ray cluster runs what the driver sends and returns what its workers say: one that
    another user runs (here, whatever listens at the address as her) is not ours to use."""
    evil = adversary.unused_uid()
    with adversary.holding(evil, adversary.listen_tcp) as held:
        r = run_smpd("soak", "--cluster", f"127.0.0.1:{held['value']}", "--trials", "5", "--out",
                     str(tmp_path / "c.jsonl"), name=machine_name, check=False, timeout=60)
    assert r.returncode == 2 and f"run by uid {evil}" in r.stderr, r.stderr
    assert not (tmp_path / "c.jsonl").exists()


@needs_root
def test_auto_never_believes_a_cluster_record_another_user_planted(tmp_path, machine_name):
    """`--cluster auto` reads Ray's record of the last `ray start` from the shared temporary
    directory: one another user wrote there (to send us to her cluster) is refused."""
    evil = adversary.unused_uid()
    shared = tempfile.mkdtemp(prefix="smpd-raytmp-", dir="/tmp")  # like /tmp: anyone may write, sticky
    os.chmod(shared, 0o1777)
    try:
        with adversary.holding(evil, adversary.listen_tcp) as held:  # her "cluster", where her record points
            adversary.run_as(evil, os.mkdir, os.path.join(shared, "ray"))
            adversary.run_as(evil, adversary.write_file, os.path.join(shared, "ray", "ray_current_cluster"),
                             f"127.0.0.1:{held['value']}".encode())
            env = smpd_env(machine_name, RAY_TMPDIR=shared)
            env.pop("RAY_ADDRESS", None)
            r = run_smpd("soak", "--cluster", "auto", "--trials", "5", "--out", str(tmp_path / "c.jsonl"), env=env,
                         check=False, timeout=60)
    finally:
        shutil.rmtree(shared)
    assert r.returncode == 2 and f"uid {evil}" in r.stderr, r.stderr
