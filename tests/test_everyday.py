"""A kernel engineer's everyday commands on real machines: one CPU in full on a big machine,
a table that fits the terminal, a watch that ends cleanly when the machine goes down."""

import json
import re
import signal
import time

import psutil
import pytest

from conftest import run_smpd, smpd_env, start_smpd, wait_until
from smpd.tools import render

HEX_WORD = re.compile(r"0x[0-9a-f]{8}\b")


def test_status_cpus_shows_any_cpu_of_a_big_machine_in_full(machine):
    m = machine(40)
    run_smpd("offline", "7,33", name=m.name)
    r = run_smpd("status", "--cpus", "7,33,39", name=m.name, env=smpd_env(m.name, COLUMNS="80"))
    rows = [line for line in r.stdout.splitlines() if re.match(r"\s+\d+ ", line)]
    assert [int(line.split()[0]) for line in rows] == [7, 33, 39]
    assert "MWAIT" in rows[0] and "offline" in rows[0] and "RUNNING" in rows[2]
    assert HEX_WORD.findall(rows[0]) == ["0xdeadbeef", "0xdeadbeef"]  # mwait_cpu_dead: control, status
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    j = json.loads(run_smpd("status", "--json", "--cpus", "33", name=m.name).stdout)
    assert [c["cpu"] for c in j["cpus"]] == [33]
    md = j["cpus"][0]["mwait_cpu_dead"]
    assert md["control_hex"] == "0xdeadbeef" and md["control"] == 0xDEADBEEF and md["addr_hex"] == hex(md["addr"])


@pytest.mark.parametrize("bad, says", [("40", "CPUs 0-39"), ("3-1", "runs backwards"), ("", "empty cpulist"),
                                       ("x", "not N or N-M")])
def test_status_cpus_refuses_a_bad_list(machine, bad, says):
    m = machine(40)
    r = run_smpd("status", "--cpus", bad, name=m.name, check=False)
    assert r.returncode == 2 and r.stderr.startswith("Error: --cpus: ") and says in r.stderr, r.stderr


def _snapshot_cpu(cpu: int, **over) -> dict:
    c = {"cpu": cpu, "pid": 123456, "core": 1, "hotplug": "offline", "state": "WAIT_FOR_SIPI",
         "wakeups": {"write": 12345, "interrupt": 6, "ipi": 7, "spurious": 8},
         "interrupts": {"nmi": {"taken": 3, "pending": 1, "held": 2}, "smi": {"taken": 0, "pending": 0, "held": 0},
                        "mce": {"taken": 0, "pending": 0, "held": 0}},
         "generation": 3, "mwait_cpu_dead": {"control": 0xDEADBEEF, "status": 0x1F0000ED},
         "monitor": {"symbol": f"mwait_cpu_dead[{cpu}].control"}}
    c.update(over)
    return c


@pytest.mark.parametrize("columns", [40, 60, 80, 100, 200])
def test_the_cpu_table_fits_the_terminal_and_never_cuts_a_hex_word(columns):
    from rich.console import Console

    out = Console(width=columns, record=True, color_system=None)
    out.print(render.cpu_table([_snapshot_cpu(n) for n in (1, 2, 4095)], columns))
    text = out.export_text()
    lines = text.splitlines()
    assert all(len(line) <= columns for line in lines)
    rows = [line for line in lines if re.match(r"\s*\d+ ", line)]
    for row in rows:  # both words of every CPU, whole, on its own row
        assert HEX_WORD.findall(row)[:2] == ["0xdeadbeef", "0x1f0000ed"], text
    if columns >= 200:
        assert "not shown" not in text and "123456" in text
    else:
        assert "not shown in" in text  # what was left out is said


def test_status_watch_ends_cleanly_when_the_machine_is_taken_down(machine):
    m = machine(3)
    p = start_smpd("status", "--watch", "--interval", "0.1", name=m.name)
    time.sleep(1)  # a few refreshes
    run_smpd("down", name=m.name)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"machine '{m.name}' went down" in out and "Error" not in err


def test_status_watch_calls_a_killed_coordinator_a_crash(machine):
    m = machine(3)
    p = start_smpd("status", "--watch", "--interval", "0.1", name=m.name)
    time.sleep(1)
    psutil.Process(m.live.pid).send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "died" in err, (out, err)
    wait_until(lambda: not psutil.pid_exists(m.live.pid) or psutil.Process(m.live.pid).status() == "zombie", 10,
               "the coordinator is gone")
