"""How the daemon is told to stop: a stop signal, or the exit of the `smpd up` that started it.

SIGTERM, SIGINT and SIGHUP raise ``Stop`` once (a second signal must not interrupt
the shutdown the first one began). During bring-up the stop signals are blocked
and looked for only at ``check_stop()`` checkpoints, where every resource made so
far is owned by the supervisor (see its docstring there). The `smpd up` that
started a daemon holds the other end of a socket pair (``UpClient``): until it has
taken the daemon's answer, the machine is that `up`'s, and its exit is a stop.
"""

from __future__ import annotations

import json
import signal
import socket

ACK = b"ok\n"  # `up` took the answer: from now on the machine is the user's, not this `up`'s


class Stop(BaseException):
    """SIGTERM/SIGINT/SIGHUP reached the coordinator: shut down cleanly.

    A BaseException, as KeyboardInterrupt is: raised once, inside whatever runs (a request's
    handler, say), it must reach the serving loop, never a boundary's ``except Exception``
    (which answered it as an internal error, and the machine then ignored every later stop
    signal)."""


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


_stop_raised = False


def on_stop_signal(signum, _frame):
    """Raise Stop once: a second signal must not interrupt the shutdown the first one began."""
    global _stop_raised
    if not _stop_raised:
        _stop_raised = True
        raise Stop(signal.Signals(signum).name)


def check_stop() -> None:
    """A checkpoint of bring-up, which runs with the stop signals blocked.

    An exception raised by a signal handler can land between any two bytecodes,
    e.g. between shm_open() returning and the name being recorded, and leak the
    segment. So boot() blocks SIGTERM/SIGINT/SIGHUP and looks for them only here,
    where every resource made so far is already owned by the Coordinator. Here too
    we notice that the `smpd up` waiting for us is gone (killed, even by SIGKILL):
    nobody will take the machine, so it is stopped like on SIGTERM.
    """
    global _stop_raised
    pending = signal.sigpending() & STOP_SIGNALS
    if pending and not _stop_raised:
        _stop_raised = True
        raise Stop(signal.Signals(min(pending)).name)
    if _up_client is not None and _up_client.gone():
        raise Stop("the exit of the `smpd up` that started it")


class UpClient:
    """The `smpd up` that started us, at the other end of a socket pair (smpd.lifecycle).

    It sends the spec (so no config crowds our command line in `ps`), waits for one
    line of answer and acknowledges it. Until it has, the machine is that `up`'s: if
    its end closes first, we stop and remove everything.
    """

    ACK_WAIT_S = 30.0  # a live `up` acknowledges at once; one stopped (Ctrl-Z) that long is gone

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)

    def read_spec(self) -> dict:
        """The spec `up` sends; Stop when it hangs up first, or on a stop signal (blocked from the
        daemon's first line: smpd.daemon.__main__), which is looked for between waits of 0.1 s.
        No deadline: `up` may start us before its own imports and checks (smpd.tools.early), and
        may be stopped (Ctrl-Z) meanwhile; its exit, however it dies, closes its end."""
        self.sock.settimeout(0.1)
        buf = b""
        while not buf.endswith(b"\n"):
            check_stop()
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise Stop("the exit of the `smpd up` that started it, before it sent the spec")
            buf += chunk
        return json.loads(buf)

    def gone(self) -> bool:
        """True when the other end has closed (it sends nothing more until our answer)."""
        self.sock.settimeout(0.0)  # a look, never a wait
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def answer(self, obj: dict) -> bool:
        """Send the answer; True once `up` has acknowledged it, False if it is gone."""
        try:
            self.sock.settimeout(self.ACK_WAIT_S)
            self.sock.sendall((json.dumps(obj) + "\n").encode())
            return self.sock.recv(len(ACK)) == ACK
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


_up_client: UpClient | None = None  # watched by check_stop() while it waits for our answer


def watch_up(client: UpClient | None) -> None:
    """From now on (None: no longer), check_stop() treats ``client``'s exit as a stop."""
    global _up_client
    _up_client = client
