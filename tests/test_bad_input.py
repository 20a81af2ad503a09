"""Bad input: one line naming the problem and what is accepted, exit status 2, nothing left behind.

(The autouse leak check runs after each of these too.)
"""

import os
import resource

import psutil
import pytest

from conftest import run_smpd, segment_path


def _error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (("up", "--cpus", "0"), "Invalid value for '--cpus': 0 is not in the range 1..4096"),
    (("up", "--cpus", "-3"), "-3 is not in the range 1..4096"),
    (("up", "--cpus", "abc"), "'abc' is not a whole number; expected 1..4096"),
    (("up", "--cpus", "5000"), "5000 is not in the range 1..4096"),
    (("up", "--watch", "fast"), "Invalid value for '--watch': 'fast' is not one of 'auto', 'spin', 'adaptive'"),
    (("up", "--pin", "tight"), "'tight' is not one of 'none', 'compact', 'spread'"),
    (("up", "--hot-path", "asm"), "Invalid value for '--hot-path': 'asm' is not one of 'auto', 'c', 'python'"),
    (("up", "--seed", "x"), "'x' is not an integer"),
    (("up", "--name", "Bad Name"), "is not a machine name"),
    (("up", "--config", "/nonexistent/smpd.toml"), "config file /nonexistent/smpd.toml does not exist"),
])
def test_up_rejects_bad_arguments_before_creating_anything(machine_name, args, says):
    r = run_smpd(*args, name=machine_name, check=False)
    assert r.returncode == 2
    assert says in _error_line(r)
    assert not os.path.exists(segment_path(machine_name))


@pytest.mark.parametrize("body, says", [
    ("[machine]\ncpuz = 4\n", "unknown key 'cpuz' in [machine]"),
    ('[watch]\nspin_budget_us = "fast"\n', "watch.spin_budget_us = 'fast' is invalid; expected an integer"),
])
def test_up_rejects_a_bad_config_file(machine_name, tmp_path, body, says):
    f = tmp_path / "c.toml"
    f.write_text(body)
    r = run_smpd("up", "--config", str(f), name=machine_name, check=False)
    assert r.returncode == 2 and says in _error_line(r)
    assert not os.path.exists(segment_path(machine_name))


def test_up_refuses_a_machine_the_process_limit_cannot_hold(machine_name):
    mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == os.getuid())
    limit = mine + 20

    def low_nproc():
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, resource.getrlimit(resource.RLIMIT_NPROC)[1]))

    r = run_smpd("up", "--cpus", "64", "--watch", "adaptive", name=machine_name, check=False, preexec_fn=low_nproc)
    assert r.returncode == 2
    line = _error_line(r)
    assert "RLIMIT_NPROC" in line and "this host holds up to --cpus" in line
    assert not os.path.exists(segment_path(machine_name))


def test_up_refuses_a_machine_the_memory_cannot_hold(machine_name, tmp_path):
    f = tmp_path / "fat.toml"
    f.write_text("[host]\ncpu_process_mib = 1024\n")
    r = run_smpd("up", "--cpus", "4096", "--config", str(f), name=machine_name, check=False)
    assert r.returncode == 2
    assert "GiB available" in _error_line(r) and "this host holds up to --cpus" in _error_line(r)


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("offline", "1"), ("online", "1"),
                                  ("poke", "mwait_cpu_dead[1]")])
def test_commands_without_a_machine_say_so(machine_name, args):
    r = run_smpd(*args, name=machine_name, check=False)
    assert r.returncode == 2
    assert f"no machine named '{machine_name}' is up" in _error_line(r)


def test_up_twice_is_refused_and_the_first_machine_is_untouched(machine):
    m = machine(2, "--watch", "adaptive")
    pid = m.status()["machine"]["pid"]
    r = run_smpd("up", "--cpus", "2", name=m.name, check=False)
    assert r.returncode == 2 and "is already up" in _error_line(r) and str(pid) in _error_line(r)
    assert m.status()["machine"]["pid"] == pid and m.status()["machine"]["online"] == 2


@pytest.mark.parametrize("args, says", [
    (("offline", "5-2"), "range '5-2' runs backwards"),
    (("offline", "1,,2"), "item '' is not N or N-M"),
    (("offline", "99"), "names CPU 99, but this machine has CPUs 0-7"),
    (("offline", "0"), "CPU 0 is the boot CPU"),
    (("offline", "0-3"), "CPU 0 is the boot CPU"),
    (("online", "8"), "names CPU 8, but this machine has CPUs 0-7"),
    (("poke", "mwait_cpu_dead[9]"), "this machine has CPUs 0-7"),
    (("poke", "0x10"), "outside emulated memory"),
    (("poke", "mwait_cpu_dead[1]", "--value", "zz"), "'zz' is not an integer"),
    (("poke", "mwait_cpu_dead[1]", "--value", "0x100000000"), "does not fit a u32"),
    (("status", "--json", "--watch"), "do not combine"),
])
def test_bad_cpulists_and_targets_change_nothing(machine, args, says):
    m = machine(8, "--watch", "adaptive")
    before = m.status()["cpus"]
    r = run_smpd(*args, name=m.name, check=False)
    assert r.returncode == 2, r.stderr
    assert says in _error_line(r)
    after = m.status()["cpus"]
    assert [(c["hotplug"], c["state"]) for c in after] == [(c["hotplug"], c["state"]) for c in before]
