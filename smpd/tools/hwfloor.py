"""The host's own floors, measured in the same run: a cache-line round trip between two cores,
the same round trip to a sleeping process (a signal wake-up), for the adaptive watch, and N
sleeping processes woken one after the other on one core (or wherever the host's scheduler
puts them), for a whole kick of N sleeping CPUs.

smpd/tools/hwfloor.c is compiled on the fly when a C compiler exists, into a fresh
private directory (mkdtemp: 0700, ours, made for this run, in a $TMPDIR that is root's or
ours all the way up and sticky wherever others may write it) and run from there; the
directory goes when the measurement is done. The compiler is looked for in the system's
directories only (TOOL_PATH, not the caller's PATH) and must be root's or ours, with
no directory on its way that others may write; it runs with a clean environment. No cache: a binary that smpd runs,
often as root, must be one it has just built where nobody else can write (a cache
under $XDG_CACHE_HOME or ~ may be another user's to plant a file in). The build
costs a fraction of a second per benchmark. Without a compiler the floor is
reported unavailable, with the reason, and ratios are left out rather than
guessed. The measuring process dies with us, and so do its own children; so does the
compiler with every process it starts (GROUP_SHELL). The compiler's
own temporary files go into the private directory too (its TMPDIR). A SIGKILL of the
process that builds leaves that directory behind; its name says whose it was (pid and start
time), and the next measurement of the same user removes it once that process is gone
(sweep_stale: ours, 0700, a directory, its maker dead; another user's is never touched).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from smpd.host import trust
from smpd.host.proc import die_with_parent

SOURCE = Path(__file__).resolve().parent / "hwfloor.c"  # ships in the package: a wheel measures too


def measure(iterations: int = 200_000, wake: bool = False, sequence: int = 0, pause_us: int = 2000,
            pinned: bool = True, budget_s: float | None = None) -> dict:
    """The host's floor: a cache line's round trip between two cores (hwfloor.c; line1_ns: the
    same on the two words of one line, struct mwait_cpu_dead's layout), or with
    ``wake`` the same round trip to a process asleep in sigwaitinfo() woken by SIGURG, what an
    adaptive CPU's kick adds on the host (cold: each round lets the sleeper settle for 300 us;
    a reference, not a bound), or with ``sequence`` N the time to wake N such processes one
    after the other, all on one core, each asleep ``pause_us`` first (hwfloor.c wakeseq: the
    host's own whole kick of N sleeping CPUs; rtt_ns is that whole time); not ``pinned``, the
    same with every process where the host's scheduler puts it (`--pin none`'s placement).
    ``budget_s`` bounds the cache-line floor's time: it stops at the first end of a pair of batches
    (up to 1000 rounds of each layout) past it, and says so (``budget_cut``; ``iterations``: the
    rounds of each layout it made, ``requested``: those asked for). A
    floor that cannot be measured (no compiler, a full $TMPDIR) is reported unavailable, with
    why: it must never cost the run it is compared with."""
    with Session() as floor:
        return floor.measure(iterations, wake, sequence, pause_us, pinned, budget_s)


class Session:
    """hwfloor.c built once, for several measurements in one run (`smpd bench kick` measures the
    cache-line floor beside each batch of kicks); its private directory goes on exit. A build that
    could not be made leaves every measurement unavailable, with the same why."""

    def __init__(self):
        self._dir: tempfile.TemporaryDirectory | None = None
        self.exe: str | None = None
        self.compiler = self.why = ""

    def __enter__(self) -> Session:
        try:
            self._build()
        except OSError as err:
            self.why = f"could not build or run hwfloor: {err}"
        return self

    def __exit__(self, *exc) -> None:
        if self._dir is not None:
            try:
                self._dir.cleanup()
            except OSError:
                pass

    def _build(self) -> None:
        # Our 0700 directory is only as private as the one it is made in: in a directory another user
        # can write without the sticky bit (or owns), they could rename ours away and put theirs, with
        # a binary of their own, in its place between the build and the run.
        tmp = tempfile.gettempdir()
        why = _untrusted(tmp, sticky_ok=True)
        if why:
            self.why = f"not building in $TMPDIR {tmp}: {why} (set TMPDIR to a directory of yours)"
            return
        sweep_stale(tmp)
        self._dir = tempfile.TemporaryDirectory(prefix=_private_prefix(), dir=tmp)  # 0700, ours, new
        self.exe, made = build(self._dir.name)  # (the executable, the compiler) or (None, why not)
        if self.exe:
            self.compiler = made
        else:
            self.why = made

    def measure(self, iterations: int = 200_000, wake: bool = False, sequence: int = 0,
                pause_us: int = 2000, pinned: bool = True, budget_s: float | None = None) -> dict:
        """As the module's measure(), with this session's build."""
        try:
            return self._measure(iterations, wake, sequence, pause_us, pinned, budget_s)
        except OSError as err:
            return {"available": False, "why": f"could not build or run hwfloor: {err}"}

    def _measure(self, iterations: int, wake: bool, sequence: int, pause_us: int, pinned: bool,
                 budget_s: float | None) -> dict:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2 and not sequence:
            return {"available": False, "why": "needs two host cores; this process may use one"}
        if self.exe is None:
            return {"available": False, "why": self.why}
        a, b = cores[0], cores[-1]
        where = str(a) if pinned else "any"
        argv = ([self.exe, "wakeseq", where, str(sequence), str(iterations), str(pause_us)] if sequence else
                [self.exe, *(["wake"] if wake else []), str(a), str(b), str(iterations)])
        line_floor = not (sequence or wake)
        if line_floor and budget_s is not None:
            argv.append(str(max(1, round(budget_s * 1000))))  # BUDGET_MS
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=_dies_with_us())
        except subprocess.TimeoutExpired:
            return {"available": False, "why": "the ping-pong did not finish within 120 s (host too loaded)"}
        if r.returncode:
            return {"available": False, "why": f"hwfloor failed: {r.stderr.strip()[:200]}"}
        vals = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        # The cache-line floor also plays on one line's two words (line1_ns_*), in turn with the two lines.
        return {"available": True, **_figures(vals, "rtt"), **_figures(vals, "line1"),
                "cores": ([a] if pinned else cores) if sequence else [a, b],
                "iterations": int(vals.get("rounds", iterations)), "compiler": self.compiler,
                **({"sequence": sequence, "pause_us": pause_us, "pinned": pinned} if sequence else {}),
                **({"requested": iterations, "budget_cut": "budget_cut" in vals} if line_floor else {})}


# Where the compiler, and the assembler and linker it runs, are looked for: not the caller's PATH,
# which may name a directory another user can write (smpd often runs as root).
TOOL_PATH = "/usr/local/bin:/usr/bin:/bin"
TOOL_ENV = {"PATH": TOOL_PATH, "LC_ALL": "C"}  # and no GCC_EXEC_PREFIX, COMPILER_PATH, CPATH... of the caller's


def _untrusted(path: str, sticky_ok: bool = False) -> str | None:
    """Why the program at ``path`` is not one to run (None when it is): it, every symbolic link on
    the way to it and every directory above each, and every directory above where it really is
    (a link or a ``..`` in the middle of the path leads elsewhere than it reads), must be root's or
    ours and not writable by others, so that nobody else can have put it there or can swap it.
    ``sticky_ok`` (a directory to make our private one in, $TMPDIR): one that others may write is
    fine with the sticky bit (/tmp), where nobody else can rename or remove what we make in it."""
    def why_not(d: str) -> str | None:
        st = os.lstat(d)
        if st.st_uid not in (0, trust.me()):
            return f"{d}, on the way to {path}, belongs to uid {st.st_uid}"
        if (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not stat.S_ISLNK(st.st_mode)
                and not (sticky_ok and st.st_mode & stat.S_ISVTX)):
            return f"{d}, on the way to {path}, is writable by others" + (" without the sticky bit" if sticky_ok else "")
        return None

    def walk(p: str) -> str | None:  # ``p`` and every directory above it
        return next(filter(None, map(why_not, (p, *map(str, Path(p).parents)))), None)

    at = os.path.abspath(path)
    for _hop in range(40):
        why = walk(at)
        if why:
            return why
        if not os.path.islink(at):
            return walk(os.path.realpath(path))
        at = os.path.normpath(os.path.join(os.path.dirname(at), os.readlink(at)))
    return f"{path}: too many symbolic links"


# The compiler runs under this shell, in a process group of its own: the compiler driver's own children (cc1,
# as, ld) are not its to take along when it dies, so the group goes whole. The shell gets SIGTERM when we die
# (PR_SET_PDEATHSIG, even by SIGKILL) and kills its group; any other end of ours kills the group from here.
GROUP_SHELL = 'trap "kill -KILL 0" TERM; "$@" & wait $!'


def build(private: str) -> tuple[str | None, str]:
    """hwfloor.c built into ``private``, a directory of ours that nobody else can write:
    (the executable, the compiler), or (None, why not). The compiler comes from TOOL_PATH and
    must be root's or ours all the way up; it runs with TOOL_ENV, with a deadline, and it and
    every process it starts die with us (GROUP_SHELL)."""
    if not SOURCE.is_file():
        return None, f"{SOURCE} not found (it ships with the smpd repository)"
    cc = next(filter(None, (shutil.which(name, path=TOOL_PATH) for name in ("cc", "gcc", "clang"))), None)
    sh = shutil.which("sh", path=TOOL_PATH)
    if cc is None or sh is None:
        return None, f"no C compiler (cc, gcc or clang) or no sh in {TOOL_PATH}"
    why = _untrusted(cc) or _untrusted(sh)
    if why:
        return None, f"not running the compiler {cc} under {sh}: {why}"
    exe = os.path.join(private, "hwfloor")
    # its temporary files (.s, .o) in ``private`` too, and what it says: a SIGKILL leaves nothing elsewhere
    with open(os.path.join(private, "cc.log"), "w+") as said:
        p = subprocess.Popen([sh, "-c", GROUP_SHELL, "sh", cc, "-O2", "-pthread", "-o", exe, str(SOURCE)],
                             stdout=said, stderr=subprocess.STDOUT, cwd=private, env={**TOOL_ENV, "TMPDIR": private},
                             preexec_fn=_group_dies_with_us())
        try:
            built = _exited(p.pid, 120)
        finally:
            # What is left of its group (nothing, once it has built), while the shell is not reaped yet:
            # its pid, the group's number, cannot be anyone else's until then.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        said.seek(0)
        err = said.read()
    if not built:
        return None, f"{cc} did not build {SOURCE.name} within 120 s"
    if p.returncode:
        return None, f"{cc} could not build {SOURCE.name}: {err.strip()[:200]}"
    return exe, cc


def _exited(pid: int, timeout_s: float) -> bool:
    """Has our child ``pid`` exited within ``timeout_s``? It is left unreaped (WNOWAIT)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.005)
    return False


PREFIX = "smpd-hwfloor-"  # then the maker's pid and start time (trust.start_ticks), then mkdtemp's letters


def _private_prefix() -> str:
    pid = os.getpid()
    return f"{PREFIX}{pid}-{trust.start_ticks(pid)}-"


def sweep_stale(tmp: str) -> list[str]:
    """Remove the private directories in ``tmp`` that a process of ours left when it was killed
    before it could (SIGKILL): ours (uid), a directory and not a link, 0700, named for a maker
    (pid, start time) that no longer runs. What was removed."""
    gone = []
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return gone
    for e in entries:
        if not e.name.startswith(PREFIX):
            continue
        try:
            pid, start = (int(x) for x in e.name[len(PREFIX):].split("-")[:2])
            st = os.lstat(e.path)
        except (ValueError, OSError):
            continue
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != trust.me() or stat.S_IMODE(st.st_mode) != 0o700
                or not start or trust.is_our_process(pid, start)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)  # fd-relative on Linux: no link inside is followed
        gone.append(e.path)
    return gone


def _dies_with_us():
    """A preexec_fn: the child gets SIGKILL when this process dies, even between its fork and
    the prctl (the parent's pid is checked)."""
    return functools.partial(die_with_parent, os.getpid())


def _group_dies_with_us():
    """A preexec_fn for GROUP_SHELL: a process group of its own (its pid), and SIGTERM when this
    process dies, on which the shell kills that group."""
    parent = os.getpid()

    def preexec() -> None:
        os.setpgid(0, 0)
        die_with_parent(parent, signal.SIGTERM)

    return preexec


def _figures(vals: dict[str, str], what: str) -> dict[str, int]:
    """hwfloor's printed ``WHAT_ns_p50``, ``_p99`` and ``_min`` as ``WHAT_ns``, ``WHAT_p99_ns`` and
    ``WHAT_min_ns``; none when it printed none (line1: the cache-line floor only)."""
    if f"{what}_ns_p50" not in vals:
        return {}
    return {f"{what}_ns": int(vals[f"{what}_ns_p50"]), f"{what}_p99_ns": int(vals[f"{what}_ns_p99"]),
            f"{what}_min_ns": int(vals[f"{what}_ns_min"])}
