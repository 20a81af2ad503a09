"""Names of everything smpd creates, all starting with 'smpd' so a leak is easy to find.

* the segment: ``/smpd-<user>-<machine>`` (shows up as /dev/shm/smpd-<user>-<machine>)
* the control channel: the abstract Unix socket ``@smpd-<user>-<machine>``. Abstract
  sockets have no file, so nothing is left behind when the coordinator dies, by
  any means; access control is the peer-uid check plus the HMAC handshake.
* process names (comm): ``smpd-coord``, ``smpd-janitor``, ``smpd-cpu<N>``.
"""

from __future__ import annotations

import os
import pwd
import re

PREFIX = "smpd"


def user() -> str:
    try:
        raw = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raw = f"uid{os.getuid()}"
    return re.sub(r"[^a-z0-9_]", "_", raw.lower())[:32]


def segment(machine: str) -> str:
    return f"/{PREFIX}-{user()}-{machine}"


def socket_address(machine: str) -> str:
    return f"\0{PREFIX}-{user()}-{machine}"


def machine_of_segment(entry: str) -> str | None:
    """'smpd-root-lab' (a /dev/shm entry) -> 'lab' when it is one of this user's machines."""
    head = f"{PREFIX}-{user()}-"
    return entry[len(head):] if entry.startswith(head) else None
