"""`smpd up` starts its coordinator before its own imports, so that the two interpreters start at once.

The coordinator (``python -P -m smpd.daemon FD``, smpd.daemon) imports what it runs (~0.2 s
here) and then waits for its spec on the socket pair whose other end `up` holds; `up`
imports the CLI and checks its arguments and the host meanwhile (~0.15 s), on the other host
core, and only then sends the spec (smpd.tools.lifecycle.start_daemon), or hangs up. A
coordinator that reads end-of-file before any spec stops its template and exits, having made
nothing: `up` waits for that (``discard``) before it exits, so bad input, `--help` or a
machine already up leave no process behind. Measured, 6 pairs alternated with 4f460cb (medians):
`smpd up` of 64 CPUs 0.56 -> 0.45 s, of 1024 CPUs 1.56 -> 1.52 s; but bad input now waits for
the coordinator's imports: `smpd up --cpus 0` 0.25 -> 0.40 s.

Light on purpose (os, socket, subprocess): it runs before anything else of the CLI is imported.
Not with SMPD_COORDINATOR_LOG set: that file is checked by the CLI before any process writes it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

DISCARD_WAIT_S = 30.0  # a coordinator hung up on before its spec exits once its imports are done

_started: tuple[socket.socket, subprocess.Popen] | None = None


def coordinator_command(fd: int) -> list[str]:
    """The daemon's command line. -P: the current directory never shadows the installed package
    (a folder named smpd there, e.g. in the parent of a clone); the spec travels over ``fd``."""
    return [sys.executable, "-P", "-m", "smpd.daemon", str(fd)]


def start_if_up(argv: list[str]) -> None:
    """Start the coordinator now when ``argv`` (the command's arguments) is an `smpd up` that may
    bring up a machine: not `--help`, not `--foreground` (which runs it in this process)."""
    global _started
    if not argv or argv[0] != "up" or {"-h", "--help", "--foreground"} & set(argv[1:]):
        return
    if os.environ.get("SMPD_COORDINATOR_LOG"):
        return
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return  # start_daemon tries again, and says what the host refused
    try:
        proc = subprocess.Popen(coordinator_command(theirs.fileno()), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(theirs.fileno(),), start_new_session=True, close_fds=True)
    except OSError:
        ours.close()
        return
    finally:
        theirs.close()
    _started = ours, proc


def take() -> tuple[socket.socket, subprocess.Popen] | None:
    """The coordinator started early, and its socket, now the caller's; None when there is none."""
    global _started
    started, _started = _started, None
    return started


def discard() -> None:
    """Hang up on a coordinator started early and never taken, and reap it: it exits at
    end-of-file, its template stopped (smpd.daemon.supervisor.main); killed after DISCARD_WAIT_S."""
    started = take()
    if started is None:
        return
    ours, proc = started
    ours.close()
    try:
        proc.wait(DISCARD_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
