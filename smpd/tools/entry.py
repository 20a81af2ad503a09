"""The `smpd` command's first code: the stop signals are ours before anything else is imported.

Importing the CLI (click, rich, psutil, ...) takes a noticeable moment; a Ctrl-C or
SIGTERM in it would otherwise end the process with a traceback, or with no word at
all. Nothing exists yet to clean up, so it ends with the same one line as any stop.
(Only the interpreter's own start-up, before this module runs, is out of reach.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from smpd.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> list[int]:
    """The stop signals this process may take over: not one it was started ignoring (`nohup`
    ignores SIGHUP, a shell's background job SIGINT), which the user meant to stay ignored."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


@contextlib.contextmanager
def stop_signals_interrupt(ends_process: bool = False):
    """SIGINT, SIGTERM and SIGHUP all raise Interrupted in the main thread, once: a second
    signal while the first one's clean-up runs is ignored, so the clean-up finishes.

    ``ends_process``: the process ends with this block (the `smpd` command's own run of its
    command). A stop after it finds the command done, with its status said: it exits at once
    with that status. Restored to the default, a stop there killed the process in its last
    milliseconds with a status that said the command had failed (SIGINT: -2, no word); ignored,
    an end blocked on a full pipe could not be stopped at all."""
    raised = []

    def interrupt(signum, _frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    old = {sig: signal.signal(sig, interrupt) for sig in stop_signals()}
    status = 1  # (an exception escapes: Python's own exit status for one)
    try:
        yield
        status = 0
    except SystemExit as end:
        status = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, _exit_with(status) if ends_process else handler)


def _exit_with(status: int):
    def exit_now(_signum, _frame):
        os._exit(status)  # (what is still buffered for a reader that does not read is dropped)

    return exit_now


_command_process = False  # main() runs: this process is the `smpd` command's, and ends with its command


def command_process() -> bool:
    """Is this the `smpd` command's own process (not a caller's running the CLI in-process)?"""
    return _command_process


def command_done() -> None:
    """The command has done all it was asked, its output written (`up`: its machine up, its summary
    out). In the `smpd` command's own process a stop from here on exits at once with status 0, not
    with a status that says it failed; an in-process caller keeps its handlers."""
    if _command_process:
        for sig in stop_signals():
            signal.signal(sig, _exit_with(0))


def main(args=None, prog_name: str = "smpd"):
    global _command_process
    _command_process = True
    try:
        # Until the CLI's own handlers take over (smpd.tools.cli.SmpdGroup.main, which says how each
        # stop ended its command); once it is done, a stop exits with the command's status.
        with stop_signals_interrupt(ends_process=True):
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
        _last_output()


def _last_output() -> None:
    """The process's last Python. What stdout still holds goes now, while a stop still exits at once
    with the command's status (a reader that does not read: ``_exit_with``); a reader that left gets
    the rest in /dev/null. Then the stop signals are ignored: the interpreter's finalization resets
    Python's handlers to the default, and a stop there killed the process (SIGINT: status -2)."""
    try:
        sys.stdout.flush()
    except OSError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
