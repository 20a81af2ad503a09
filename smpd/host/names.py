"""Names of everything smpd creates, all starting with 'smpd' so a leak is easy to find.

* the segment: ``/smpd-<uid>-<machine>`` (shows up as /dev/shm/smpd-<uid>-<machine>).
  Keyed by the numeric uid, never the user name: names are not unique once
  lowercased or cleaned ('Root' and 'root'), uids are. The uid is all digits and
  ends at the first '-', so no two (uid, machine) pairs give one name.
* the control channel: the abstract Unix socket ``@smpd-<uid>-<machine>-<token>``,
  where the token is 128 random bits drawn at bring-up and kept in the 0600
  segment. Nobody can take the name before the coordinator binds it, because
  nobody can guess it; abstract sockets have no file, so nothing is left behind
  when the coordinator dies, by any means. Access control is the peer
  credentials check on both sides plus the HMAC handshake (smpd.channel).
* process names (comm): ``smpd-coord``, ``smpd-janitor``, ``smpd-cpu<N>``.

A name says where to look, never whose it is: smpd.trust checks that.
"""

from __future__ import annotations

import os
import re

PREFIX = "smpd"
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (glibc's shm_open)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # a machine name, used with fullmatch only
NAME_ACCEPTED = "1..32 of a-z, 0-9, '-', '_', starting with a letter or digit"


def valid_machine_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def _head() -> str:
    return f"{PREFIX}-{os.geteuid()}-"


def segment(machine: str) -> str:
    return f"/{_head()}{machine}"


def segment_path(machine: str) -> str:
    return SHM_DIR + segment(machine)


def socket_address(machine: str, token: str) -> str:
    return f"\0{_head()}{machine}-{token}"


def machine_of_segment(entry: str) -> str | None:
    """'smpd-0-lab' (a /dev/shm entry) -> 'lab' when the name is one of this uid's machine names.

    Only the name is checked here: the entry may still be someone else's (smpd.trust)."""
    head = _head()
    if not entry.startswith(head):
        return None
    machine = entry[len(head):]
    return machine if valid_machine_name(machine) else None
