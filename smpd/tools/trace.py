"""A kexec, a kick or a chain as a Chrome trace-event file, for Perfetto UI and chrome://tracing.

The format is the Trace Event Format's JSON object form: {"traceEvents": [...]}, times
in microseconds. One process (the machine), one track (tid) per CPU, CPU 0 being the
coordinator:

* the coordinator's phases are complete events ("ph": "X"), named as the kernel names
  them (native_stop_other_cpus(), smp_kick_mwait_play_dead(), relocate_kernel(): copy);
* each other CPU's execution state is a run of complete events, one per state
  (MWAIT, HLT, WAIT_FOR_SIPI, RUNNING, SHUTDOWN), from its state at the start and the
  state changes its events say; over it, the windows in which a woken or interrupted
  CPU executes (RUNNING (woken), RUNNING (interrupt handler), SMM);
* the emulator's own work (waiting for an injection to be taken, for the CPUs to
  settle, checking memory) on a process of its own: it takes no time on hardware;
* where the machine ended (a triple fault, an MCE shutdown), a global instant;
* every event of the timeline is also an instant event ("ph": "i") on its CPU's track:
  writes, kicks, interrupts, faults, the coordinator's notes.

Open it at https://ui.perfetto.dev (Open trace file) or in chrome://tracing (Load).
"""

from __future__ import annotations

import json

from smpd.host import files

# The state a CPU is in after an event of this kind (smpd.machine.layout.Ev names).
STATE_AFTER = {
    "OFFLINE": "MWAIT", "HLT": "HLT", "REBOOT": "HLT", "NMI_STOP": "HLT (NMIs blocked)", "FOREIGN_HALT": "HLT",
    "INIT": "WAIT_FOR_SIPI", "SIPI": "RUNNING",
    "TRIPLE_FAULT": "SHUTDOWN", "MCE_SHUTDOWN": "SHUTDOWN",
}
# A wake-up or an interrupt makes the CPU execute: a RUNNING span from it to the CPU's next
# event (its acknowledgement, a fault, HLT) -- the window in which a CPU runs whatever is now
# in memory. With no next event it went back to sleep at once: no span.
RUNS_AFTER = {"WAKE_WRITE": "RUNNING (woken)", "INTERRUPT": "RUNNING (interrupt handler)",
              "SMM": "SMM", "SPURIOUS": "RUNNING (woken)"}
PID = 1
SMPD_PID = 2  # the emulator's own work: takes no time on hardware


def _us(ns: int, t0: int) -> float:
    return round((ns - t0) / 1000, 3)


def events_of(report: dict, t0: int, label: str = "") -> list[dict]:
    """The trace events of one report (a kexec's, a kick's, a chain link's)."""
    timeline = report.get("timeline", [])
    end = max([e["t_ns"] for e in timeline] + [p["t_ns"] + int(p["dur_us"] * 1000) for p in report.get("phases", [])]
              + [t0])
    out = [_phase(p, t0, label) for p in report.get("phases", [])]
    nxt = _next_event_times(timeline)
    for i, e in enumerate(timeline):
        kind = e.get("kind", "note")
        out.append({"name": e["event"], "cat": kind, "ph": "i", "s": "g" if kind == "machine_end" else "t",
                    "pid": PID, "tid": e["cpu"], "ts": _us(e["t_ns"], t0)})
        if e["cpu"] and kind in RUNS_AFTER and nxt.get(i, 0) > e["t_ns"]:
            out.append({"name": RUNS_AFTER[kind], "cat": "running", "ph": "X", "pid": PID, "tid": e["cpu"],
                        "ts": _us(e["t_ns"], t0), "dur": round((nxt[i] - e["t_ns"]) / 1000, 3)})
    return out + _state_spans(report, timeline, end, t0)


def _phase(p: dict, t0: int, label: str) -> dict:
    smpd = p.get("track") == "smpd"
    return {"name": p["name"], "cat": "smpd" if smpd else "phase", "ph": "X", "pid": SMPD_PID if smpd else PID,
            "tid": 0, "ts": _us(p["t_ns"], t0), "dur": p["dur_us"], "args": {"kexec": label} if label else {}}


def _next_event_times(timeline: list[dict]) -> dict[int, int]:
    """Index of each event -> the time of its CPU's next event."""
    nxt: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, e in enumerate(timeline):
        if e["cpu"] in last:
            nxt[last[e["cpu"]]] = e["t_ns"]
        last[e["cpu"]] = i
    return nxt


def _state_spans(report: dict, timeline: list[dict], end: int, t0: int) -> list[dict]:
    """Each CPU's states: from where it started, changed by its events, until ``end``."""
    states = {int(c): s for c, s in report.get("start_states", {}).items()}
    since = dict.fromkeys(states, min([e["t_ns"] for e in timeline] + [end]))
    out = []
    for e in timeline:
        cpu, new = e["cpu"], STATE_AFTER.get(e.get("kind", "note"))
        if cpu == 0 or new is None or states.get(cpu) == new:
            continue
        if cpu in states:
            out.append(_state(cpu, states[cpu], since[cpu], e["t_ns"], t0))
        states[cpu], since[cpu] = new, e["t_ns"]
    return out + [_state(cpu, state, since.get(cpu, end), end, t0) for cpu, state in states.items()]


def _state(cpu: int, state: str, start: int, end: int, t0: int) -> dict:
    return {"name": state, "cat": "state", "ph": "X", "pid": PID, "tid": cpu, "ts": _us(start, t0),
            "dur": max(0.0, round((end - start) / 1000, 3))}


def document(reports: list[tuple[str, dict]], machine: str, ncpus: int) -> dict:
    """The whole file: metadata naming the process and each CPU's track, then every report's events."""
    starts = [e["t_ns"] for _, r in reports for e in r.get("timeline", [])]
    starts += [p["t_ns"] for _, r in reports for p in r.get("phases", [])]
    t0 = min(starts) if starts else 0
    meta = [{"name": "process_name", "ph": "M", "pid": PID, "args": {"name": f"smpd machine '{machine}'"}},
            {"name": "process_name", "ph": "M", "pid": SMPD_PID,
             "args": {"name": "smpd itself (its waits and checks: no time on hardware)"}}]
    for cpu in range(ncpus):
        meta.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": cpu,
                     "args": {"name": "CPU0 (coordinator, the kexec CPU)" if cpu == 0 else f"CPU{cpu}"}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": cpu, "args": {"sort_index": cpu}})
    body = [ev for label, r in reports for ev in events_of(r, t0, label)]
    return {"traceEvents": meta + body, "displayTimeUnit": "ns",
            "otherData": {"tool": "smpd", "machine": machine, "cpus": ncpus}}


def write(path: str, reports: list[tuple[str, dict]], machine: str, ncpus: int) -> None:
    """Write the trace of ``reports`` (label, report) to ``path``; no link followed, no other user's file."""
    files.write_output(path, "--trace", json.dumps(document(reports, machine, ncpus)).encode() + b"\n")
