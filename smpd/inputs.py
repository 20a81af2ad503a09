"""Command-line values that several commands share: numbers and durations (files: smpd.host.files).

All are checked before any work starts, so a bad value costs nothing. Numbers are
ASCII only: Python's int() and float() are kinder than a command line should be
('８', ' 8', '+8', '8_0', 'nan' and 'inf' all convert), and a value that the user
did not mean to type must be refused, not guessed at.
"""

from __future__ import annotations

import re

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
