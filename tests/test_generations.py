"""Kernel generations on a real machine: chains, flavours, boot parameters, kdump (issue 12).

The maps behind these outcomes are unit-tested in test_memmap.py and their
classification in test_outcome.py; here real CPU processes wake (or not) on real
writes, and the reports must say what the maps predict.
"""

import json
import re

import pytest

from conftest import Machine, patient_config, run_name, run_smpd, smpd_env
from smpd.machine import layout as L

NCPUS = 8
SIBLINGS = [1, 3, 5, 7]


@pytest.fixture(scope="module")
def nosmt(tmp_path_factory):
    """`smpd up --boot nosmt`: the odd CPUs are SMT siblings, parked at boot by every kernel."""
    m = Machine(run_name("gen"), NCPUS, "--watch", "adaptive", "--seed", "21", "--boot", "nosmt",
                "--config", patient_config(tmp_path_factory.mktemp("gen")))
    yield m
    m.down()


@pytest.fixture
def fresh(nosmt):
    nosmt.request("reset")
    yield nosmt
    nosmt.request("reset")


def _chain(m, flavour: str, n: int = 3, *extra: str):
    r = run_smpd("chain", "--kexecs", str(n), "--kernel", flavour, "--seed", "3", "--json", *extra, name=m.name,
                 check=False)
    return r.returncode, json.loads(r.stdout)


def test_nosmt_parks_the_siblings_at_boot_in_the_kernels_own_memory(fresh):
    s = fresh.status()
    assert s["machine"]["kernel"] == "6.6 nosmt" and s["machine"]["generation"] == 1
    for c in s["cpus"][1:]:
        if c["cpu"] in SIBLINGS:
            assert c["state"] == "MWAIT" and c["hotplug"] == "offline"
            assert c["monitor"]["symbol"] == f"mwait_cpu_dead[{c['cpu']}].control"
            assert c["mwait_cpu_dead"]["status"] == L.CPUDEAD_MWAIT_WAIT
        else:
            assert c["state"] == "RUNNING"


def test_status_lists_the_siblings_as_a_grouped_cpulist_that_hotplug_reads_back():
    """The kernel's grouped ranges (bitmap_parselist): nosmt's siblings are every second CPU. (The
    CPU grid and its lists are what status shows above 32 CPUs.)"""
    m = Machine(run_name("gen"), 40, "--watch", "adaptive", "--boot", "nosmt")
    try:
        out = run_smpd("status", name=m.name).stdout
        assert "MWAIT          CPU 1-39:1/2" in out and "RUNNING        CPU 0-38:1/2" in out, out
        r = run_smpd("online", "1-N:2/4", name=m.name, check=False)  # 1-2, 5-6, ...: siblings among them
        assert r.returncode == 2 and "CPU 1-37:1/4 are SMT siblings" in r.stderr and "nosmt" in r.stderr
        run_smpd("offline", "2-N:2/4", name=m.name)  # 2, 6, 10, ...
        out = run_smpd("status", name=m.name).stdout
        assert "MWAIT          CPU 1-39:3/4" in out and "RUNNING        CPU 0-36:1/4" in out, out
    finally:
        m.down()


def test_a_pre_fix_chain_survives_link_one_and_triple_faults_on_link_two(fresh):
    code, r = _chain(fresh, "pre-fix")
    assert code == 3  # a link was not CLEAN: the outcome, not a failure of smpd
    assert [link["outcome"] for link in r["links"]] == ["CLEAN", "TRIPLE_FAULT"] and r["first_failing_link"] == 2
    two = r["links"][1]
    assert "MWAIT woken by a write to thread_info[" in two["evidence"]
    assert two["memory"]["old"]["regions"]["tasks"] == two["memory"]["new"]["regions"]["tasks"]
    assert two["generation"] == {"old": 2, "new": 3}
    # Generations 2 and 3 have the same map: the page that decided it plays the same part in both,
    # and the evidence says why it is still not the old kernel's (smpd's page identity).
    page = re.search(r"in overwritten memory: (\w+ page \d+) of generation 2 at 0x[0-9a-f]+ "
                     r"\(now generation 3's (\w+ page \d+), the same part", two["evidence"])
    assert page and page[1] == page[2] and "README: Page identity)" in two["evidence"], two["evidence"]
    # link 1: the siblings were parked again by generation 2, on generation 2's task_structs
    one = r["links"][0]
    assert one["memory"]["old"]["regions"]["tasks"] != one["memory"]["new"]["regions"]["tasks"]
    assert all(c["state"] == "MWAIT" for c in one["cpus"] if c["cpu"] in SIBLINGS)


@pytest.mark.parametrize("flavour", ["6.6", "6.5"])
def test_the_fixed_kernels_chain_cleanly(fresh, flavour):
    code, r = _chain(fresh, flavour)
    assert code == 0 and r["first_failing_link"] is None, [(x["outcome"], x["evidence"]) for x in r["links"]]
    assert [link["outcome"] for link in r["links"]] == ["CLEAN"] * 3
    assert [link["generation"]["new"] for link in r["links"]] == [2, 3, 4]
    assert fresh.status()["machine"]["generation"] == 4


def test_the_shutdown_follows_upstream_kick_then_reboot_then_init(fresh):
    r = fresh.request("kexec", kernel="6.5", seed=1)
    coord = [e["event"] for e in r["timeline"] if e["cpu"] == 0]
    kick = next(i for i, e in enumerate(coord) if e.startswith("smp_kick_mwait_play_dead()"))
    reboot = next(i for i, e in enumerate(coord) if e.startswith("stop_other_cpus(): REBOOT vector"))
    init = next(i for i, e in enumerate(coord) if e.startswith("smp_park_other_cpus_in_init()"))
    copy = next(i for i, e in enumerate(coord) if e.startswith("copy:"))
    boot = next(i for i, e in enumerate(coord) if e.startswith("generation 2 boots"))
    sipi = next(i for i, e in enumerate(coord) if e.startswith("generation 2: INIT/SIPI"))
    assert kick < reboot < init < copy < boot < sipi, coord
    # --kernel 6.5 on a machine that runs 6.6: the CPUs re-park as 6.5's first; the kexec is 6.5's, as
    # its report says (its note named generation 1 by the kernel it had booted)
    assert coord[0].startswith("the running kernel is 6.5") and coord[1].startswith("kexec: generation 1 (6.5 "), coord
    assert r["kernel"] == "6.5", r["kernel"]


def test_kdump_stops_the_online_cpus_by_nmi_and_leaves_the_parked_ones_alone(fresh):
    r = run_smpd("kexec", "--crash", "--kernel", "pre-fix", "--seed", "2", "--json", name=fresh.name, check=False)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["outcome"] == "CLEAN", report["evidence"]
    assert "crash_smp_send_stop()" in report["evidence"] and report["kick"] is None
    coord = [e["event"] for e in report["timeline"] if e["cpu"] == 0]
    assert any(e.startswith("crash_smp_send_stop(): NMI") for e in coord)
    assert not any("smp_kick" in e or "INIT to" in e for e in coord)
    states = {c["cpu"]: c["state"] for c in report["cpus"]}
    assert all(states[c] == "MWAIT" for c in SIBLINGS)  # still on generation 1's lines, untouched
    r = run_smpd("kexec", name=fresh.name, check=False)
    assert r.returncode == 2 and "runs a crash kernel" in r.stderr


def test_maxcpus_leaves_cpus_where_the_old_kernel_left_them(fresh):
    r = fresh.request("kexec", kernel="6.6", boot="maxcpus=4", seed=1)
    assert r["outcome"] == "CLEAN", r["evidence"]
    states = {c["cpu"]: (c["state"], c["generation"]) for c in r["cpus"]}
    assert states[5] == ("HLT", 1) and states[7] == ("HLT", 1)  # kicked by gen 1, never restarted
    assert states[4][1] == 1 and states[6][1] == 1  # stopped by REBOOT in gen 1, never restarted
    assert any("not started by the new kernel" in n for n in r["notes"])
    # Their struct mwait_cpu_dead was in generation 1's per-CPU area, which generation 2's writes
    # took over: status says so rather than show its bytes as the struct.
    s = fresh.status()["cpus"]
    gone = {c["cpu"] for c in s if c["mwait_cpu_dead"]["overwritten"]}
    assert gone and gone <= {4, 5, 6, 7} and not {0, 1, 2, 3} & gone
    table = run_smpd("status", name=fresh.name, env=smpd_env(fresh.name, COLUMNS="200")).stdout
    rows = {int(line.split()[0]): line.split() for line in table.splitlines() if line[:4].strip().isdigit()}
    assert all(rows[c][2:4] == ["overwritten", "overwritten"] for c in gone)
    assert rows[0][2].startswith("0x") and "online; by state:" in table


def test_a_reset_says_which_offline_cpus_generation_1_never_started(machine):
    """maxcpus=3 at `up`: CPUs 3-5 stay in wait-for-SIPI, where power-on left them, and after every
    power cycle; the reset's line says so, rather than count them among the CPUs it parked in
    mwait_play_dead()."""
    m = machine(6, "--watch", "adaptive", "--boot", "maxcpus=3")
    assert [(c["state"], c["hotplug"]) for c in m.status()["cpus"][3:]] == [("WAIT_FOR_SIPI", "offline")] * 3
    run_smpd("offline", "2", name=m.name)
    r = run_smpd("reset", name=m.name)
    assert "offline: CPU 2 in mwait_play_dead(); CPU 3-5 not started by it (in wait-for-SIPI)" in r.stdout, r.stdout
    assert [c["state"] for c in m.status()["cpus"][2:]] == ["MWAIT"] + ["WAIT_FOR_SIPI"] * 3


@pytest.mark.parametrize("knob, outcome", [(False, "CLEAN"), (True, "SMM_HANG")])
def test_an_smi_while_cpus_sit_in_init_hangs_smm_only_where_the_firmware_does(tmp_path, knob, outcome):
    cfg = patient_config(tmp_path, f"[firmware]\nsmm_hangs_with_cpus_in_init = {'true' if knob else 'false'}\n")
    m = Machine(run_name("smm"), 4, "--watch", "adaptive", "--config", str(cfg))
    try:
        m.request("offline", cpus="1-3")
        r = m.request("kexec", kernel="6.5", inject=["smi@after-copy"], seed=1)
        assert r["outcome"] == outcome, r["evidence"]
        if knob:
            assert "bugzilla 217995" in r["evidence"]
    finally:
        m.down()


@pytest.mark.parametrize("knob, outcomes", [(False, {"TRIPLE_FAULT", "CORRUPTION"}), (True, {"CLEAN"})])
def test_smi_auto_halt_restart_keeps_a_halted_cpu_halted(tmp_path, knob, outcomes):
    cfg = patient_config(tmp_path, f"[firmware]\nsmi_auto_halt_restart = {'true' if knob else 'false'}\n")
    m = Machine(run_name("rsm"), 4, "--watch", "adaptive", "--config", str(cfg))
    try:
        m.request("offline", cpus="1-3")
        r = m.request("kexec", kernel="6.6", inject=["smi@after-copy"], seed=1)
        assert r["outcome"] in outcomes, r["evidence"]
    finally:
        m.down()


def test_only_the_kaslr_seed_changes_and_the_waking_write_changes():
    """Two machines alike but for the KASLR seed. With KASLR the cold-booted image no longer
    sits at the bottom of RAM, so even the first kexec's early allocations reach generation
    1's memory; which write wakes a parked sibling first is the new kernel's fork_idle() on
    one (seed 0), its decompressed image on the other (seed 24): the seeds were found with
    the pure maps (tests/test_memmap.py)."""
    seen = {}
    for seed in (0, 24):
        m = Machine(run_name("kaslr"), NCPUS, "--watch", "adaptive", "--seed", "21", "--kernel", "pre-fix",
                    "--boot", f"nosmt,kaslr={seed}")
        try:
            seen[seed] = m.request("kexec", seed=3)
        finally:
            m.down()
    assert all(r["outcome"] == "TRIPLE_FAULT" for r in seen.values()), [r["evidence"] for r in seen.values()]
    assert "woken by a write to thread_info[" in seen[0]["evidence"]
    assert seen[0]["memory"]["old"]["regions"]["text"] != seen[24]["memory"]["old"]["regions"]["text"]
    first = {seed: r["waking_writes"][0] for seed, r in seen.items()}
    assert "tasks page" in first[0]["write"] and first[0]["line"].startswith("thread_info[")
    assert "text page" in first[24]["write"] or "data page" in first[24]["write"], first


def test_chain_refuses_bad_input_and_leaves_the_machine_as_it_was(fresh):
    kexecs = fresh.status()["machine"]["kexecs"]
    for args, says in ((("chain", "--kexecs", "0"), "0 is not in the range 1..100"),
                       (("chain", "--kexecs", "3", "--boot", "maxcpus=99"), "maxcpus=99 is not in the range 1..8"),
                       (("chain", "--kexecs", "3", "--kernel", "7.0"), "'7.0' is not one of")):
        r = run_smpd(*args, name=fresh.name, check=False)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    assert fresh.status()["machine"]["generation"] == 1 and fresh.status()["machine"]["kexecs"] == kexecs


def test_6_5_sends_init_only_to_the_cpus_its_kernel_started(fresh):
    """3f874c9b2aae: INIT to a CPU the kernel never booted (maxcpus=4 here) would start it for nothing."""
    first = fresh.request("kexec", kernel="6.5", boot="maxcpus=4", seed=1)
    assert first["outcome"] == "CLEAN", first["evidence"]
    second = fresh.request("kexec", kernel="6.5", seed=1)
    inits = [e["event"] for e in second["timeline"] if e["cpu"] == 0
             and e["event"].startswith("smp_park_other_cpus_in_init(): INIT to")]
    assert len(inits) == 1 and inits[0].startswith("smp_park_other_cpus_in_init(): INIT to CPU 1-3"), inits


def test_a_machine_that_triple_faulted_refuses_kexec_until_reset(fresh):
    code, r = _chain(fresh, "pre-fix", 2)
    assert code == 3 and r["links"][-1]["outcome"] == "TRIPLE_FAULT"
    s = fresh.status()
    assert s["machine"]["state"] == "ENDED"
    assert all(c["mwait_cpu_dead"] is None for c in s["cpus"])  # a pre-fix kernel has none
    for args in (("kexec",), ("chain", "--kexecs", "2"), ("kick",)):
        refused = run_smpd(*args, name=fresh.name, check=False)
        assert refused.returncode == 2 and "ended in the kexec into generation 3" in refused.stderr, refused.stderr
    fresh.request("reset")
    assert fresh.request("kexec", kernel="6.6", seed=1)["outcome"] == "CLEAN"


def test_the_readme_corruption_recipe_corrupts_and_names_the_stack_page(machine):
    """README: pre-fix, KASLR 277, seed 1, CPU 7 parked: generation 2's boot wakes CPU 7, whose
    stack page now holds generation 2's text; its stray store lands in the new text."""
    m = machine(8, "--kernel", "pre-fix", "--boot", "kaslr=277", "--seed", "1")
    m.request("offline", cpus="7")
    r = m.request("kexec")
    assert r["outcome"] == "CORRUPTION", r["evidence"]
    assert r["corrupted_words"] >= 1 and r["corruption"][0]["symbol"].startswith("text+")
    assert "CPU7 resumed after \"MWAIT woken by a write to thread_info[7].flags\"" in r["evidence"]
    assert "stack page 31 of generation 1 at 0x" in r["evidence"]
    assert "(now generation 2's text page 0)" in r["evidence"]  # another part: no more said
    assert any(w["cpu"] == 7 and "generation 2's boot: tasks page 0" in w["write"] for w in r["waking_writes"])


def test_a_cpu_stopped_by_nmi_holds_a_later_nmi_instead_of_taking_it(machine):
    """kdump: crash_nmi_callback() halts inside the NMI handler; no IRET, so NMIs stay blocked."""
    m = machine(4)
    r = m.request("kexec", crash=True, inject=["nmi@after-copy:2"])
    c2 = next(c for c in r["cpus"] if c["cpu"] == 2)
    assert c2["fault"] == "NONE", r["evidence"]
    irq = m.cpu(2)["interrupts"]["nmi"]
    assert irq["taken"] == 0 and irq["held"] >= 1 and irq["pending"] == 1
    assert any(e["cpu"] == 2 and e["event"].startswith("NMI held pending") for e in r["timeline"])


def test_status_still_reads_after_more_kexecs_than_the_generation_table_keeps(machine):
    m = machine(2)
    r = m.request("chain", kexecs=L.GEN_SLOTS + 1, kernel="6.6")
    assert r["first_failing_link"] is None
    s = m.status()
    assert s["machine"]["generation"] == L.GEN_SLOTS + 2 and s["cpus"][0]["generation"] == L.GEN_SLOTS + 2


def test_a_cpu_left_in_an_old_generation_keeps_its_map_through_more_kexecs_than_the_table_keeps(machine):
    """maxcpus=2 on every kernel: CPUs 2 and 3 stay in generation 1's HLT while the chain goes on.
    The table's slots go to generations nothing runs any more, so theirs survives 70 kexecs
    (it used to be overwritten at the 64th: an internal LookupError, and `status` broken for good)."""
    m = machine(4)
    m.request("offline", cpus="3")
    r = m.request("chain", kexecs=L.GEN_SLOTS + 6, kernel="6.6", boot="maxcpus=2")
    assert r["first_failing_link"] is None, r["links"][-1]["evidence"]
    s = m.status()
    assert s["machine"]["generation"] == L.GEN_SLOTS + 7
    assert {c["cpu"]: c["generation"] for c in s["cpus"]} == {0: L.GEN_SLOTS + 7, 1: L.GEN_SLOTS + 7, 2: 1, 3: 1}
    assert m.request("reset")["generation"] == 1
    assert {c["generation"] for c in m.status()["cpus"]} == {1}


def test_a_kexec_with_no_generation_slot_left_is_refused_and_changes_nothing(machine):
    """Each kexec leaves one more CPU behind (maxcpus one lower each time): after 63, the CPUs run
    64 generations, all the table keeps; the next kexec is refused (exit 2), status still reads."""
    n = L.GEN_SLOTS + 2
    m = machine(n)
    for k in range(1, L.GEN_SLOTS):
        assert m.request("kexec", kernel="6.6", boot=f"maxcpus={n - k}", seed=k)["outcome"] == "CLEAN"
    r = run_smpd("kexec", "--boot", f"maxcpus={n - L.GEN_SLOTS}", name=m.name, check=False)
    assert r.returncode == 2 and f"are in {L.GEN_SLOTS} different kernel generations" in r.stderr, r.stderr
    s = m.status()
    assert s["machine"]["generation"] == L.GEN_SLOTS
    assert len({c["generation"] for c in s["cpus"]}) == L.GEN_SLOTS
    m.request("reset")
    assert m.request("kexec", kernel="6.6", seed=1)["outcome"] == "CLEAN"


@pytest.mark.parametrize("cpu, check, outcome, states", [
    (0, True, "CLEAN", {c: "WAIT_FOR_SIPI" for c in (1, 2, 3)}),
    (2, True, "CLEAN", {1: "MWAIT", 2: "RUNNING", 3: "MWAIT"}),
    (2, False, "MACHINE_RESET", {1: "MWAIT", 2: "RUNNING", 3: "MWAIT"}),
])
def test_a_6_5_panic_off_the_boot_cpu_parks_nothing_in_init_or_resets_without_b1472a60a584(
        tmp_path, cpu, check, outcome, states):
    """panic() with no crash kernel: smp_send_stop() -> native_stop_other_cpus() on the panicking CPU.
    On CPU 0, 6.5 parks every other CPU in INIT; on CPU 2, b1472a60a584 refuses (INIT would reach the
    boot CPU) and the CPUs stay where REBOOT left them; without it, INIT to CPU 0 resets the machine."""
    cfg = patient_config(tmp_path, f"[kernel]\ninit_only_from_boot_cpu = {'true' if check else 'false'}\n")
    m = Machine(run_name("panic"), 4, "--watch", "adaptive", "--kernel", "6.5", "--boot", "nosmt",
                "--config", str(cfg))
    try:
        r = run_smpd("panic", "--cpu", str(cpu), "--json", name=m.name, check=False)
        assert r.returncode == (0 if outcome == "CLEAN" else 3), r.stderr
        rep = json.loads(r.stdout)
        assert rep["outcome"] == outcome and rep["panic_cpu"] == cpu, rep["evidence"]
        assert {c["cpu"]: c["state"] for c in rep["cpus"]} == states
        coord = [e["event"] for e in rep["timeline"] if e["cpu"] == 0]
        assert not any("smp_kick_mwait_play_dead" in e for e in coord)  # kexec_in_progress is false
        if cpu and check:
            assert any("not the boot CPU" in e and "b1472a60a584" in e for e in coord), coord
        if outcome == "MACHINE_RESET":
            assert "INIT to CPU 0, the boot CPU" in rep["evidence"]
            assert any(e["kind"] == "machine_end" for e in rep["timeline"])
        assert m.status()["machine"]["state"] == "ENDED"
        for args in (("kexec",), ("online", "1"), ("offline", "2")):  # no kernel runs to do them
            refused = run_smpd(*args, name=m.name, check=False)
            assert refused.returncode == 2 and f"CPU {cpu} panicked" in refused.stderr, refused.stderr
        # The CPUs the panic stopped are marked offline (stop_this_cpu()); a power cycle brings back
        # the machine as it booted, with only the SMT siblings parked.
        assert m.request("reset")["offline"] == [1, 3]
        assert m.request("kexec", seed=1)["outcome"] == "CLEAN"
    finally:
        m.down()


def test_panic_refuses_bad_input_and_leaves_the_machine_as_it_was(fresh):
    for args, says in ((("panic", "--cpu", "8"), "has CPUs 0..7"),
                       (("panic", "--cpu", "3"), "CPU 3 is offline"),
                       (("panic", "--cpu", "x"), "--cpu")):
        r = run_smpd(*args, name=fresh.name, check=False)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    assert fresh.status()["machine"]["state"] != "ENDED"


def test_a_nosmt_sibling_never_booted_comes_up_once_parks_and_is_refused_after():
    """maxcpus=4 leaves siblings 5 and 7 unstarted: cpu_up() boots each once and it parks in
    mwait_play_dead() (the kernel's ECANCELED); from then on cpu_up() refuses it (EPERM)."""
    m = Machine(run_name("gen"), 8, "--watch", "adaptive", "--boot", "nosmt,maxcpus=4")
    try:
        r = run_smpd("online", "5", name=m.name, check=False)
        assert r.returncode == 1 and "CPU 5: SMT sibling of a nosmt kernel" in r.stdout, r.stdout + r.stderr
        assert "(ECANCELED); not online" in r.stdout
        c = m.cpu(5)
        assert (c["state"], c["hotplug"]) == ("MWAIT", "offline") and c["monitor"]["symbol"] == "mwait_cpu_dead[5].control"
        r = run_smpd("online", "4-7", name=m.name, check=False)
        assert r.returncode == 2 and "CPU 5 is an SMT sibling" in r.stderr and "nothing was onlined" in r.stderr
        assert m.cpu(4)["hotplug"] == "offline"  # not started by maxcpus, and not onlined either
    finally:
        m.down()


def test_a_stray_interrupt_or_a_poke_that_ends_the_machine_ends_it_then_not_at_the_next_kexec(machine):
    """CPUs 2-5 are left where generation 1 put them (maxcpus=2). A stray NMI to CPU 2, halted
    in generation 1's code the copy overwrote, triple-faults it: the machine ends there and then,
    and the next kexec is refused, where it used to run and report that triple fault as its own.
    So does a poke of the line a pre-fix CPU left in generation 1 still monitors."""
    m = machine(6, "--watch", "adaptive")
    m.request("offline", cpus="5")
    assert m.request("kexec", kernel="6.6", boot="maxcpus=2", seed=1)["outcome"] == "CLEAN"
    r = m.request("inject", kind="nmi", cpus="2", count=1)
    assert r["ended"] == "ended when a stray NMI reached CPU 2 (TRIPLE_FAULT on CPU 2)", r["ended"]
    assert m.status()["machine"]["state"] == "ENDED"
    refused = run_smpd("kexec", name=m.name, check=False)
    assert refused.returncode == 2 and "ended when a stray NMI reached CPU 2" in refused.stderr, refused.stderr
    m.request("reset")
    m.request("offline", cpus="5")
    assert m.request("kexec", kernel="pre-fix", boot="maxcpus=2", seed=1)["outcome"] == "CLEAN"
    line = m.cpu(5)["monitor"]["addr"]
    poked = run_smpd("poke", hex(line), name=m.name)
    assert "woke CPU 5" in poked.stdout and "nothing runs on it until `smpd reset`" in poked.stdout, poked.stdout
    assert m.status()["machine"]["state"] == "ENDED"
    # a write that wakes nobody ends nothing
    m.request("reset")
    assert m.request("poke", target="mwait_cpu_dead[3]")["ended"] is None
    assert m.status()["machine"]["state"] == "UP"


def test_6_5_says_which_cpus_it_did_not_park_in_init(machine):
    """A 6.5 kernel booted with maxcpus=2 INITs only the CPUs it started (3f874c9b2aae): its
    evidence names the others, which stay in generation 1's HLT, instead of 'every other CPU sat in
    wait-for-SIPI' (kernel engineer's review)."""
    m = machine(6, "--watch", "adaptive")
    m.request("offline", cpus="5")
    assert m.request("kexec", kernel="6.6", boot="maxcpus=2", seed=1)["outcome"] == "CLEAN"
    r = m.request("kexec", kernel="6.5", seed=2)
    assert r["outcome"] == "CLEAN", r["evidence"]
    assert "CPU 2-5, which it never started (maxcpus), got no INIT" in r["evidence"], r["evidence"]
    assert {c["cpu"]: c["state"] for c in r["cpus"]}[3] == "HLT"


def test_a_pre_fix_cpu_left_parked_by_maxcpus_is_named_as_a_live_hazard(machine):
    """A CLEAN kexec with maxcpus=2 from a pre-fix kernel leaves CPU 5 in MWAIT on generation 1's
    thread_info[5].flags: the outcome is CLEAN, and a note says the hazard lives on."""
    m = machine(6, "--watch", "adaptive")
    m.request("offline", cpus="5")
    r = m.request("kexec", kernel="pre-fix", boot="maxcpus=2", seed=1)
    assert r["outcome"] == "CLEAN", r["evidence"]
    assert "CPU5 still MWAITs on generation 1's thread_info[5].flags" in " ".join(r["notes"]), r["notes"]


def test_a_stray_smi_that_hangs_smm_ends_the_machine_then(tmp_path):
    """A 6.5 kernel booted with maxcpus=2 leaves CPUs 2-3 in INIT; on firmware that waits in SMM for
    every CPU, a stray SMI hangs the machine: it is ENDED there and then (the stray-interrupt check
    used to look at CPU faults only, and the next kexec ran)."""
    cfg = patient_config(tmp_path, "[firmware]\nsmm_hangs_with_cpus_in_init = true\n")
    m = Machine(run_name("smmx"), 4, "--watch", "adaptive", "--config", str(cfg))
    try:
        assert m.request("kexec", kernel="6.5", boot="maxcpus=2", seed=1)["outcome"] == "CLEAN"
        assert {c["state"] for c in m.status()["cpus"][2:]} == {"WAIT_FOR_SIPI"}
        r = m.request("inject", kind="smi", cpus="1", count=1)
        assert r["ended"] and "SMM_HANG" in r["ended"], r["ended"]
        assert m.status()["machine"]["state"] == "ENDED"
        assert run_smpd("kexec", name=m.name, check=False).returncode == 2
    finally:
        m.down()
