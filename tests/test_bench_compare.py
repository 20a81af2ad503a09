"""bench/compare.py, the tool bench/README.md names for reading two bench records side by side."""

import json
import os
import subprocess
import sys

from conftest import REPO

COMPARE = os.path.join(REPO, "bench", "compare.py")


def _compare(*args):
    return subprocess.run([sys.executable, COMPARE, *args], capture_output=True, text=True, timeout=60)


def _record(path, commit: str, median: float) -> str:
    path.write_text(json.dumps({"bench": "bench_soak", "commit": commit, "host": {"cpu": "x", "cores": 2},
                                "figures": [{"figure": "trials/s", "unit": "trials/s", "median": median}]}))
    return str(path)


def test_two_records_give_each_figure_new_over_old(tmp_path):
    r = _compare(_record(tmp_path / "a.json", "a" * 40, 20.0), _record(tmp_path / "b.json", "b" * 40, 30.0))
    assert r.returncode == 0, r.stderr
    assert "1.50x" in r.stdout and "aaaaaaaaaaaa" in r.stdout and "bbbbbbbbbbbb" in r.stdout


def test_bad_input_is_one_clear_error_and_status_2(tmp_path):
    good = _record(tmp_path / "a.json", "a" * 40, 1.0)
    (tmp_path / "not.json").write_text("{}")
    for args, says in (((good,), "required: new"), ((good, str(tmp_path / "none.json")), "No such file"),
                       ((good, os.path.join(REPO, "README.md")), "README.md"),
                       ((good, str(tmp_path / "not.json")), "not a bench record")):
        r = _compare(*args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert _compare("--help").returncode == 0
