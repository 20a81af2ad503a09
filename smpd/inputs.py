"""Command-line values that several commands share: durations and output files.

Both are checked before any work starts, so a bad value costs nothing.
"""

from __future__ import annotations

import os
import re

from smpd.errors import BadInput


def parse_duration(text: str) -> float:
    """'30s', '2m', '1h', '500ms' or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text or "")
    if not m:
        raise BadInput(f"--duration '{text}' is not a duration; expected e.g. 30s, 2m, 1h or 500ms")
    v = float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]
    if not 0.001 <= v <= 7 * 86400:
        raise BadInput(f"--duration '{text}' is not in the range 1ms..7 days")
    return v


def check_writable(path: str, option: str) -> None:
    """Refuse, before the run, an output path that cannot be written."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise BadInput(f"{option} {path} is a directory; give a file name")
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        raise BadInput(f"{option} {path}: directory {parent} does not exist")
    existed = os.path.exists(p)
    try:  # the only honest test: open it for writing (root passes every access() check)
        with open(p, "ab"):
            pass
    except OSError as err:
        raise BadInput(f"{option} {path} is not writable ({err.strerror})") from None
    if not existed:
        os.unlink(p)
