"""The outcome of a kexec as a pure function of the machine's end state (smpd.kernel.outcome).

The flavour x injection table of DESIGN §1, as the end states each cell leaves behind
and the one outcome each must classify as; then precedence, near misses, host faults
and the evidence lines. Milliseconds, no process: the process tests (test_kexec.py,
test_generations.py) check that real runs produce these snapshots.
"""

import pytest

from smpd.kernel.outcome import OUTCOMES, CpuFacts, Snapshot, classify, explain

KICK_OK = {"cpus": {1: {"rounds": 1, "acknowledged": True}, 2: {"rounds": 2, "acknowledged": True}},
           "stuck": [], "budget_ns": 5_000_000, "message": None}


def cpu(n, state="RUNNING", **kw):
    return CpuFacts(cpu=n, state=state, generation=2, **kw)


def tripled(n, cause):
    return cpu(n, "SHUTDOWN", fault="TRIPLE_FAULT", fault_ns=100 + n, fault_page="pgtable page 0 of generation 1",
               fault_cause=cause)


# (kernel, injection after the copy) -> the end state a real run leaves, and its outcome.
TABLE = {
    ("pre-fix", None): (Snapshot("pre-fix", 2, (cpu(1), cpu(2))), "CLEAN"),
    ("pre-fix", "nmi"): (Snapshot("pre-fix", 2, (tripled(1, "NMI taken"), tripled(2, "NMI taken")), injected=True),
                         "TRIPLE_FAULT"),
    ("6.6", None): (Snapshot("6.6", 2, (cpu(1), cpu(2)), kick=KICK_OK), "CLEAN"),
    ("6.6", "smi"): (Snapshot("6.6", 2, (tripled(1, "SMI taken"), cpu(2, "HLT")), kick=KICK_OK, injected=True),
                     "TRIPLE_FAULT"),
    ("6.5", None): (Snapshot("6.5", 2, (cpu(1), cpu(2)), kick=KICK_OK, parked_in_init=True), "CLEAN"),
    ("6.5", "nmi"): (Snapshot("6.5", 2, (cpu(1, held=True), cpu(2, held=True)), kick=KICK_OK, parked_in_init=True,
                              injected=True), "CLEAN"),
    ("6.5", "mce"): (Snapshot("6.5", 2, (cpu(1, "SHUTDOWN", fault="MCE_SHUTDOWN"), cpu(2, "SHUTDOWN",
                                                                                    fault="MCE_SHUTDOWN")),
                              kick=KICK_OK, parked_in_init=True, injected=True), "MCE_SHUTDOWN"),
    ("6.5", "smi-hang"): (Snapshot("6.5", 2, (cpu(1, "WAIT_FOR_SIPI"), cpu(2, "WAIT_FOR_SIPI")), kick=KICK_OK,
                                   parked_in_init=True, injected=True, smm_hang="the SMI injected at after-kick"),
                          "SMM_HANG"),
}


@pytest.mark.parametrize("cell", list(TABLE), ids=[f"{k}-{i or 'none'}" for k, i in TABLE])
def test_each_flavour_and_injection_classifies_as_the_design_says(cell):
    snap, outcome = TABLE[cell]
    v = classify(snap)
    assert v.outcome == outcome
    assert explain(v)


@pytest.mark.parametrize("kernel", ["pre-fix", "6.6"])
def test_a_broadcast_mce_that_reaches_the_kexec_cpu_shuts_the_machine_down_over_a_triple_fault(kernel):
    """CPU 0 has #MC off from relocate_kernel() on: a broadcast MCE there shuts the machine down,
    whatever the APs did with the same MCE (one resumed in overwritten memory here)."""
    s = Snapshot(kernel, 2, (tripled(1, "MCE taken"), cpu(2, "HLT")), kick=KICK_OK if kernel == "6.6" else None,
                 injected=True, mce_on_kexec_cpu="after-copy")
    v = classify(s)
    assert v.outcome == "MCE_SHUTDOWN"
    assert explain(v).startswith("the broadcast MCE at after-copy reached CPU 0, the kexec CPU, where #MC cannot be taken")
    assert "wait-for-SIPI" not in explain(v)
    both = classify(Snapshot("6.5", 2, (cpu(1, "SHUTDOWN", fault="MCE_SHUTDOWN"), cpu(2)), kick=KICK_OK,
                             parked_in_init=True, injected=True, mce_on_kexec_cpu="during-copy"))
    assert explain(both).endswith("; the MCE reached CPU 1 in wait-for-SIPI (INIT) too")


def test_held_interrupts_are_named_in_a_clean_6_5_kexec():
    snap, _ = TABLE[("6.5", "nmi")]
    e = explain(classify(snap))
    assert "wait-for-SIPI (INIT)" in e and "NMI/SMI held pending on CPU 1-2" in e


def test_the_first_cpu_to_fault_is_the_evidence():
    v = classify(Snapshot("pre-fix", 3, (tripled(2, "MWAIT woken by a write to thread_info[2].flags"),
                                         tripled(1, "MWAIT woken by a write to thread_info[1].flags"))))
    assert v.cause["cpu"] == 1 and v.cause["others"] == 1
    assert explain(v).startswith('CPU1 resumed after "MWAIT woken by a write to thread_info[1].flags"')


@pytest.mark.parametrize("first, then", [
    ("CPU_LOST", "MACHINE_RESET"), ("MACHINE_RESET", "SMM_HANG"), ("SMM_HANG", "MCE_SHUTDOWN"), ("MCE_SHUTDOWN", "TRIPLE_FAULT"),
    ("TRIPLE_FAULT", "CORRUPTION"), ("CORRUPTION", "STUCK"), ("STUCK", "CLEAN"),
])
def test_precedence_what_ends_the_machine_first_wins(first, then):
    facts = {
        "CPU_LOST": dict(cpus=(cpu(1, "GONE", alive=False, pid=9, exit_code=-9),)),
        "MACHINE_RESET": dict(init_to_boot_cpu=True, panic_cpu=2),
        "SMM_HANG": dict(smm_hang="the SMI injected at after-kick"),
        "MCE_SHUTDOWN": dict(cpus=(cpu(2, "SHUTDOWN", fault="MCE_SHUTDOWN"),)),
        "TRIPLE_FAULT": dict(cpus=(tripled(3, "NMI taken"),)),
        "CORRUPTION": dict(corruption=({"addr": 0x1000040, "symbol": "text+0x40", "value": 1, "expected": 2},)),
        "STUCK": dict(kick={"cpus": {4: {"rounds": 1000}}, "stuck": [4], "budget_ns": 5_000_000,
                            "message": "CPU4 is stuck in mwait_play_dead()"}, cpus=(cpu(4, "MWAIT"),)),
        "CLEAN": {},
    }

    def snap(*names):
        kw = {"cpus": ()}
        for n in names:
            f = dict(facts[n])
            kw["cpus"] = kw["cpus"] + f.pop("cpus", ())
            kw.update(f)
        return Snapshot("6.6", 2, **kw)

    assert classify(snap(first, then)).outcome == first
    assert classify(snap(then)).outcome == then
    assert first in OUTCOMES and then in OUTCOMES


def test_a_store_that_left_no_trace_is_a_near_miss_not_corruption():
    writer = cpu(3, "HLT", fault="STRAY_STORE", stray_stores=1, fault_cause="NMI taken",
                 fault_page="text page 1 of generation 2", first_store=(0x12db6c8, "data+0x10f6c8", 0xC3DAD7AF))
    v = classify(Snapshot("6.6", 3, (writer,), kick=KICK_OK, injected=True))
    assert v.outcome == "CLEAN" and len(v.near_misses) == 1
    assert "near miss: CPU3 executed foreign bytes and stored 0xc3dad7af to data+0x10f6c8" in explain(v)
    landed = classify(Snapshot("6.6", 3, (writer,), kick=KICK_OK, injected=True, corruption=(
        {"addr": 0x12db6c8, "symbol": "data+0x10f6c8", "value": 0xC3DAD7AF, "expected": 0},)))
    assert landed.outcome == "CORRUPTION" and not landed.near_misses
    assert "CPU3 resumed after \"NMI taken\"" in explain(landed)


def test_a_stopped_process_is_a_host_fault_said_apart_from_the_outcome():
    stuck = cpu(2, "MWAIT", host_note="its process is stopped (SIGSTOP): a host fault, not the machine's")
    v = classify(Snapshot("6.6", 2, (stuck,), kick={"cpus": {2: {"rounds": 1000}}, "stuck": [2],
                                                    "budget_ns": 5_000_000,
                                                    "message": "CPU2 is stuck in mwait_play_dead()"}))
    assert v.outcome == "STUCK" and v.host_faults == ("CPU2: its process is stopped (SIGSTOP): a host fault, "
                                                       "not the machine's",)
    assert "never acknowledged the kick (1000 rounds, 5 ms)" in explain(v)


def test_kdump_says_the_parked_cpus_stayed_where_they_were():
    v = classify(Snapshot("pre-fix", 2, (cpu(1, "MWAIT"), cpu(2, "MWAIT")), crash=True, left_behind=(1, 2)))
    assert v.outcome == "CLEAN"
    assert "crash_smp_send_stop()" in explain(v) and "crashkernel=" in explain(v)
    assert any("not started by the new kernel" in n for n in v.notes)


def test_no_parked_cpu_is_said_plainly():
    assert "no CPU was parked" in explain(classify(Snapshot("6.6", 2, (cpu(1),), kick={"cpus": {}, "stuck": []})))


def test_init_to_the_boot_cpu_resets_the_machine_before_anything_else_is_judged():
    v = classify(Snapshot("6.5", 1, (cpu(1, "MWAIT"), tripled(2, "NMI taken")), panic_cpu=2, init_to_boot_cpu=True))
    assert v.outcome == "MACHINE_RESET" and "CPU2" in explain(v) and "b1472a60a584" in explain(v)


@pytest.mark.parametrize("parked, says", [(True, "wait-for-SIPI"), (False, "stay in mwait_play_dead()")])
def test_a_panic_that_stops_the_cpus_is_clean_and_says_where_they_stay(parked, says):
    v = classify(Snapshot("6.5", 1, (cpu(1, "MWAIT"), cpu(2, "HLT")), panic_cpu=0 if parked else 3,
                          parked_in_init=parked))
    e = explain(v)
    assert v.outcome == "CLEAN" and says in e and "panic() on CPU" in e and "verified its memory" not in e
    assert ("b1472a60a584" in e) is (not parked)
