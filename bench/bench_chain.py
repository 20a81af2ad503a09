"""Chains of kexecs: how often each link survives, and how fast links run (issue: kernel generations).

    python bench/bench_chain.py                  # 16 and 64 CPUs, 20 seeds each (~2 min)
    python bench/bench_chain.py --seeds 50 --cpus 16

For each machine size, booted with nosmt (every kernel parks the odd CPUs), no KASLR:

* the pre-fix kernel: `smpd chain --kexecs 5` over many seeds, how often link 1 and
  link 2 survive, and which write woke the first faulting CPU of the first failing link;
* 6.6: chains of 5, every link's outcome;
* speed: links per second of chains of 5 (6.6, all CLEAN), next to single kexecs each
  followed by a reset (the soak's pattern).

Prints a table, and the one-line explanation from the memory maps of the failing link.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from record import Record, check as check_record  # noqa: E402
import smpdrun  # noqa: E402
from smpd.errors import OUTCOME_NOT_CLEAN  # noqa: E402

OUTCOME = (0, OUTCOME_NOT_CLEAN)  # a kexec's or a chain's exit status: CLEAN, or another outcome (not a failure)

NAME = f"benchc{secrets.token_hex(4)}"  # unpredictable: another user cannot squat it first


def smpd(*args: str, ok=(0,)) -> str:
    return smpdrun.smpd(*args, name=NAME, ok=ok, timeout=3600, columns=160).stdout


def chain(kernel: str, seed: int, n: int = 5) -> dict:
    return json.loads(smpd("chain", "--kexecs", str(n), "--kernel", kernel, "--seed", str(seed), "--json", ok=OUTCOME))


def run(cpus: int, seeds: int) -> dict:
    smpd("up", "--cpus", str(cpus), "--watch", "adaptive", "--boot", "nosmt", "--seed", "1")
    try:
        survive = {1: 0, 2: 0}
        first_write = {}
        for seed in range(seeds):
            smpd("reset")
            r = chain("pre-fix", seed)
            links = [link["outcome"] for link in r["links"]]
            for n in (1, 2):
                survive[n] += len(links) >= n and links[n - 1] == "CLEAN"
            bad = r["first_failing_link"]
            if bad:
                w = r["links"][bad - 1].get("waking_writes") or [{}]
                key = (bad, w[0].get("write", "?").split(" at ")[0], w[0].get("line", "?").split("[")[0])
                first_write[key] = first_write.get(key, 0) + 1
        fixed: dict[str, int] = {}
        odd: list[str] = []
        t_chain, links_run, chain_rates = 0.0, 0, []
        for seed in range(seeds):
            smpd("reset")
            t0 = time.monotonic()
            r = chain("6.6", seed)
            t_chain += time.monotonic() - t0
            links_run += len(r["links"])
            chain_rates.append(len(r["links"]) / (time.monotonic() - t0))
            for link in r["links"]:
                fixed[link["outcome"]] = fixed.get(link["outcome"], 0) + 1
                if link["outcome"] != "CLEAN":
                    odd.append(f"{cpus} CPUs, 6.6 seed {seed} link {link['generation']['old']}: {link['outcome']}: "
                               f"{link['evidence']}" + (f" [host: {'; '.join(link['host_faults'])}]"
                                                          if link["host_faults"] else ""))
        smpd("reset")
        t0 = time.monotonic()
        single_rates = []
        for seed in range(seeds):
            t1 = time.monotonic()
            smpd("kexec", "--kernel", "6.6", "--seed", str(seed), ok=OUTCOME)
            smpd("reset")
            single_rates.append(1 / (time.monotonic() - t1))
        t_single = time.monotonic() - t0
        return {"cpus": cpus, "seeds": seeds, "survive": survive, "first_write": first_write, "fixed": fixed, "odd": odd,
                "chain_links_per_s": links_run / t_chain, "single_kexec_reset_per_s": seeds / t_single,
                "chain_rates": chain_rates, "single_rates": single_rates}
    finally:
        smpd("down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--cpus", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--record", default=None, help="where the JSON record goes [bench/records/...]")
    args = ap.parse_args()
    check_record(args.record)  # before the run, not at its end
    rows = [run(c, args.seeds) for c in args.cpus]
    rec = Record("bench_chain")
    for r in rows:
        rec.add(f"{r['cpus']} CPUs: 6.6 chain of 5, links/s (one chain, CLI round trips included)", "links/s",
                r["chain_rates"])
        rec.add(f"{r['cpus']} CPUs: smpd kexec + smpd reset per second (one pair)", "1/s", r["single_rates"])
        rec.add(f"{r['cpus']} CPUs: pre-fix chains whose link 2 survived", "chains", [r["survive"][2]])
    print("pre-fix, nosmt, no KASLR: chains of 5 from a power-on; 6.6: the same; speed: CLI round trips included")
    print(f"{'CPUs':>5}{'seeds':>7}{'link1 ok':>10}{'link2 ok':>10}  {'6.6 links':<26}"
          f"{'chain links/s':>14}{'kexec+reset/s':>15}")
    for r in rows:
        fixed = ", ".join(f"{k} {v}" for k, v in sorted(r["fixed"].items()))
        print(f"{r['cpus']:>5}{r['seeds']:>7}{r['survive'][1]:>10}{r['survive'][2]:>10}  {fixed:<26}"
              f"{r['chain_links_per_s']:>14.1f}{r['single_kexec_reset_per_s']:>15.1f}")
    for r in rows:
        for (link, write, line), n in sorted(r["first_write"].items()):
            print(f"{r['cpus']} CPUs: {n} of {r['seeds']} pre-fix chains failed at link {link}; the first waking "
                  f"write: {write} -> a {line} line")
        for line in r["odd"]:
            print(line)
    rec.finish(args.record)


if __name__ == "__main__":
    main()
