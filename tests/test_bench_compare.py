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
    (tmp_path / "typed.json").write_text(json.dumps({"bench": "x", "commit": 5, "host": {}, "figures": []}))
    (tmp_path / "nomedian.json").write_text(json.dumps({"bench": "x", "commit": "c", "host": {"cpu": "x", "cores": 2},
                                                        "figures": [{"figure": "f", "unit": "ms"}]}))
    os.mkfifo(tmp_path / "fifo.json")
    for args, says in (((good,), "required: new"), ((good, str(tmp_path / "none.json")), "does not exist"),
                       ((good, os.path.join(REPO, "README.md")), "README.md"),
                       ((good, str(tmp_path / "not.json")), "not a bench record"),
                       ((good, str(tmp_path / "typed.json")), "not a bench record"),
                       ((good, str(tmp_path / "nomedian.json")), "not a bench record"),
                       ((good, str(tmp_path / "fifo.json")), "not a regular file"),
                       ((good, "/dev/zero"), "/dev/zero")):
        r = _compare(*args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert _compare("--help").returncode == 0


def test_what_a_record_says_reaches_the_terminal_as_text(tmp_path):
    """A record is anyone's file: a terminal escape in its host or a figure's name is shown as
    its escape, not acted on (hostile review)."""
    evil = json.dumps({"bench": "b", "commit": "c" * 40, "host": {"cpu": "\u001b]0;pwned\u0007\u001b[2J", "cores": 2},
                       "figures": [{"figure": "f\u001b[31m", "unit": "ms", "median": 1.0}]})
    (tmp_path / "evil.json").write_text(evil)
    r = _compare(_record(tmp_path / "a.json", "a" * 40, 1.0), str(tmp_path / "evil.json"))
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\\x1b]0;pwned" in r.stdout, r.stdout
