"""Soak runs: randomized trials, JSON lines that survive crashes, resume, summary, replay."""

import contextlib
import re
import json
import os
import shutil
import signal
import subprocess

import multiprocess
import psutil
import pytest

from conftest import Machine, of_this_run, run_name, run_smpd, smpd_env, start_smpd, wait_until
from smpd.tools import soak
from smpd.kernel.kexec import OUTCOMES

NCPUS = 6


@pytest.fixture(scope="module")
def soak_machine():
    name = run_name("soak")
    m = Machine(name, NCPUS, "--watch", "adaptive", "--seed", "5")
    m.request("offline", cpus=f"1-{NCPUS - 1}")
    yield m
    m.down()


@pytest.fixture(scope="module")
def recorded(soak_machine, tmp_path_factory):
    """One 12-trial run, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("soak") / "run.jsonl"
    r = run_smpd("soak", "--trials", "12", "--seed", "3", "--inject-rate", "0.5", "--host-load", "cpu:1",
                 "--out", str(out), name=soak_machine.name)
    return out, r


def lines(path):
    return [json.loads(x) for x in open(path)]


@contextlib.contextmanager
def start_soak(name: str, out, *args: str, trials: str = "100000"):
    """`smpd soak` in the background, as a user would run it in a terminal; killed if still running."""
    p = start_smpd("soak", "--trials", trials, "--out", str(out), *args, env=smpd_env(name, COLUMNS="200"))
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_trials(p: subprocess.Popen, out, n: int) -> None:
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) > n or p.poll() is not None,
               timeout=60, what=f"{n} trials")


def test_a_soak_records_every_trial_and_leaves_the_machine_reset(soak_machine, recorded):
    out, r = recorded
    header, *trials = lines(out)
    assert header["kind"] == "smpd-soak" and header["seed"] == 3 and header["cpus"] == NCPUS
    assert [t["trial"] for t in trials] == list(range(12))
    for t in trials:
        assert t["outcome"] in OUTCOMES and t["evidence"]
        assert t["park"] in ("none", "hlt", "init") and t["seed"] == soak.trial_seed(3, t["trial"])
        assert t["host"]["cpu_percent"] >= 0
    assert "12 trials, " in r.stdout and "trials/s" in r.stdout and "kick round trip during the soak" in r.stdout
    s = soak_machine.status()
    assert s["machine"]["state"] == "UP" and s["machine"]["generation"] == 1
    assert s["machine"]["left_by_soak"] is None  # it restored the user's setup itself, and took its hold back


def test_a_soak_leaves_the_kernel_its_machine_ran_though_each_reset_boots_the_next_trials(soak_machine, tmp_path):
    before = soak_machine.status()
    assert before["machine"]["kernel"] == "6.6"
    run_smpd("soak", "--trials", "2", "--seed", "3", "--park", "none", "--inject-rate", "0",
             "--out", str(tmp_path / "prefix.jsonl"), name=soak_machine.name)
    after = soak_machine.status()
    assert (after["machine"]["kernel"], after["machine"]["generation"], after["machine"]["state"]) == ("6.6", 1, "UP")
    assert [c["hotplug"] for c in after["cpus"]] == [c["hotplug"] for c in before["cpus"]]
    assert [t["park"] for t in lines(tmp_path / "prefix.jsonl")[1:]] == ["none", "none"]
    # A run killed after a reset leaves the machine in a trial's kernel; its --resume restores the
    # kernel the file says the user had, not the one it finds
    run_smpd("reset", "--kernel", "pre-fix", name=soak_machine.name)
    run_smpd("soak", "--resume", str(tmp_path / "prefix.jsonl"), name=soak_machine.name)
    again = soak_machine.status()
    assert again["machine"]["kernel"] == "6.6" and [c["hotplug"] for c in again["cpus"]] == \
        [c["hotplug"] for c in before["cpus"]]


def test_the_trial_sequence_is_a_function_of_the_seed(recorded):
    out, _ = recorded
    plan, records, _ = soak.read(str(out))
    for rec in records:
        drawn = soak.draw(plan, rec["trial"])
        assert {k: rec[k] for k in drawn} == drawn


def test_resume_drops_a_partial_line_and_continues_the_same_sequence(soak_machine, recorded, tmp_path):
    out, _ = recorded
    data = open(out, "rb").read().split(b"\n")
    cut = tmp_path / "cut.jsonl"
    # keep the header and 7 trials, then half of the 8th line: a crash mid-write
    cut.write_bytes(b"\n".join(data[:8]) + b"\n" + data[8][: len(data[8]) // 2])
    r = run_smpd("soak", "--resume", str(cut), name=soak_machine.name)
    assert "dropped a partial last line" in r.stdout
    original, resumed = lines(out), lines(cut)
    assert len(resumed) == len(original) == 13
    for a, b in zip(original[1:], resumed[1:]):
        assert (a["trial"], a["seed"], a["park"], a["offline"], a["order"], a["inject"]) == \
               (b["trial"], b["seed"], b["park"], b["offline"], b["order"], b["inject"])


def test_summary_reads_the_file_again(recorded):
    out, r = recorded
    again = run_smpd("soak", "--summary", str(out))
    assert "12 trials, " in again.stdout and " s wall from the first trial" in again.stdout
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("│")]
    assert table and table == [ln for ln in again.stdout.splitlines() if ln.startswith("│")]


def test_replay_reruns_one_trial_exactly(soak_machine, recorded):
    out, _ = recorded
    rec = lines(out)[1 + 4]
    r = json.loads(run_smpd("kexec", "--replay", f"{out}:4", "--json", name=soak_machine.name).stdout)
    assert (r["park"], r["order"], r["seed"]) == (rec["park"], rec["order"], rec["seed"])
    assert [i["spec"] for i in r["injections"]] == rec["inject"]
    assert f"replay of trial 4 of {out}: recorded outcome {rec['outcome']}" in r["notes"][0]
    soak_machine.request("reset")
    s = soak_machine.status()
    from smpd import cpulist
    want = set(cpulist.parse(rec["offline"])) if rec["offline"] else set()
    assert {c["cpu"] for c in s["cpus"][1:] if c["hotplug"] == "offline"} == want


def test_ctrl_c_stops_after_the_current_trial_with_a_summary(soak_machine, tmp_path):
    out = tmp_path / "int.jsonl"
    with start_soak(soak_machine.name, out, "--host-load", "syscall:1,io:1") as p:
        wait_trials(p, out, 3)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "interrupted after trial" in stdout and f"smpd soak --resume {out}" in stdout
    assert "s in trials" in stdout
    trials = lines(out)[1:]
    assert trials and [t["trial"] for t in trials] == list(range(len(trials)))
    s = soak_machine.status()
    assert s["machine"]["state"] == "UP" and s["machine"]["generation"] == 1
    # the offline CPUs the user had before the soak, not the last trial's
    assert [c["cpu"] for c in s["cpus"] if c["hotplug"] == "offline"] == list(range(1, NCPUS))
    assert s["machine"]["left_by_soak"] is None
    assert not [q for q in psutil.process_iter(["name"]) if (q.info["name"] or "").startswith("smpd-load")
                and of_this_run(q)]  # anyone else's load (another test run's, a user's soak) is theirs


def _soak_killed_mid_run(m, tmp_path, name: str, tries: int = 3):
    """A soak SIGKILLed after its third trial. One that ended by itself first (a trial timed out on a
    loaded host: it then restored the machine itself, as it should) is not that: tried again."""
    ended = []
    for n in range(tries):
        out = tmp_path / f"{name}-{n}.jsonl"
        with start_soak(m.name, out, "--seed", "1") as p:
            wait_trials(p, out, 3)
            if p.poll() is None:
                p.kill()
                p.wait()
                return p
            ended.append(p.communicate())
    pytest.fail(f"the soak ended by itself {tries} times before it could be killed: {ended}")


def test_a_soak_killed_mid_run_leaves_the_users_setup_for_the_next_reset_to_restore(machine, tmp_path):
    """SIGKILL leaves a soak nothing to put the user's offline CPUs and kernel back with: it left them
    with the coordinator before its first trial. `status` says so; the next plain `smpd reset` restores
    them and says so (not the last trial's offline CPUs, nor the machine's own kernel); a choice the
    user makes instead (`reset --offline`) replaces them."""
    m = machine(6, "--watch", "adaptive")
    for then in ("plain reset", "own choice"):
        run_smpd("reset", "--offline", "2,4", "--kernel", "pre-fix", name=m.name)
        p = _soak_killed_mid_run(m, tmp_path, then.replace(" ", "-"))
        assert m.status()["machine"]["left_by_soak"] == {"offline": [2, 4], "kernel": "pre-fix", "pid": p.pid}
        said = " ".join(run_smpd("status", name=m.name).stdout.split())
        assert f"a soak ended on it without putting back your offline CPUs and kernel (its pid {p.pid}, gone now" \
            in said and "restores them (CPU 2,4 offline, pre-fix)" in said, said
        if then == "plain reset":
            r = run_smpd("reset", name=m.name)
            assert "generation 1 (pre-fix) runs; offline: CPU 2,4 in" in r.stdout, r.stdout
            assert f"before a soak that ended without putting them back (its pid {p.pid}, gone now" in r.stdout, r.stdout
        else:
            r = run_smpd("reset", "--offline", "3", name=m.name)
            assert "generation 1 (6.6) runs; offline: CPU 3 in" in r.stdout and "soak" not in r.stdout, r.stdout
        assert m.status()["machine"]["left_by_soak"] is None
        again = run_smpd("reset", name=m.name).stdout  # the hold is gone: the usual plain reset
        assert "soak" not in again and ("CPU 2,4 in" if then == "plain reset" else "CPU 3 in") in again, again


def test_a_cpu_process_killed_during_a_soak_is_respawned_and_the_soak_goes_on(machine, tmp_path):
    m = machine(4, "--watch", "adaptive")
    m.request("offline", cpus="1-3")
    out = tmp_path / "lost.jsonl"
    with start_soak(m.name, out, trials="30") as p:
        wait_trials(p, out, 2)
        victim = m.cpu(2)["pid"]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    trials = lines(out)[1:]
    assert len(trials) == 30
    # The death is on record in the trial it hit: as its outcome (mid-kexec or before it)
    # or as the respawn of its reset (when it died after the kexec had reported).
    hit = [t for t in trials if t["respawned"]]
    assert len(hit) == 1 and hit[0]["respawned"] == [2]
    assert all(t["outcome"] != "CPU_LOST" for t in trials if t["trial"] > hit[0]["trial"])
    assert "respawned 1" in stdout
    assert m.status()["cpus"][2]["pid"] != victim


def test_sigkill_of_the_coordinator_mid_soak_leaves_a_readable_file_and_nothing_else(machine_name, tmp_path):
    m = Machine(machine_name, 4, "--watch", "adaptive")
    m.request("offline", cpus="1-3")
    coord = m.status()["machine"]["pid"]
    out = tmp_path / "killed.jsonl"
    with start_soak(machine_name, out, "--host-load", "cpu:1") as p:
        wait_trials(p, out, 2)
        os.kill(coord, signal.SIGKILL)
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 1 and "trials are safe in" in stderr
    plan, records, _ = soak.read(str(out))
    assert records and [r["trial"] for r in records] == list(range(len(records)))
    assert run_smpd("soak", "--summary", str(out)).returncode == 0


@pytest.mark.parametrize("args, says", [
    (("--host-load", "gpu:1"), "item 'gpu:1' is not valid"),
    (("--host-load", "cpu:0"), "item 'cpu:0' is not valid"),
    (("--host-load", "cpu:1,cpu:2"), "'cpu' is given twice"),
    (("--trials", "0"), "0 is not in the range"),
    (("--trials", "-5"), "-5 is not in the range"),
    (("--duration", "0s"), "not in the range"),
    (("--duration", "soon"), "is not a duration"),
    (("--inject-rate", "1.5"), "1.5 is not in the range"),
    (("--inject-rate", "-0.1"), "is not in the range"),
    (("--park", "hlt,sleep"), "--park 'hlt,sleep'"),
    (("--kinds", "nmi,irq"), "--kinds 'nmi,irq'"),
    (("--kinds", "nmi,smi,nmi"), "'nmi' is given twice"),  # it would weigh the draw, unsaid
    (("--park", "hlt,6.6"), "'hlt' and '6.6' name the same kernel"),
    (("--out", "/nonexistent-dir/s.jsonl"), "does not exist"),
    (("--out", "/tmp"), "--out /tmp is a directory; give a file name"),  # not "exists; continue with --resume"
    (("--out", "/dev/full"), "--out /dev/full is not a regular file"),
    (("--resume", "missing.jsonl"), "--resume missing.jsonl does not exist"),  # (run in an empty directory)
    (("--trials", "3", "--duration", "1s"), "not both"),
])
def test_bad_soak_input_is_refused_before_anything_runs(soak_machine, tmp_path, args, says):
    before = soak_machine.status()["machine"]["kexecs"]
    r = run_smpd("soak", *args, name=soak_machine.name, check=False, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert soak_machine.status()["machine"]["kexecs"] == before
    assert not list(tmp_path.glob("soak-*.jsonl"))


def test_resume_refuses_a_file_of_another_version_or_a_conflicting_option(soak_machine, recorded, tmp_path):
    out, _ = recorded
    other = tmp_path / "other.jsonl"
    head, *rest = open(out).read().splitlines()
    h = json.loads(head)
    h["layout_version"] = 999
    other.write_text("\n".join([json.dumps(h), *rest]) + "\n")
    r = run_smpd("soak", "--resume", str(other), name=soak_machine.name, check=False)
    assert r.returncode == 2 and "written by another smpd" in r.stderr
    r = run_smpd("soak", "--resume", str(out), "--park", "hlt", name=soak_machine.name, check=False)
    assert r.returncode == 2 and "drop --park" in r.stderr
    r = run_smpd("soak", "--summary", "/etc/hostname", check=False)
    assert r.returncode == 2
    r = run_smpd("kexec", "--replay", f"{out}:999", name=soak_machine.name, check=False)
    assert r.returncode == 2 and "has no trial 999" in r.stderr


def _stress_ng_of(pid: int) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if c.name().startswith("stress-ng")]
    except psutil.Error:
        return []


def test_stress_ng_load_runs_during_the_soak_and_dies_with_it(soak_machine, tmp_path):
    """.ci/run installs stress-ng (as root, from the distribution); without it, the refusal."""
    if shutil.which("stress-ng") is None:
        r = run_smpd("soak", "--host-load", "stress-ng:--cpu,1", "--trials", "1", name=soak_machine.name,
                     check=False)
        assert r.returncode == 2 and "needs stress-ng, which is not installed" in r.stderr
        return
    out = tmp_path / "stress.jsonl"
    with start_soak(soak_machine.name, out, "--host-load", "stress-ng:--cpu,1") as p:
        seen = wait_until(lambda: _stress_ng_of(p.pid), 60, "stress-ng running under the soak")
        wait_trials(p, out, 2)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert all(r["host_load"] == "stress-ng:--cpu,1" for r in lines(out)[1:])
    wait_until(lambda: not any(q.is_running() and q.status() != psutil.STATUS_ZOMBIE for q in seen), 10,
               "stress-ng gone with the soak")


def test_a_duration_bounded_soak_stops_on_time(soak_machine, tmp_path):
    out = tmp_path / "d.jsonl"
    run_smpd("soak", "--duration", "1s", "--out", str(out), name=soak_machine.name)
    plan, records, _ = soak.read(str(out))
    assert plan.duration_s == 1.0 and plan.trials is None
    assert records and sum(r["trial_ms"] for r in records) >= 1000 * 0.5


def test_a_damaged_or_busy_soak_file_is_refused_with_one_line(soak_machine, recorded, tmp_path):
    out, _ = recorded
    head, *rest = open(out).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([head, "5", *rest]) + "\n")
    r = run_smpd("soak", "--summary", str(bad), check=False)
    assert r.returncode == 2 and "line 2 is not a trial record" in r.stderr
    r = run_smpd("soak", "--summary", "/etc/hostname/x", check=False)
    assert r.returncode == 2 and "/etc/hostname is not a directory" in r.stderr
    busy = tmp_path / "busy.jsonl"
    busy.write_text(open(out).read())
    import fcntl
    with open(busy, "a") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        r = run_smpd("soak", "--resume", str(busy), name=soak_machine.name, check=False)
    assert r.returncode == 2 and "another smpd soak is writing" in r.stderr


def test_sigterm_also_stops_after_the_current_trial_and_one_soak_per_machine(soak_machine, tmp_path):
    out = tmp_path / "term.jsonl"
    with start_soak(soak_machine.name, out) as p:
        wait_trials(p, out, 2)
        r = run_smpd("soak", "--trials", "5", "--out", str(tmp_path / "second.jsonl"), name=soak_machine.name,
                     check=False)
        assert r.returncode == 2 and f"another smpd soak is running on machine '{soak_machine.name}'" in r.stderr
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "interrupted after trial" in stdout
    assert soak_machine.status()["machine"]["state"] == "UP"


@pytest.mark.parametrize("where, key, value, says", [
    ("header", "trials", "abc", "field 'trials' is \"abc\""),
    ("header", "parks", [], "field 'parks' is []"),
    ("header", "kinds", ["xyz"], "field 'kinds' is [\"xyz\"]"),
    ("header", "seed", None, "field 'seed' is null"),
    ("header", "cpus", None, "field 'cpus' is null"),
    ("record", "trial", "x", "field 'trial' is \"x\""),
    ("record", "park", None, "field 'park' is null"),
    ("record", "inject", "nmi", "field 'inject' is \"nmi\""),
    ("record", "kick", {"rtt_ns": "fast"}, "field 'kick'"),
    ("record", "trial_ms", "NaN", "line 2 is not JSON"),
])
def test_a_soak_file_with_a_wrong_field_is_one_line_everywhere(soak_machine, recorded, tmp_path, where, key, value,
                                                              says):
    out, _ = recorded
    head, first, *rest = (json.loads(x) for x in open(out).read().splitlines())
    (head if where == "header" else first)[key] = value
    bad = tmp_path / "bad.jsonl"
    text = "\n".join(json.dumps(x) for x in (head, first, *rest)) + "\n"
    bad.write_text(text.replace('"NaN"', "NaN"))
    for args in (("soak", "--summary", str(bad)), ("soak", "--resume", str(bad)),
                 ("kexec", "--replay", f"{bad}:1")):
        r = run_smpd(*args, name=soak_machine.name, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (args, r.stderr)
    assert bad.read_text() == text.replace('"NaN"', "NaN")  # refused means untouched


def _altered(recorded, tmp_path, trial: int, **fields):
    """A copy of the recorded run where trial ``trial`` ended otherwise (as a host fault would have it)."""
    out, _ = recorded
    rows = lines(out)
    rows[1 + trial].update(fields)
    copy = tmp_path / "altered.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return copy, rows[1:]


def test_the_summary_names_trials_per_outcome_and_list_gives_them_all(recorded, tmp_path):
    copy, recs = _altered(recorded, tmp_path, 7, outcome="TRIPLE_FAULT", evidence="CPU3 resumed ... triple fault")
    summary = run_smpd("soak", "--summary", str(copy)).stdout
    for outcome in {r["outcome"] for r in recs}:
        want = [r["trial"] for r in recs if r["outcome"] == outcome]
        listed = run_smpd("soak", "--summary", str(copy), "--list", outcome.lower()).stdout
        assert [int(x) for x in re.findall(r"^│ (\d+) ", listed, re.M)] == want, listed
        assert f"smpd kexec --replay {copy}:{want[0]}" in listed
        if outcome != "CLEAN":
            assert f"#{want[0]}" in summary
    assert "#7" in summary and f"--summary {copy} --list OUTCOME" in summary
    none = run_smpd("soak", "--summary", str(copy), "--list", "SMM_HANG").stdout
    assert ("ended SMM_HANG" in none) and ("no trial" in none) == ("SMM_HANG" not in {r["outcome"] for r in recs})


def test_a_stuck_trial_without_an_injection_is_a_host_fault_in_the_summary(recorded, tmp_path):
    out, _ = recorded
    plain = next(r["trial"] for r in lines(out)[1:] if not r["inject"])
    copy, _ = _altered(recorded, tmp_path, plain, outcome="STUCK", evidence="CPU2 never acknowledged the kick")
    summary = run_smpd("soak", "--summary", str(copy)).stdout
    assert f"host faults: STUCK without an injection 1 (#{plain})" in summary


def test_a_replay_that_ends_otherwise_says_so_and_why(soak_machine, recorded, tmp_path):
    out, _ = recorded
    rec = lines(out)[1 + 4]
    other = "STUCK" if rec["outcome"] != "STUCK" else "CLEAN"
    copy, _ = _altered(recorded, tmp_path, 4, outcome=other, evidence="recorded under a host fault")
    r = json.loads(run_smpd("kexec", "--replay", f"{copy}:4", "--json", name=soak_machine.name,
                            check=False).stdout)
    assert r["replay"] == {"file": str(copy), "trial": 4, "recorded_outcome": other, "same_outcome": False}
    assert f"THE REPLAY ENDS {r['outcome']} INSTEAD" in r["notes"][0] and "the host" in r["notes"][0]
    soak_machine.request("reset")
    r = json.loads(run_smpd("kexec", "--replay", f"{out}:4", "--json", name=soak_machine.name, check=False).stdout)
    assert r["replay"]["recorded_outcome"] == rec["outcome"]
    assert r["replay"]["same_outcome"] == (r["outcome"] == rec["outcome"])
    soak_machine.request("reset")


@pytest.mark.parametrize("args, says", [
    (("--list", "STUCK"), "give it with --summary FILE"),
    (("--summary", "x.jsonl", "--list", "LOST"), "--list 'LOST': expected one of CLEAN"),
])
def test_list_needs_a_summary_file_and_an_outcome(args, says):
    r = run_smpd("soak", *args, check=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr


def test_list_shows_a_files_strings_as_text_and_refuses_a_record_without_evidence(recorded, tmp_path):
    """A soak file is data: markup in its evidence is printed as it is, never interpreted."""
    out, _ = recorded
    evil = "[link=http://evil.example/]fine[/link] [/] [blink]x[/blink]"
    copy, _ = _altered(recorded, tmp_path, 3, outcome="STUCK", evidence=evil)
    r = run_smpd("soak", "--summary", str(copy), "--list", "STUCK", env=smpd_env(COLUMNS="300", FORCE_COLOR="1"))
    assert "\x1b]8;" not in r.stdout and "\x1b[5" not in r.stdout  # no hyperlink, no blink
    assert "[link=http://evil.example/]fine[/link]" in re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
    rows = lines(out)
    del rows[1 + 3]["evidence"]
    bad = tmp_path / "noevidence.jsonl"
    bad.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = run_smpd("soak", "--summary", str(bad), "--list", "STUCK", check=False)
    assert r.returncode == 2 and "field 'evidence' is missing" in r.stderr and "Traceback" not in r.stderr


def test_replay_refuses_to_trace_over_its_own_soak_file(soak_machine, recorded):
    out, _ = recorded
    before = out.read_bytes()
    r = run_smpd("kexec", "--replay", f"{out}:1", "--trace", str(out), name=soak_machine.name, check=False)
    assert r.returncode == 2 and "is the soak file this replay reads" in r.stderr
    assert out.read_bytes() == before


def test_a_soak_on_a_nosmt_machine_keeps_the_siblings_parked_in_every_trial(tmp_path):
    """cpu_up() refuses an SMT sibling under nosmt: each trial's offline set holds the siblings
    (recorded in the header), and a file recorded without them does not resume there."""
    m = Machine(run_name("soak"), NCPUS, "--watch", "adaptive", "--boot", "nosmt")
    try:
        out = tmp_path / "nosmt.jsonl"
        run_smpd("soak", "--trials", "6", "--seed", "3", "--out", str(out), name=m.name)
        header, *trials = lines(out)
        assert header["nosmt_siblings"] == [1, 3, 5]
        from smpd import cpulist
        assert all({1, 3, 5} <= set(cpulist.parse(t["offline"])) for t in trials)
        assert {c["cpu"] for c in m.status()["cpus"][1:] if c["hotplug"] == "offline"} == {1, 3, 5}
        plain = tmp_path / "plain.jsonl"
        first = out.read_text().splitlines(keepends=True)[:4]  # the header and 3 of the 6 trials
        plain.write_text("".join(first).replace('"nosmt_siblings":[1,3,5]', '"nosmt_siblings":[]', 1))
        r = run_smpd("soak", "--resume", str(plain), name=m.name, check=False)
        assert r.returncode == 2 and "recorded on a machine booted without nosmt" in r.stderr, r.stderr
        assert "machine '" + m.name + "' booted with nosmt (SMT siblings CPU 1,3,5 kept offline)" in r.stderr
    finally:
        m.down()


def test_a_soak_cut_short_by_a_stopped_cpu_resumes_and_leaves_the_users_offline_cpus(machine, tmp_path):
    """A CPU process stopped mid-soak: the reset after that trial is cut short, the soak ends with
    the error (its trials safe), and tries to reset the machine to the user's offline CPUs. Resumed
    once the CPU runs again, it finishes and leaves the CPUs the user had offline before the first
    trial: it used to take the failed reset's set (the next trial's) for the user's."""
    cfg = tmp_path / "short.toml"
    cfg.write_text("[timeouts]\nipi_ack_ms = 1000\n[kick]\nrounds = 20000\n")
    m = machine(6, "--watch", "adaptive", "--config", str(cfg))
    m.request("offline", cpus="4")
    out = tmp_path / "cut.jsonl"
    victim = m.cpu(2)["pid"]
    with start_soak(m.name, out, trials="40") as p:
        wait_trials(p, out, 3)
        os.kill(victim, signal.SIGSTOP)
        try:
            _, stderr = p.communicate(timeout=120)
        finally:
            os.kill(victim, signal.SIGCONT)
    assert p.returncode == 1 and "did not acknowledge" in stderr and "--resume" in stderr, stderr
    done = len(lines(out)) - 1
    assert done < 40
    assert lines(out)[0]["users_offline"] == [4]
    r = run_smpd("soak", "--resume", str(out), name=m.name, timeout=300)
    assert len(lines(out)) - 1 == 40, r.stdout
    s = m.status()
    assert s["machine"]["state"] == "UP"
    assert [c["cpu"] for c in s["cpus"] if c["hotplug"] == "offline"] == [4]


def _busy_on_core_0():
    os.sched_setaffinity(0, {0})
    while True:
        pass


def test_the_context_switch_count_follows_each_process_and_closes_what_it_opened():
    """Two processes busy on one host core take each other's core by force: the count grows, also
    beyond the descriptors the counter may keep open. A process no longer listed (a respawned
    CPU's old one) has its descriptor closed; a dead one reads as nothing; close() leaves no
    descriptor of the counter's open. A pid that is not a child of the coordinator named is not
    counted."""
    from smpd.tools import soakrun

    ctx = multiprocess.get_context("fork")
    procs = [ctx.Process(target=_busy_on_core_0, daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    fds_before = set(os.listdir("/proc/self/fd"))  # with the processes' sentinels
    try:
        counter = soakrun.CtxCounter([p.pid for p in procs], os.getpid())
        wait_until(lambda: counter.delta() > 0, 30, "an involuntary context switch")
        few = soakrun.CtxCounter([p.pid for p in procs], os.getpid(), keep=0)  # beyond the descriptors it may keep
        assert few.fds == {}
        wait_until(lambda: few.delta() > 0, 30, "an involuntary context switch, counted without a kept descriptor")
        assert few.fds == {}
        procs[0].kill()
        procs[0].join()
        counter.delta()  # the dead one reads as nothing, without an error
        stranger = soakrun.CtxCounter([p.pid for p in procs], parent=1)  # not children of that parent
        assert stranger.delta() == 0 and stranger.last == {} and stranger.fds == {}
        counter.pids = [procs[1].pid]
        assert set(counter.fds) == {procs[1].pid}
        counter.close()
        assert set(os.listdir("/proc/self/fd")) == fds_before
    finally:
        for p in procs:
            p.kill()
            p.join()


def test_a_soaks_hold_knows_its_soak_by_pid_and_start_not_by_the_clock(monkeypatch):
    """Gone means gone: a zombie or a recycled pid (another start) is not the soak; a step of the wall
    clock (psutil's create_time() moves with it) does not make a live soak look gone."""
    import psutil._pslinux

    from smpd.daemon.soakhold import SoakHold
    from smpd.host import trust

    me = SoakHold([1], "6.6", os.getpid(), trust.start_ticks(os.getpid()))
    assert not me.soak_gone()
    assert SoakHold([1], "6.6", os.getpid(), me.started + 1000).soak_gone()  # the pid, but another process
    boot = psutil._pslinux.boot_time
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot() + 3600.0)  # the clock stepped an hour
    assert not me.soak_gone()
    child = subprocess.Popen(["true"])
    wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, what="an exited child")
    try:
        assert SoakHold([1], "6.6", child.pid, trust.start_ticks(child.pid)).soak_gone()  # exited, not reaped
    finally:
        child.wait()


def test_a_killed_soaks_own_last_request_does_not_drop_its_hold():
    """A soak SIGKILLed just after it sent a reset or a hotplug: the coordinator answers that request
    after the soak is gone. It is the soak's (its client pid), not a choice of the user's, and leaves
    the hold for the next plain reset; any other client's choice replaces it."""
    import types

    from smpd.daemon import soakhold

    child = subprocess.Popen(["true"])
    child.wait()  # gone: the killed soak
    sup = types.SimpleNamespace(soak_hold=soakhold.SoakHold([2, 4], "pre-fix", child.pid, 12345),
                                handlers=types.SimpleNamespace(client_pid=child.pid))
    assert soakhold.orphaned(sup) is sup.soak_hold and soakhold.from_the_soak(sup, sup.soak_hold)
    soakhold.drop_if_users_choice(sup)
    assert sup.soak_hold is not None
    sup.handlers.client_pid = os.getpid()  # the user's `smpd online ...`
    soakhold.drop_if_users_choice(sup)
    assert sup.soak_hold is None
