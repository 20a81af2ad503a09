"""`smpd demo`: the main job for a newcomer, end to end on one machine.

Up (64 CPUs by default) with ``nosmt``, so that every kernel parks the odd CPUs (SMT
siblings) in mwait_play_dead() as it boots, and the even ones offlined too: CPU 0
alone runs. Then:

1. the first kexec after a power-on, by each kernel flavour (pre-fix, 6.5, 6.6)
   against no injection and against each of NMI, MCE and SMI after the copy, with a
   power cycle (`smpd reset`) between runs: the matrix;
2. a chain of three kexecs per flavour: the pre-fix kernel survives its first and
   triple-faults on its second, the fixed ones go on;

with one line of evidence each and a kick-latency summary; then the machine is taken
down, whatever happens (Ctrl-C included).
"""

from __future__ import annotations

import secrets

from rich.console import Console

from smpd import config
from smpd.kernel.memmap import FLAVOURS
from smpd.tools import lifecycle, render

INJECTIONS = (None, "nmi", "mce", "smi")
CHAIN = 3


def run(cpus: int, name: str, watch: str, seed: int | None, console: Console) -> list[tuple[str, str, dict]]:
    seed = secrets.randbelow(2**63) if seed is None else seed
    cfg = config.load().with_overrides(machine={"cpus": cpus, "name": name, "seed": seed},
                                       watch={"strategy": watch}, kernel={"boot": "nosmt" if cpus > 1 else ""})
    spec = lifecycle.prepare(cfg)
    console.print(render.up_summary(lifecycle.start_daemon(spec)))
    rows: list[tuple[str, str, dict]] = []
    chains: list[tuple[str, dict]] = []
    try:
        live = lifecycle.require(name)
        if cpus > 2:
            r = live.request("offline", cpus=",".join(str(c) for c in range(2, cpus, 2)))
            console.print(f"offline: the even CPUs parked in mwait_play_dead() in {r['ms']:.1f} ms; the odd ones "
                          f"were parked at boot (nosmt): CPU 0 alone runs")
        for flavour in FLAVOURS:
            for kind in INJECTIONS:
                inject = [f"{kind}@after-copy"] if kind else []
                r = live.request("kexec", kernel=flavour, inject=inject, seed=seed)
                rows.append((flavour, kind.upper() if kind else "-", r))
                console.print(f"  kexec --kernel {flavour:<7} --inject {kind + '@after-copy' if kind else '(none)':<16} "
                              f"-> {r['outcome']:<13} ({r['duration_ms']:.0f} ms)")
                live.request("reset")
        for flavour in FLAVOURS:
            c = live.request("chain", kexecs=CHAIN, kernel=flavour, seed=seed)
            chains.append((flavour, c))
            console.print(f"  chain --kexecs {CHAIN} --kernel {flavour:<7} -> "
                          + " ".join(link["outcome"] for link in c["links"]))
            live.request("reset")
        console.print()
        console.print(render.demo_matrix(rows))
        console.print(render.demo_chains(chains))
        kicks = [r["kick"] for _flavour, _, r in rows if r.get("kick")]
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

    return (f"kick latency, {len(rtt)} CPU kicks in the {len(kicks)} kexecs that kicked (write -> acknowledgement seen): "
            f"p50 {pct(0.5):.1f} us, p90 {pct(0.9):.1f} us, p99 {pct(0.99):.1f} us, max {rtt[-1] / 1e3:.1f} us; "
            f"rounds (control writes) p50 {rounds[len(rounds) // 2]}, max {rounds[-1]}; stuck {stuck}; "
            f"whole kick of all CPUs: max {max(k['total_ns'] for k in kicks) / 1e6:.2f} ms")
