"""Two bench records side by side: each figure's median in both, and NEW / OLD.

    python bench/compare.py bench/records/bench_machine-OLD.json bench/records/bench_machine-NEW.json

A ratio means something only when both records come from the same host (the header says
whether they do) and the same bench; figures only one record has are listed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smpd.errors import SmpdError  # noqa: E402
from smpd.host import files  # noqa: E402
from smpd.tools.cli import one_line  # noqa: E402 (what a terminal would act on, shown as its escape)

MAX_RECORD = 64 << 20  # a record is tens of KB; no reason to read a /dev/zero behind a name to the end


def _record(ap: argparse.ArgumentParser, path: str) -> dict:
    """The record at ``path``, read as any smpd input is (smpd.host.files.open_input: no other user's
    link followed, only a regular file, nothing on /proc, /sys, /dev), and checked to be one."""
    try:
        with files.open_input(path, "record") as f:
            data = f.read(MAX_RECORD + 1)
        if len(data) > MAX_RECORD:
            ap.error(f"{one_line(path)}: over {MAX_RECORD >> 20} MiB: not a bench record")
        rec = json.loads(data)
    except SmpdError as e:
        ap.error(one_line(str(e)))
    except (OSError, ValueError) as e:
        ap.error(f"{one_line(path)}: {one_line(str(e))}")
    if not _is_record(rec):
        ap.error(f"{one_line(path)}: not a bench record (expected bench, commit, host {{cpu, cores}} and figures "
                 f"{{figure, unit, median}}, as bench/record.py writes them)")
    return rec


def _is_record(rec) -> bool:
    def text(x) -> bool:
        return isinstance(x, str)

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return (isinstance(rec, dict) and text(rec.get("bench")) and text(rec.get("commit"))
            and isinstance(rec.get("host"), dict) and text(rec["host"].get("cpu")) and number(rec["host"].get("cores"))
            and isinstance(rec.get("figures"), list)
            and all(isinstance(f, dict) and text(f.get("figure")) and text(f.get("unit")) and number(f.get("median"))
                    for f in rec["figures"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="the earlier record (bench/records/*.json)")
    ap.add_argument("new", help="the later record")
    args = ap.parse_args()
    old, new = _record(ap, args.old), _record(ap, args.new)
    for which, r in (("old", old), ("new", new)):
        host = r["host"]
        print(one_line(f"{which}: {r['bench']} at {r['commit'][:12]} on {host['cpu']} ({host['cores']} cores)"))
    if old["host"] != new["host"]:
        print("warning: the two records come from different hosts; ratios compare the hosts too")
    o = {f["figure"]: f for f in old["figures"]}
    n = {f["figure"]: f for f in new["figures"]}
    both = [k for k in n if k in o]
    width = max([len(k) for k in both] + [6])
    print(f"{'figure':<{width}}  {'old median':>11}  {'new median':>11}  {'new/old':>8}  unit")
    for k in both:
        ratio = n[k]["median"] / o[k]["median"] if o[k]["median"] else float("nan")
        line = f"{k:<{width}}  {o[k]['median']:>11.2f}  {n[k]['median']:>11.2f}  {ratio:>7.2f}x  {n[k]['unit']}"
        print(one_line(line))
    for k in (k for k in o if k not in n):
        print(one_line(f"only in old: {k}"))
    for k in (k for k in n if k not in o):
        print(one_line(f"only in new: {k}"))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `compare.py A B | head`: the reader left; nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
