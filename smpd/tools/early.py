"""`smpd up` starts its coordinator before its own imports, so that the two interpreters start at once.

The coordinator (``python -P -m smpd.daemon FD``, smpd.daemon) imports what it runs (~0.2 s
here) and then waits for its spec on the socket pair whose other end `up` holds; `up`
imports the CLI and checks its arguments and the host meanwhile (~0.15 s), on the other host
core, and only then sends the spec (smpd.tools.lifecycle.start_daemon), or hangs up. A
coordinator that reads end-of-file before any spec stops its template and exits, having made
nothing: `up` waits for that (``discard``) before it exits, so bad input or a machine already up
leave no process behind; a hang-up during its imports ends it at once (smpd.daemon.__main__).
The coordinator stays ``discard``'s until start_daemon has finished with it (``handed``),
whichever way start_daemon ends; the stop signals are held off while it is started and while
it is waited for, so that no stop in between loses track of it.

Measured, 6 pairs alternated with 4f460cb (medians): `smpd up` of 64 CPUs 0.56 -> 0.45 s, of
1024 CPUs 1.56 -> 1.52 s; but bad input then waited for the coordinator's imports: `smpd up
--cpus 0` 0.25 -> 0.40 s, and since its hang-up ends them, 0.24-0.29 s (five runs; 0.42-0.49
without, alternated).

Light on purpose (os, signal, socket, subprocess, and the entry point's own module): it runs before anything
else of the CLI is imported.
Not with SMPD_COORDINATOR_LOG set: that file is checked by the CLI before any process writes it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from smpd.tools.entry import STOP_SIGNALS

DISCARD_WAIT_S = 10.0  # a coordinator hung up on before its spec exits once its imports are done

_started: tuple[socket.socket, subprocess.Popen] | None = None


def spawn(stderr) -> tuple[socket.socket, subprocess.Popen]:
    """The coordinator, detached (its own session), and our end of the socket pair its spec
    travels over; its stderr to ``stderr``. -P: the current directory never shadows the installed
    package (a folder named smpd there, e.g. in the parent of a clone). OSError when the host
    refuses the pair or the process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "smpd.daemon", str(theirs.fileno())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                pass_fds=(theirs.fileno(),), start_new_session=True, close_fds=True)
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours, proc


def start_if_up(argv: list[str]) -> None:
    """Start the coordinator now when ``argv`` (the command's arguments) is an `smpd up` that may
    bring up a machine: not `--help`, not `--foreground` (which runs it in this process)."""
    global _started
    if not argv or argv[0] != "up" or {"-h", "--help", "--foreground"} & set(argv[1:]):
        return
    if os.environ.get("SMPD_COORDINATOR_LOG"):
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a stop comes once _started is set
    try:
        _started = spawn(subprocess.DEVNULL)
    except OSError:
        pass  # start_daemon tries again, and says what the host refused
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def take() -> tuple[socket.socket, subprocess.Popen] | None:
    """The coordinator started early, if it still runs, and its socket, for start_daemon; still
    ``discard``'s until ``handed``. None when there is none (one that exited is reaped here)."""
    if _started is not None and _started[1].poll() is not None:
        discard()  # it exited before its spec (killed, say): start_daemon starts another
    return _started


def handed() -> None:
    """start_daemon is done with the coordinator it took: running the machine, or stopped by it."""
    global _started
    _started = None


def discard() -> None:
    """Hang up on a coordinator started early and not handed, and reap it: it exits at
    end-of-file, its template stopped (smpd.daemon.supervisor.main); killed after DISCARD_WAIT_S.
    A stop signal meanwhile is ignored: the command is ending, and this clean-up finishes."""
    global _started
    if _started is None:
        return
    ours, proc = _started
    ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        ours.close()
        try:
            proc.wait(DISCARD_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _started = None
    finally:
        for sig, handler in ignored.items():
            signal.signal(sig, handler)
