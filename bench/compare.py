"""Two bench records side by side: each figure's median in both, and NEW / OLD.

    python bench/compare.py bench/records/bench_machine-OLD.json bench/records/bench_machine-NEW.json

A ratio means something only when both records come from the same host (the header says
whether they do) and the same bench; figures only one record has are listed apart.
"""

from __future__ import annotations

import argparse
import json


def _record(ap: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        ap.error(f"{path}: {e}")
    if not isinstance(rec, dict) or not {"bench", "commit", "host", "figures"} <= rec.keys():
        ap.error(f"{path}: not a bench record (expected the keys bench, commit, host and figures, as bench/record.py writes)")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="the earlier record (bench/records/*.json)")
    ap.add_argument("new", help="the later record")
    args = ap.parse_args()
    old, new = _record(ap, args.old), _record(ap, args.new)
    print(f"old: {old['bench']} at {old['commit'][:12]} on {old['host']['cpu']} ({old['host']['cores']} cores)")
    print(f"new: {new['bench']} at {new['commit'][:12]} on {new['host']['cpu']} ({new['host']['cores']} cores)")
    if old["host"] != new["host"]:
        print("warning: the two records come from different hosts; ratios compare the hosts too")
    o = {f["figure"]: f for f in old["figures"]}
    n = {f["figure"]: f for f in new["figures"]}
    both = [k for k in n if k in o]
    width = max([len(k) for k in both] + [6])
    print(f"{'figure':<{width}}  {'old median':>11}  {'new median':>11}  {'new/old':>8}  unit")
    for k in both:
        ratio = n[k]["median"] / o[k]["median"] if o[k]["median"] else float("nan")
        print(f"{k:<{width}}  {o[k]['median']:>11.2f}  {n[k]['median']:>11.2f}  {ratio:>7.2f}x  {n[k]['unit']}")
    for k in (k for k in o if k not in n):
        print(f"only in old: {k}")
    for k in (k for k in n if k not in o):
        print(f"only in new: {k}")


if __name__ == "__main__":
    main()
