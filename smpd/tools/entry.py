"""The `smpd` command's first code: the stop signals are ours before anything else is imported.

Importing the CLI (click, rich, psutil, ...) takes a noticeable moment; a Ctrl-C or
SIGTERM in it would otherwise end the process with a traceback, or with no word at
all. Nothing exists yet to clean up, so it ends with the same one line as any stop.
(Only the interpreter's own start-up, before this module runs, is out of reach.)
"""

from __future__ import annotations

import contextlib
import signal
import sys

from smpd.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> list[int]:
    """The stop signals this process may take over: not one it was started ignoring (`nohup`
    ignores SIGHUP, a shell's background job SIGINT), which the user meant to stay ignored."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


@contextlib.contextmanager
def stop_signals_interrupt(then_ignore: bool = False):
    """SIGINT, SIGTERM and SIGHUP all raise Interrupted in the main thread, once: a second
    signal while the first one's clean-up runs is ignored, so the clean-up finishes.

    ``then_ignore``: the process ends with this block (the `smpd` command's own run of its
    command). A stop after it finds the command done (`up`'s summary printed, its machine up)
    and is ignored: restored to the default, it killed the process in its last milliseconds
    with a status that said the command had failed (SIGINT: -2, no word)."""
    raised = []

    def interrupt(signum, _frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    old = {sig: signal.signal(sig, interrupt) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_IGN if then_ignore else handler)


_command_process = False  # main() runs: this process is the `smpd` command's, and ends with its command


def command_process() -> bool:
    """Is this the `smpd` command's own process (not a caller's running the CLI in-process)?"""
    return _command_process


def command_done() -> None:
    """The command has done what it was asked (`up`: its machine is up); what is left is saying so.
    In the `smpd` command's own process a stop from here on is ignored: it could only cut that
    short, with a status that says the command failed. An in-process caller keeps its handlers."""
    if _command_process:
        for sig in stop_signals():
            signal.signal(sig, signal.SIG_IGN)


def main(args=None, prog_name: str = "smpd"):
    global _command_process
    _command_process = True
    try:
        # Until the CLI's own handlers take over (smpd.tools.cli.SmpdGroup.main, which says how each
        # stop ended its command); ignored once it is done, until the process ends.
        with stop_signals_interrupt(then_ignore=True):
            try:
                from smpd.tools import early  # here: its imports (subprocess) come after the signals are ours

                early.start_if_up(sys.argv[1:] if args is None else list(args))
                from smpd.tools.cli import main as cli

                return cli(args, prog_name=prog_name)
            except Interrupted as err:  # (SmpdGroup.main turns each of its own into its exit)
                print(f"Error: stopped by {signal.Signals(err.signum).name} while starting; nothing was done",
                      file=sys.stderr)
                sys.exit(err.exit_status)
    finally:
        started = sys.modules.get("smpd.tools.early")
        if started is not None:
            started.discard()  # a coordinator `smpd up` started and did not hand a spec: gone before we are
