"""``python -P -m smpd.daemon FD``: the coordinator process.

The template CPU processes are forked from (smpd.daemon.template) is started first: its
interpreter's start (~0.1 s) then runs beside this one's imports of the daemon (~0.25 s),
instead of after them. Should it fail to start here, the bring-up starts it again and says why.
"""

import signal

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

from smpd.daemon.supervisor import main  # noqa: E402

main(template=template)
