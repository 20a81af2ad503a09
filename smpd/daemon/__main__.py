"""``python -P -m smpd.daemon FD``: the coordinator process.

The template CPU processes are forked from (smpd.daemon.template) is started first: its
interpreter's start (~0.1 s) then runs beside this one's imports of the daemon (~0.25 s),
instead of after them. Should it fail to start here, the bring-up starts it again and says why.

`smpd up` starts us before its own imports and checks (smpd.tools.early), and hangs up on bad
input, then waits for us to exit: a thread watches for that during the imports, and ends us
at once (the template killed and reaped), rather than once they are done (``_end_if_hung_up``).
"""

import _thread
import os
import signal
import socket
import sys

from smpd.daemon.stopping import STOP_SIGNALS

signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # our children stay ours until reaped (see supervisor.run)
# A stop signal from here on is seen by check_stop() (smpd.daemon.stopping), as once run() begins;
# the template inherits the mask, as it did when boot() started it.
signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

from smpd.daemon.template import Template  # noqa: E402 (light: the CPU's code is the template's own)

template: Template | None = Template()
try:
    template.start()
except Exception:  # e.g. the host refused a process: boot() tries again, and reports it
    template = None

_watching = _thread.allocate_lock()  # held by whoever ends the process at a hang-up: the watcher or main()


def _end_if_hung_up(fd: int) -> None:
    """Until main() reads the spec itself: should `up` hang up before sending a byte of it, kill
    and reap the template and exit, without waiting for the imports: `smpd up --cpus 0` took
    0.42-0.49 s without this, 0.24-0.29 s with it (five runs each, alternated). No descriptor of
    its own (a process forked meanwhile would hold the socket open)."""
    import select

    poll = select.poll()
    poll.register(fd, select.POLLIN)
    poll.poll()  # a byte, or end-of-file
    if _watching.locked():  # main() reads the spec now, and sees a hang-up itself
        return
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return  # not a socket any more: main() has it, and finds out why
    try:
        if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):  # the spec is coming: main() reads it
            return
    except OSError:
        return
    finally:
        s.detach()  # main()'s UpClient owns ``fd``
    if _watching.acquire(blocking=False):  # main() has not begun to read: it never will
        if template is not None:
            template.stop()
        os._exit(1)


_thread.start_new_thread(_end_if_hung_up, (int(sys.argv[1]),))

from smpd.daemon.supervisor import main  # noqa: E402

_watching.acquire()  # from here, main() sees a hang-up itself (UpClient.read_spec); held for good
main(template=template)
