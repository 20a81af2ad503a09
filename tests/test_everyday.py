"""A kernel engineer's everyday commands on real machines: one CPU in full on a big machine,
a table that fits the terminal, a watch that ends cleanly when the machine goes down."""

import json
import re
import signal
import time

import psutil
import pytest

from conftest import patient_config, run_smpd, smpd_env, start_smpd, wait_until
from smpd.errors import SmpdError
from smpd.host import names
from smpd.tools import render

pytestmark = pytest.mark.usefixtures("sweeps_alone")  # conftest: `smpd list`, stale machines

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
    assert j["machine"]["online"] == 38 and sum(j["machine"]["states"].values()) == 40  # still of every CPU
    md = j["cpus"][0]["mwait_cpu_dead"]
    assert md["control_hex"] == "0xdeadbeef" and md["control"] == 0xDEADBEEF and md["addr_hex"] == hex(md["addr"])


def test_the_brief_view_carries_a_cpu_s_interrupt_counts_only_when_one_is_not_zero(machine):
    """The grid's brief view of a machine with many CPUs: interrupt counts of the CPUs that have
    one, and none of the others; the full view (--json, --cpus) has every CPU's, 0s included."""
    m = machine(40)
    m.live.request("inject", kind="nmi", cpus="5")
    brief = {c["cpu"]: c for c in m.live.request("status", brief=True)["cpus"]}
    assert brief[5]["interrupts"]["nmi"]["taken"] == 1 and "interrupts" not in brief[6]
    full = {c["cpu"]: c for c in m.status()["cpus"]}
    assert full[5]["interrupts"] == brief[5]["interrupts"]
    assert full[6]["interrupts"] == {k: {"taken": 0, "pending": 0, "held": 0} for k in ("nmi", "smi", "mce")}
    assert "CPU5 nmi:1" in run_smpd("status", name=m.name).stdout  # the grid's line of interrupts


def test_status_cpus_of_a_coordinator_older_than_the_argument_is_filtered_by_the_client():
    """A machine up across an upgrade of smpd (the same layout) has a coordinator that answers
    `status` with every CPU and refuses its `cpus` argument as it refuses any unknown one: the
    client then asks for every CPU and leaves the others out itself, for the views and for --json.
    Any other refusal is the user's to see."""
    from smpd.daemon.handlers import Handlers
    from smpd.errors import BadInput
    from smpd.tools.cli import status_request

    every = {"machine": {"online": 4}, "cpus": [{"cpu": c} for c in range(4)]}

    def op_status(brief: bool = False) -> dict:  # the handler before `cpus`
        return every

    older = Handlers.__new__(Handlers)  # its request checking (bind), with that handler
    older.table, older.signatures = {"status": op_status}, {}

    class OlderCoordinator:
        def request(self, op, raw=False, **args):
            handler, bound = older.bind({"op": op, "args": args})  # raises its BadInput for `cpus`
            return json.dumps(handler(**bound)) if raw else json.loads(json.dumps(handler(**bound)))

    assert [c["cpu"] for c in status_request(OlderCoordinator(), [1, 3])["cpus"]] == [1, 3]
    assert json.loads(status_request(OlderCoordinator(), [2], raw=True)) == {"machine": {"online": 4},
                                                                            "cpus": [{"cpu": 2}]}

    class Refusing:
        def request(self, op, **args):
            raise BadInput("cpulist '9' names CPU 9, but this machine has CPUs 0-3")

    with pytest.raises(BadInput, match="names CPU 9"):
        status_request(Refusing(), [9])


@pytest.mark.parametrize("bad, says", [("40", "CPUs 0-39"), ("3-1", "runs backwards"), ("", "empty cpulist"),
                                       ("x", "not a CPU, a range A-B")])
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


def _watching(m):
    """`smpd status --watch` on ``m``, once it holds the segment (it reads the last state there)."""
    p = start_smpd("status", "--watch", "--interval", "0.1", name=m.name)
    seg = names.segment(m.name).lstrip("/")
    wait_until(lambda: any(seg in (mm.path or "") for mm in psutil.Process(p.pid).memory_maps(grouped=False)),
               30, "the watch holds the segment")
    time.sleep(0.3)  # a few refreshes
    return p


def test_status_watch_ends_cleanly_when_the_machine_is_taken_down(machine):
    m = machine(3)
    p = _watching(m)
    run_smpd("down", name=m.name)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"machine '{m.name}' went down" in out and "Error" not in err


def test_status_watch_calls_a_killed_coordinator_a_crash(machine):
    m = machine(3)
    p = _watching(m)
    psutil.Process(m.live.pid).send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "died" in err, (out, err)
    wait_until(lambda: not psutil.pid_exists(m.live.pid) or psutil.Process(m.live.pid).status() == "zombie", 10,
               "the coordinator is gone")


# --- the timeline: summary, all, some CPUs; the trace file ---------------------------------

# The Trace Event Format's JSON object form, as much of it as smpd writes (and Perfetto reads):
# metadata naming the process and each CPU's track, complete events with a duration, instants.
TRACE_SCHEMA = {
    "type": "object", "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "traceEvents": {"type": "array", "items": {"oneOf": [
            {"type": "object", "required": ["name", "ph", "pid", "args"],
             "properties": {"ph": {"const": "M"}, "name": {"enum": ["process_name", "thread_name",
                                                                     "thread_sort_index"]},
                            "pid": {"type": "integer"}, "tid": {"type": "integer"}, "args": {"type": "object"}}},
            {"type": "object", "required": ["name", "ph", "pid", "tid", "ts", "dur"],
             "properties": {"ph": {"const": "X"}, "name": {"type": "string", "minLength": 1},
                            "pid": {"type": "integer"}, "tid": {"type": "integer", "minimum": 0},
                            "ts": {"type": "number", "minimum": 0}, "dur": {"type": "number", "minimum": 0},
                            "cat": {"type": "string"}, "args": {"type": "object"}}},
            {"type": "object", "required": ["name", "ph", "pid", "tid", "ts", "s"],
             "properties": {"ph": {"const": "i"}, "s": {"enum": ["g", "p", "t"]},
                            "name": {"type": "string", "minLength": 1}, "pid": {"type": "integer"},
                            "tid": {"type": "integer", "minimum": 0}, "ts": {"type": "number", "minimum": 0},
                            "cat": {"type": "string"}}},
        ]}},
    },
}


def _trace(path) -> dict:
    import jsonschema

    doc = json.loads(path.read_text())
    jsonschema.validate(doc, TRACE_SCHEMA)
    return doc


def _states(doc: dict, cpu: int) -> list[str]:
    spans = sorted((e for e in doc["traceEvents"] if e["ph"] == "X" and e.get("cat") == "state" and e["tid"] == cpu),
                   key=lambda e: e["ts"])
    for a, b in zip(spans, spans[1:]):  # one state at a time: each span ends where the next begins
        assert abs(a["ts"] + a["dur"] - b["ts"]) < 0.01, (a, b)
    return [e["name"] for e in spans]


def test_kexec_trace_has_a_track_per_cpu_the_phases_and_each_cpus_states(machine, tmp_path):
    m = machine(6, "--config", patient_config(tmp_path))
    run_smpd("offline", "1-5", name=m.name)
    out = tmp_path / "kexec.json"
    r = run_smpd("kexec", "--trace", str(out), "--inject", "nmi@after-copy:2", name=m.name, check=False)
    assert r.returncode in (0, 3) and "ui.perfetto.dev" in r.stderr, r.stderr
    doc = _trace(out)
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names[0].startswith("CPU0 (coordinator") and names[5] == "CPU5" and len(names) == 6
    phases = " | ".join(e["name"] for e in doc["traceEvents"] if e.get("cat") == "phase")
    for p in ("machine_shutdown() -> native_stop_other_cpus()", "smp_kick_mwait_play_dead()",
              "relocate_kernel(): the copy"):
        assert p in phases, phases
    smpd_own = [e["name"] for e in doc["traceEvents"] if e.get("cat") == "smpd"]
    assert any("until the NMI is taken or held" in n for n in smpd_own)  # on the emulator's own process
    assert all(e["pid"] == 2 for e in doc["traceEvents"] if e.get("cat") == "smpd")
    assert _states(doc, 1)[:2] == ["MWAIT", "HLT"]  # parked, kicked into HLT
    assert _states(doc, 2)[-1] == "SHUTDOWN"  # the NMI ended HLT in overwritten memory
    instants = {(e["tid"], e["cat"]) for e in doc["traceEvents"] if e["ph"] == "i"}
    assert {(1, "WAKE_WRITE"), (1, "KICK_SEEN"), (2, "INTERRUPT"), (2, "TRIPLE_FAULT"), (0, "inject"),
            (0, "machine_end")} <= instants
    handler = [e for e in doc["traceEvents"] if e.get("tid") == 2 and e.get("cat") == "running"]
    assert handler and handler[0]["name"] == "RUNNING (interrupt handler)"  # from the NMI to the fault


def test_chain_trace_holds_every_link(machine, tmp_path):
    m = machine(4, "--config", patient_config(tmp_path))
    run_smpd("offline", "1-3", name=m.name)
    out = tmp_path / "chain.json"
    run_smpd("chain", "--kexecs", "2", "--kernel", "6.6", "--trace", str(out), name=m.name)
    doc = _trace(out)
    copies = [e for e in doc["traceEvents"] if e["name"].endswith("relocate_kernel(): the copy")]
    assert [e["args"]["kexec"] for e in copies] == ["link 1: generation 1 -> 2", "link 2: generation 2 -> 3"]
    assert copies[0]["ts"] + copies[0]["dur"] <= copies[1]["ts"]


def test_the_timeline_summary_folds_what_every_cpu_does_alike_and_keeps_the_unusual(machine, tmp_path):
    m = machine(8, "--config", patient_config(tmp_path))
    run_smpd("offline", "1-7", name=m.name)
    summary = run_smpd("kexec", "--inject", "smi@after-copy:4", name=m.name, check=False).stdout  # ends HLT
    assert re.search(r"CPUs\s+1-7: enters HLT \(7 events", summary), summary
    assert re.search(r"CPU4\s+SMI taken", summary)  # unusual: one line of its own
    assert "timeline: the summary (--timeline all shows every event)" in summary
    run_smpd("reset", name=m.name)
    full = run_smpd("kexec", "--timeline", "all", name=m.name).stdout
    assert len(re.findall(r"CPU\d\s+enters HLT", full)) == 7
    run_smpd("reset", name=m.name)
    some = run_smpd("kexec", "--timeline", "3,5", name=m.name).stdout
    cpus = set(re.findall(r" us  (CPU\d+)", some))
    assert cpus == {"CPU3", "CPU5"} and "coord" in some


def test_a_stray_interrupt_is_labelled_as_one_and_comes_before_what_it_did(machine):
    m = machine(3)
    r = run_smpd("inject", "nmi", "--cpus", "2", "--count", "3", name=m.name).stdout
    lines = [line for line in r.splitlines() if " us  " in line]
    assert "stray NMI x3 to CPU 2" in lines[0] and "after-copy" not in r, r
    assert any("NMI taken" in line for line in lines[1:])


@pytest.mark.parametrize("args, says", [
    (("kexec", "--timeline", "most"), "--timeline 'most': expected all, summary"),
    (("kexec", "--timeline", "9"), "--timeline: cpulist '9' names CPU 9"),
    (("inject", "nmi", "--cpus", "9"), "--cpus '9': cpulist '9' names CPU 9"),
    (("inject", "nmi", "--cpus", "0"), "--cpus '0': CPU 0 is the kexec CPU"),
    (("inject", "nmi", "--cpus", "x"), "--cpus 'x': malformed cpulist"),
    (("kick", "--timeline", ""), "--timeline '': expected"),
    (("kexec", "--trace", "/dev/shm/x.json"), "not a place for smpd's output"),
    (("chain", "--kexecs", "2", "--trace", "/"), "names a directory"),
])
def test_bad_timeline_and_trace_arguments_change_nothing(machine, args, says):
    m = machine(3)
    r = run_smpd(*args, name=m.name, check=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert m.status()["machine"]["generation"] == 1 and m.status()["machine"]["kexecs"] == 0


# --- list --json, config show, a config file's name -------------------------------------------

def test_list_json_names_this_users_machines(machine):
    m = machine(2)
    rows = json.loads(run_smpd("list", "--json").stdout)
    mine = [r for r in rows if r["name"] == m.name]
    assert mine == [{"name": m.name, "state": "up", "cpus": 2, "pid": m.live.pid, "why": ""}]


def test_config_show_says_where_each_value_comes_from(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[machine]\ncpus = 3\n[watch]\nstrategy = "adaptive"\n')
    j = json.loads(run_smpd("config", "show", "--config", str(f), "--json").stdout)
    assert j["machine"]["cpus"] == {"value": 3, "from": str(f)}
    assert j["watch"]["strategy"]["from"] == str(f)
    assert j["machine"]["name"]["value"] == "default" and j["machine"]["name"]["from"].endswith("default.toml")
    text = run_smpd("config", "show", "--config", str(f)).stdout
    assert re.search(rf"machine\.cpus\s+3\s+{re.escape(str(f))}", text) and re.search(r"pin\.policy\s+\S+\s+default", text)
    bad = tmp_path / "bad.toml"
    bad.write_text("[machine]\ncpus = 0\n")
    r = run_smpd("config", "show", "--config", str(bad), check=False)
    assert r.returncode == 2 and "machine.cpus = 0 is invalid" in r.stderr
    # Across settings too, as `smpd up` checks them: RAM too small for the file's own machine
    bad.write_text("[machine]\ncpus = 3\n[memory]\nram_pages = 1\n")
    r = run_smpd("config", "show", "--config", str(bad), check=False)
    assert r.returncode == 2 and "memory.ram_pages = 1 cannot hold two kernel generations" in r.stderr, r.stderr


def test_a_name_from_a_config_file_is_said_and_not_up_lists_the_machines(machine_name, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(f'[machine]\nname = "{machine_name}"\ncpus = 2\n')
    try:
        up = run_smpd("up", "--config", str(f))
        assert f"later commands find this machine with --name {machine_name}" in up.stdout
        r = run_smpd("status", check=False)  # looks for 'default'
        assert r.returncode == 2 and "up now:" in r.stderr and machine_name in r.stderr.split("up now:")[1]
    finally:
        run_smpd("down", name=machine_name)


@pytest.mark.parametrize("args, says", [
    (("config", "show", "--config", ""), "--config needs a file name"),
    (("config", "show", "--config", "/proc/self/status"), "is on /proc, /sys, /dev or /dev/shm"),
])
def test_config_show_refuses_what_is_not_a_config_file(args, says):
    r = run_smpd(*args, check=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr


def test_an_empty_trace_name_is_refused_before_the_kexec(machine):
    m = machine(2)
    r = run_smpd("kexec", "--trace", "", name=m.name, check=False)
    assert r.returncode == 2 and "--trace needs a file name" in r.stderr
    assert m.status()["machine"]["kexecs"] == 0


def test_reset_leaves_offline_the_cpus_asked_for_and_refuses_a_bad_list_changing_nothing(machine):
    m = machine(4)
    run_smpd("offline", "1", name=m.name)
    out = run_smpd("reset", "--offline", "2-3", name=m.name).stdout
    assert "offline: CPU 2-3 in mwait_play_dead()" in out, out
    assert [c["hotplug"] for c in m.status()["cpus"]] == ["online", "online", "offline", "offline"]
    for bad, says in (("0", "CPU 0 is the boot CPU"), ("7", "--offline '7': cpulist '7' names CPU 7"),
                      ("x", "--offline 'x': malformed cpulist")):
        r = run_smpd("reset", "--offline", bad, name=m.name, check=False)
        assert r.returncode == 2 and says in r.stderr, (r.returncode, r.stderr)
    assert [c["hotplug"] for c in m.status()["cpus"]] == ["online", "online", "offline", "offline"]
    assert run_smpd("reset", "--offline", "", name=m.name).stdout.rstrip().endswith("every CPU is online")
    assert run_smpd("reset", name=m.name).stdout.rstrip().endswith("every CPU is online")  # the set kept since


def test_reset_boots_the_kernel_asked_for_whose_own_loop_parks_the_offline_cpus(machine):
    m = machine(4)
    run_smpd("offline", "2-3", name=m.name)

    def monitors() -> list:
        return [c["monitor"]["symbol"] for c in m.status()["cpus"]]

    out = run_smpd("reset", "--kernel", "6.5", name=m.name).stdout
    assert "generation 1 (6.5) runs; offline: CPU 2-3 in mwait_play_dead()" in out, out
    assert m.status()["machine"]["kernel"] == "6.5"
    assert monitors() == [None, None, "mwait_cpu_dead[2].control", "mwait_cpu_dead[3].control"]
    # A kexec by that kernel finds its CPUs parked by it: nothing rewrites the running generation
    r = json.loads(run_smpd("kexec", "--kernel", "6.5", "--json", name=m.name).stdout)
    assert r["outcome"] == "CLEAN" and r["generation"] == {"old": 1, "new": 2}
    assert not [e for e in r["timeline"] if "the running kernel is" in e["event"]], r["timeline"]
    run_smpd("reset", "--kernel", "none", "--offline", "1-3", name=m.name)  # (--park's name of pre-fix)
    assert m.status()["machine"]["kernel"] == "pre-fix"
    assert monitors() == [None, "thread_info[1].flags", "thread_info[2].flags", "thread_info[3].flags"]
    for bad in ("7", "", "6.6 nosmt"):
        r = run_smpd("reset", "--kernel", bad, name=m.name, check=False)
        assert r.returncode == 2 and "is not one of 'pre-fix', '6.5', '6.6'" in r.stderr, (bad, r.stderr)
    s = m.status()
    assert (s["machine"]["kernel"], s["machine"]["generation"]) == ("pre-fix", 1) and monitors()[1] == "thread_info[1].flags"
    with pytest.raises(SmpdError, match="'7.0' is not a kernel"):
        m.request("reset", kernel="7.0")
    assert m.status()["machine"]["kernel"] == "pre-fix"
    assert "generation 1 (6.6) runs" in run_smpd("reset", name=m.name).stdout  # the machine's own again
    assert monitors() == [None, "mwait_cpu_dead[1].control", "mwait_cpu_dead[2].control", "mwait_cpu_dead[3].control"]


def test_a_kexec_with_no_cpu_parked_says_so_and_reset_says_every_cpu_is_online(machine):
    m = machine(3)
    r = run_smpd("kexec", name=m.name)
    assert r.stdout.startswith("CLEAN  no CPU was parked in mwait_play_dead(): nothing to kick"), r.stdout
    assert "acknowledged the kick" not in r.stdout
    reset = run_smpd("reset", name=m.name).stdout
    assert reset.rstrip().endswith("every CPU is online") and "CPU none" not in reset
