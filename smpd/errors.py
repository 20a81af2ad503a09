"""One small exception hierarchy; the CLI turns each into one line and an exit status.

``BadInput`` and its children are the user's to fix (exit status 2, like a usage
error); anything else that is an ``SmpdError`` is a runtime failure (exit status 1).
"""


# The exit status of `smpd kexec`, `chain` and `panic` when smpd did its work and the emulated
# machine's outcome was not CLEAN (TRIPLE_FAULT, MCE_SHUTDOWN...): a result, not a failure of smpd
# (1), so a script can tell the two apart.
OUTCOME_NOT_CLEAN = 3


class SmpdError(Exception):
    """Base of every error smpd raises on purpose."""

    exit_status = 1


class BadInput(SmpdError):
    """The request cannot be honoured as given: it names what was wrong and what is accepted."""

    exit_status = 2


class ConfigError(BadInput):
    """A config file or value is malformed, unknown, or out of range."""


class MachineNotUp(BadInput):
    def __init__(self, name: str, up: list[str] | None = None):
        others = f"; up now: {', '.join(up)} (choose one with --name or SMPD_NAME)" if up else ""
        super().__init__(f"no machine named '{name}' is up (start one with: smpd up --name {name}){others}")
        self.name = name


class MachineAlreadyUp(BadInput):
    def __init__(self, name: str, pid: int | None):
        who = f"coordinator pid {pid}" if pid else "another `smpd up` made it first"
        super().__init__(
            f"machine '{name}' is already up ({who}); "
            f"stop it with `smpd down --name {name}` or pick another --name"
        )
        self.name = name


class LayoutMismatch(BadInput):
    """The segment was made by an smpd with another layout: we refuse to read or write it."""


class HostTooSmall(BadInput):
    """The host cannot hold the requested machine (memory, process or file limits)."""


class CpuLost(SmpdError):
    """A CPU process died (GONE): an emulator fault, at run time (exit 1). `smpd reset` gives it a new process."""


class MachineComingUp(SmpdError):
    """The coordinator runs but does not serve its channel yet: try again in a moment (exit 1)."""


class CoordinatorGone(SmpdError):
    """The coordinator died or stopped answering while we talked to it."""


class ChannelClosed(CoordinatorGone):
    """The coordinator's end of the channel closed mid-request, no answer sent (killed, most often)."""


class InternalError(SmpdError):
    """A bug inside the coordinator, caught at the request boundary: logged, answered, the machine stays up."""


class Timeout(SmpdError):
    """A bounded wait ran out: the message says which wait and its budget."""


class NotOurs(BadInput):
    """A name smpd would use is held by someone else (another user's file, link, process or
    socket), or a file of ours is not as smpd made it: refused, never read, signalled or removed."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP reached a command: the same clean stop for all three.

    A KeyboardInterrupt, so every ``except KeyboardInterrupt`` clean-up path takes
    it; ``note`` says what the command leaves behind (set where that is known)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.note = ""

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N"
