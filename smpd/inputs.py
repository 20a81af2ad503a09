"""Command-line values that several commands share: numbers, durations and output files.

All are checked before any work starts, so a bad value costs nothing. Numbers are
ASCII only: Python's int() and float() are kinder than a command line should be
('８', ' 8', '+8', '8_0', 'nan' and 'inf' all convert), and a value that the user
did not mean to type must be refused, not guessed at.
"""

from __future__ import annotations

import os
import re
import tempfile

from smpd.errors import BadInput


_DECIMAL = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_REAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def ascii_int(text: object, hex_ok: bool = False) -> int | None:
    """The integer ``text`` spells in ASCII decimal digits (or 0x hex, when ``hex_ok``), else None."""
    if not isinstance(text, str):
        return None
    if _DECIMAL.fullmatch(text):
        return int(text, 10)
    if hex_ok and _HEX.fullmatch(text):
        return int(text, 16)
    return None


def ascii_real(text: object) -> float | None:
    """The finite number ``text`` spells in ASCII decimal notation (no exponent, nan or inf), else None."""
    if isinstance(text, str) and _REAL.fullmatch(text):
        return float(text)
    return None


def parse_duration(text: str) -> float:
    """'30s', '2m', '1h', '500ms' or a bare number of seconds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*", text or "")
    if not m:
        raise BadInput(f"--duration '{text}' is not a duration; expected e.g. 30s, 2m, 1h or 500ms")
    v = float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]
    if not 0.001 <= v <= 7 * 86400:
        raise BadInput(f"--duration '{text}' is not in the range 1ms..7 days")
    return v


def check_writable(path: str, option: str) -> None:
    """Refuse, before the run, an output path that cannot be written. Creates nothing under that
    name: an existing file is opened for appending (which changes nothing), a new one is judged by
    an unnamed file in its directory; a dangling symbolic link is refused rather than followed to
    create its target."""
    if not path:
        raise BadInput(f"{option} needs a file name; '' is none")
    p = os.path.abspath(path)
    if os.path.islink(p) and not os.path.exists(p):
        raise BadInput(f"{option} {path} is a symbolic link to nothing ({os.readlink(p)}); "
                       f"give a file name, or the link's target")
    if os.path.isdir(p):
        raise BadInput(f"{option} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.realpath(p))
    if not os.path.isdir(parent):
        raise BadInput(f"{option} {path}: directory {parent} does not exist")
    if os.path.exists(p):
        try:  # the honest test for an existing file: open it for writing (root passes every access())
            with open(p, "ab"):
                pass
        except OSError as err:
            raise BadInput(f"{option} {path} is not writable ({err.strerror})") from None
    else:  # an unnamed file in that directory (O_TMPFILE where it exists): nothing to see or leave
        try:
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as err:
            raise BadInput(f"{option} {path}: directory {parent} is not writable ({err.strerror})") from None
