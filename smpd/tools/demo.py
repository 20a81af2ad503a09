"""`smpd demo`: the main job for a newcomer, end to end on one machine.

Up (64 CPUs by default), offline all but CPU 0, then the kexec under every park
policy against no injection and against each of NMI, MCE and SMI after the
copy, with `smpd reset` between runs (no re-fork). Prints the matrix of outcomes
with one line of evidence each and a kick-latency summary; then the machine is
taken down, whatever happens (Ctrl-C included).
"""

from __future__ import annotations

import secrets

from rich.console import Console

from smpd import config
from smpd.tools import lifecycle, render
from smpd.kernel.scenario import PARKS

INJECTIONS = (None, "nmi", "mce", "smi")


def run(cpus: int, name: str, watch: str, seed: int | None, console: Console) -> list[tuple[str, str, dict]]:
    seed = secrets.randbelow(2**63) if seed is None else seed
    cfg = config.load().with_overrides(machine={"cpus": cpus, "name": name, "seed": seed},
                                       watch={"strategy": watch})
    spec = lifecycle.prepare(cfg)
    console.print(render.up_summary(lifecycle.start_daemon(spec)))
    rows: list[tuple[str, str, dict]] = []
    try:
        live = lifecycle.require(name)
        if cpus > 1:
            r = live.request("offline", cpus=f"1-{cpus - 1}")
            console.print(f"offline: CPU 1-{cpus - 1} parked in mwait_play_dead() in {r['ms']:.1f} ms")
        for park in PARKS:
            for kind in INJECTIONS:
                inject = [f"{kind}@after-copy"] if kind else []
                r = live.request("kexec", kernel=park, inject=inject, seed=seed)
                label = kind.upper() if kind else "-"
                rows.append((park, label, r))
                console.print(f"  kexec --park {park:<4} --inject {kind + '@after-copy' if kind else '(none)':<16} "
                              f"-> {r['outcome']:<13} ({r['duration_ms']:.0f} ms)")
                live.request("reset")
        console.print()
        console.print(render.demo_matrix(rows))
        kicks = [r["kick"] for park, _, r in rows if r.get("kick")]
        if kicks:
            console.print(_kick_latency(kicks))
    finally:
        lifecycle.down(name)
        console.print(f"machine '{name}' is down")
    return rows


def _kick_latency(kicks: list[dict]) -> str:
    rtt = sorted(c["rtt_ns"] for k in kicks for c in k["cpus"].values() if "rtt_ns" in c)
    rounds = sorted(c["rounds"] for k in kicks for c in k["cpus"].values() if c["acknowledged"])
    stuck = sum(len(k["stuck"]) for k in kicks)
    if not rtt:
        return "kick latency: no CPU was kicked"

    def pct(p: float) -> float:
        return rtt[min(len(rtt) - 1, int(p * len(rtt)))] / 1e3

    return (f"kick latency over {len(kicks)} kicks of {len(rtt)} CPUs (write -> acknowledgement seen): "
            f"p50 {pct(0.5):.1f} us, p90 {pct(0.9):.1f} us, p99 {pct(0.99):.1f} us, max {rtt[-1] / 1e3:.1f} us; "
            f"kernel rounds of 5 us p50 {rounds[len(rounds) // 2]}, max {rounds[-1]}; stuck {stuck}; "
            f"whole kick of all CPUs: max {max(k['total_ns'] for k in kicks) / 1e6:.2f} ms")
