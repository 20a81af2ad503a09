"""The `smpd` command. Every command is a client of the machine's coordinator.

Errors follow click's convention: one line, ``Error: ...``, naming the input, what
was wrong and what is accepted; exit status 2 for bad input (including "no such
machine" and "already up"), 1 for runtime failures; 3 (errors.OUTCOME_NOT_CLEAN) when a
kexec, chain or panic ran and its outcome was not CLEAN.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, NoReturn

import click

from smpd import config as config_mod, cpulist, inputs
from smpd.host import files
from smpd.tools import entry, lifecycle, trace
from smpd.host import names
from smpd.kernel import scenario as scenario_mod
from smpd.errors import OUTCOME_NOT_CLEAN, BadInput, CoordinatorGone, Interrupted, NotOurs, SmpdError
from smpd.tools.entry import stop_signals_interrupt

if TYPE_CHECKING:
    from rich.console import Console

TIMELINE_FORMS = "all, summary (the default), or a cpulist (those CPUs' events and the coordinator's)"

NAME_HELP = "Machine name (several machines can run side by side). Env: SMPD_NAME."


class Int(click.ParamType):
    """A whole number in ASCII digits (smpd.inputs.ascii_int), in ``lo..hi``."""

    name = "N"

    def __init__(self, lo: int, hi: int, hex_ok: bool = False, what: str = "a whole number",
                 accepted: str | None = None):
        self.lo, self.hi, self.hex_ok, self.what = lo, hi, hex_ok, what
        self.accepted = accepted or f"{lo}..{hi}"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):  # a default
            n = value
        else:
            n = inputs.ascii_int(value, self.hex_ok)
            if n is None:
                self.fail(f"{value!r} is not {self.what}; expected {self.accepted}", param, ctx)
        if not self.lo <= n <= self.hi:
            self.fail(f"{n} is not in the range {self.accepted}", param, ctx)
        return n


class Real(click.ParamType):
    """A finite number in ASCII decimal notation, in ``lo..hi`` (never nan or inf)."""

    name = "X"

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        x = value if isinstance(value, float) else inputs.ascii_real(value)
        if x is None:
            self.fail(f"{value!r} is not a number; expected {self.lo:g}..{self.hi:g}", param, ctx)
        if not self.lo <= x <= self.hi:
            self.fail(f"{x:g} is not in the range {self.lo:g}..{self.hi:g}", param, ctx)
        return x


def Cpus() -> Int:  # noqa: N802 - a parameter type, named like one
    return Int(1, config_mod.MAX_CPUS)


def Seed() -> Int:  # noqa: N802
    return Int(0, 2**63 - 1, hex_ok=True, what="an integer", accepted="0..2**63-1")


class MachineName(click.ParamType):
    name = "NAME"

    def convert(self, value, param, ctx):
        if not names.valid_machine_name(value):
            self.fail(f"{value!r} is not a machine name; use {names.NAME_ACCEPTED}", param, ctx)
        return value


def name_option(f):
    return click.option("--name", "-n", type=MachineName(), default="default", show_default=True,
                        envvar="SMPD_NAME", help=NAME_HELP)(f)


def one_line(text: str) -> str:
    """``text`` with every character that is not printable (newlines, \\x85, U+2028, escapes a
    terminal would act on) shown as its escape: a message quoting user input stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _fail(message: str, status: int) -> NoReturn:
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(status)


class SmpdGroup(click.Group):
    """Every way a command can fail ends in one line, ``Error: ...``, and its exit status:
    2 for bad input (click's usage errors included: no usage block), 1 for runtime
    failures, 128+N for a stop by signal N. (3 is no failure of smpd's: a kexec, chain or
    panic whose outcome was not CLEAN.)"""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        with stop_signals_interrupt(ends_process=entry.command_process()):  # (the process ends with this)
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.exceptions.NoArgsIsHelpError as err:  # a bare `smpd` or `smpd bench`: the help
                click.echo(err.ctx.get_help())
                sys.exit(0)
            except click.UsageError as err:
                where = err.ctx.command_path if err.ctx is not None else "smpd"
                _fail(f"{err.format_message()} (see '{where} --help')", err.exit_code)
            except click.ClickException as err:
                _fail(err.format_message(), err.exit_code)
            except SmpdError as err:
                _fail(str(err), err.exit_status)
            except _Stopped as stopped:
                err = stopped.interrupt
                _fail(f"stopped by {signal.Signals(err.signum).name}" + (f"; {err.note}" if err.note else ""),
                      err.exit_status)
            except (KeyboardInterrupt, click.Abort):  # before our handlers, or a prompt's Ctrl-C
                _fail("interrupted", 130)
            except BrokenPipeError:  # `smpd status | head`: the reader left; nothing to say to it
                sys.stderr.close()
                os._exit(1)
            except OSError as err:
                _fail(f"{err.strerror or err}" + (f": {err.filename}" if err.filename else ""), 1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Interrupted as err:  # past click, which would turn it into a bare Abort
            raise _Stopped(err) from None


class _Stopped(Exception):
    """Carries an Interrupted out through click's main, which catches KeyboardInterrupt."""

    def __init__(self, interrupt: Interrupted):
        super().__init__(interrupt)
        self.interrupt = interrupt


def _soakrun():
    """smpd.tools.soakrun (and the soak, cluster and kexec code under it, and rich), imported by the
    commands that use it (soak, and kexec --replay): the others start ~20 ms sooner without it."""
    from smpd.tools import soakrun

    return soakrun


def _render():
    """smpd.tools.render, and rich under it (~70 ms), imported by the commands that draw: those
    that print JSON or one line (`status --json`, `down`, any --json) start without it."""
    from smpd.tools import render

    return render


def _console(**kw) -> "Console":
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            """A reader that left (`smpd up | true`) is the command's to judge, not rich's SystemExit(1):
            `up`'s machine is up all the same; any other command ends as SmpdGroup.main says."""
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return _Console(**kw)


@click.group(cls=SmpdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smpd")
def main():
    """smpd: an x86 SMP machine of real processes over real shared memory.

    Reproduce, time and soak-test how Linux parks offline CPUs in
    mwait_play_dead() and what kexec() does to them.
    """


@main.command()
@click.option("--cpus", type=Cpus(), default=None, help="CPUs including CPU 0, 1..4096 [config: 64].")
@name_option
@click.option("--watch", type=click.Choice(config_mod.WATCH_STRATEGIES), default=None,
              help="How CPU processes wait [config: auto].")
@click.option("--hot-path", type=click.Choice(config_mod.HOT_PATHS), default=None,
              help="Compiled (c) or pure Python watch and kick loops [config: auto].")
@click.option("--pin", type=click.Choice(config_mod.PIN_POLICIES), default=None,
              help="Host-core placement [config: none].")
@click.option("--seed", type=Seed(), default=None, help="Seed of the machine's memory image [config: random].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML file overriding config/default.toml.")
@click.option("--kernel", type=click.Choice(scenario_mod.KERNELS), default=None,
              help="The first kernel's flavour: pre-fix, 6.5 or 6.6 (none, init, hlt) [config: 6.6].")
@click.option("--boot", default=None, metavar="PARAMS",
              help="Its boot parameters: nosmt, maxcpus=N, kaslr[=SEED] (comma-separated) [config: none].")
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the machine.")
def up(cpus, name, watch, hot_path, pin, seed, config_file, kernel, boot, foreground):
    """Bring up a machine: CPU 0 is the coordinator, CPUs 1..N-1 are processes.

    Generation 1 (a cold boot) starts the CPUs its boot parameters keep; with nosmt the
    odd CPUs are SMT siblings, brought up and then parked in mwait_play_dead(). Returns
    once they are and prints the summary.
    """
    cfg = config_mod.load(config_file).with_overrides(
        machine={"cpus": cpus, "name": name if name != "default" or config_file is None else None,
                 "seed": seed},
        watch={"strategy": watch, "hot_path": hot_path}, pin={"policy": pin},
        kernel={"flavour": kernel, "boot": boot},
    )
    name = cfg.get("machine", "name")
    spec = lifecycle.prepare(cfg)
    if foreground:
        from smpd.daemon import supervisor as coordinator

        out, render = _console(), _render()

        def ready(summary):
            out.print(render.up_summary(summary))
            out.print("[dim]foreground: Ctrl-C (or SIGTERM) stops the machine[/dim]")

        status = coordinator.run(spec, on_ready=ready)
        out.print(f"machine '{name}' is down")
        sys.exit(status)
    progress = None
    if sys.stderr.isatty():  # how far a big machine got, while it comes up
        from smpd.tools.upprogress import BringUpProgress

        progress = BringUpProgress(name, cfg.get("machine", "cpus"), _console(stderr=True))
    summary = None
    try:
        try:  # what draws the summary (rich's import, ~60 ms) is imported while the machine comes up
            summary = lifecycle.start_daemon(spec, meanwhile=_render, tick=progress and progress.tick)
        finally:
            if progress is not None:
                progress.close()
        out = _console()
        out.print(_render().up_summary(summary))
        _later_commands_hint(out, name)
        sys.stdout.flush()  # here, where a reader that left is said, not at the interpreter's exit
        entry.command_done()
    except Interrupted as err:
        if summary is not None:  # stopped while it said so (a reader that does not read): it is up
            _up_all_the_same(name, f"its summary was cut short by {signal.Signals(err.signum).name}")
        err.note = f"machine '{name}' was coming up; it was stopped and nothing of it is left"
        raise
    except OSError as err:  # the summary could not be written (`smpd up | true`: its reader left)
        if summary is None:
            raise
        _up_all_the_same(name, f"its summary could not be written ({err.strerror or err})")


def _up_all_the_same(name: str, why: str) -> NoReturn:
    """`up`'s machine is up but its summary did not reach its reader: exit 0 (what was asked is
    done), said on stderr if that can be written."""
    with contextlib.suppress(OSError, ValueError):
        click.echo(f"smpd: machine '{name}' is up; {why}", err=True)
        sys.stderr.flush()
    os._exit(0)  # (not sys.exit: the interpreter's last flush of what stdout still holds could block or fail)


def _later_commands_hint(out: Console, name: str) -> None:
    """A name that came from a --config file, not from --name or SMPD_NAME, is not what later
    commands look for unless told: say how."""
    source = click.get_current_context().get_parameter_source("name")
    if name != "default" and source == click.core.ParameterSource.DEFAULT:
        from rich.text import Text

        out.print(Text(f"the name '{name}' comes from the config file: later commands find this machine with "
                       f"--name {name}, or export SMPD_NAME={name}", style="yellow"), soft_wrap=True)


@main.command()
@name_option
@click.option("--force", is_flag=True, help="Also remove a segment this smpd cannot read (another layout version).")
def down(name, force):
    """Stop a machine: CPU processes, coordinator, segment, channel. Idempotent.

    Also cleans up a stale machine whose coordinator died.
    """
    click.echo(lifecycle.down(name, force=force))


@main.command()
@name_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {machine: {...}, cpus: [...]}.")
@click.option("--watch", "live", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=Real(0.05, 3600), default=0.5, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=Int(1, 10**9), default=None, help="With --watch: stop after this many refreshes.")
@click.option("--cpus", "only", metavar="LIST", default=None,
              help="Show these CPUs in full (a cpulist: 5, 1-63, 1,3,5-7), whatever the machine's size; "
                   "with --json, only these CPUs.")
def status(name, as_json, live, interval, count, only):
    """Every CPU: pid, host core, hotplug and execution state, wake-ups, interrupts.

    Up to 32 CPUs, one row each; above, one cell each, and --cpus LIST shows any of
    them in full. The table fits the terminal: columns are left out, never cut.
    """
    if as_json and live:
        raise BadInput("--json and --watch do not combine; use --json alone, repeatedly")
    machine = lifecycle.require(name)
    cpus = None
    if only is not None:
        try:
            cpus = cpulist.parse(only, machine.ncpus)
        except BadInput as err:
            raise BadInput(f"--cpus: {err}") from None

    if as_json:  # its JSON as it came: a 4096-CPU machine's 2.4 MB are not parsed and dumped again
        click.echo(status_request(machine, cpus, raw=True))
        return
    # The grid of a machine with many CPUs shows each CPU's state only: ask for no more.
    render = _render()
    brief = cpus is None and machine.ncpus > render.TABLE_MAX_CPUS

    def snapshot() -> dict:
        return status_request(machine, cpus, brief=brief)

    out = _console()
    if not live:
        out.print(render.status_view(snapshot(), out.width, cpus is not None))
        return
    from rich.live import Live
    from rich.text import Text

    machine.hold()
    n = 0
    try:
        with Live(render.status_view(snapshot(), out.width, cpus is not None), console=out, auto_refresh=False) as view:
            while count is None or n < count - 1:
                time.sleep(interval)
                try:
                    view.update(render.status_view(snapshot(), out.width, cpus is not None), refresh=True)
                except (CoordinatorGone, NotOurs):  # gone; or its freed channel name taken by another
                    if machine.went_down():
                        view.update(Text(f"machine '{machine.name}' went down (smpd down)"), refresh=True)
                        return
                    raise CoordinatorGone(f"the coordinator of machine '{machine.name}' (pid {machine.pid}) died "
                                          f"during the watch; `smpd down --name {machine.name}` cleans up what "
                                          f"is left") from None
                n += 1
    except KeyboardInterrupt:
        pass


def status_request(machine, cpus: list[int] | None, raw: bool = False, brief: bool = False):
    """``machine``'s `status` (its JSON text when ``raw``): the views of ``cpus`` only, when given,
    made by the coordinator. One that predates that argument (a machine up across an upgrade of
    smpd: the same layout) is asked for every CPU, and the others are left out here."""
    if cpus is None:
        return machine.request("status", raw=raw, brief=brief)
    try:
        return machine.request("status", raw=raw, brief=brief, cpus=cpulist.format_list(cpus))
    except BadInput as err:
        if "unexpected keyword argument 'cpus'" not in str(err):
            raise
    s = machine.request("status", brief=brief)
    wanted = set(cpus)
    s["cpus"] = [c for c in s["cpus"] if c["cpu"] in wanted]
    return json.dumps(s) if raw else s


@main.command()
@name_option
@click.argument("cpus", metavar="CPULIST")
def offline(name, cpus):
    """Take CPUs offline: each runs play_dead() into mwait_play_dead().

    CPULIST is the kernel's syntax: 5, 1-63, 1,3,5-7, 1-63:1/2 (every second CPU), 0-N. CPU 0
    cannot go offline.
    """
    machine = lifecycle.require(name)
    cpulist.parse(cpus, machine.ncpus)  # the same check the coordinator makes, before connecting
    r = _locked_request(machine, "offline", "a hotplug", cpus=cpus)
    _report_hotplug(r, "offlined", "already_offline", "offline", "mwait_play_dead()")


@main.command()
@name_option
@click.argument("cpus", metavar="CPULIST")
def online(name, cpus):
    """Bring CPUs back online with INIT/SIPI; smp_callin() zeroes their mwait_cpu_dead."""
    machine = lifecycle.require(name)
    cpulist.parse(cpus, machine.ncpus)
    r = _locked_request(machine, "online", "a hotplug", cpus=cpus)
    _report_hotplug(r, "onlined", "already_online", "online", "RUNNING")
    if r.get("parked"):  # nosmt siblings this kernel had never booted (maxcpus)
        click.echo(f"CPU {cpulist.format_list(r['parked'])}: SMT sibling{'s' if len(r['parked']) > 1 else ''} "
                   f"of a nosmt kernel: cpu_up() booted {'them' if len(r['parked']) > 1 else 'it'} once and parked "
                   f"{'them' if len(r['parked']) > 1 else 'it'} in mwait_play_dead() (ECANCELED); not online")
        sys.exit(1)


def _report_hotplug(r: dict, done: str, already: str, word: str, where: str) -> None:
    if r[done]:
        n = len(r[done])
        click.echo(f"CPU {cpulist.format_list(r[done])} {word} ({n} CPU{'s' if n > 1 else ''}, "
                   f"{r['ms']:.1f} ms): now in {where}")
    if r[already]:
        click.echo(f"CPU {cpulist.format_list(r[already])} already {word}")


@main.command()
@name_option
@click.argument("target")
@click.option("--value", type=Int(0, 0xFFFFFFFF, hex_ok=True, what="an integer (decimal or 0x hex)",
                                  accepted="0..0xffffffff (a u32)"),
              default=None, help="u32 to write (e.g. 0x4A17DEAD); default: the value already there.")
def poke(name, target, value):
    """Write one u32 of emulated memory through the bus and say which monitors it woke.

    TARGET is an address (0x1004040) or a symbol: mwait_cpu_dead[N], mwait_cpu_dead[N].status,
    thread_info[N]. Without --value the same value is written again (MWAIT still wakes).
    """
    machine = lifecycle.require(name)
    r = _locked_request(machine, "poke", "a poke", target=target, value=value)
    woke = f"woke CPU {cpulist.format_list(r['woken_cpus'])}" if r["woken_cpus"] else "woke no monitor"
    click.echo(f"{r['symbol']} @ {r['addr']:#x}: {r['old']:#010x} -> {r['new']:#010x}; {woke}")
    if r.get("ended"):
        click.echo(_ended_line(machine.name, r["ended"]))


def _ended_line(name: str, ended: str) -> str:
    return f"machine '{name}' {ended}: nothing runs on it until `smpd reset` power-cycles it"


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON array: [{"name", "state": up|stale-removed|left-alone, "cpus", "pid", "why"}].')
def list_machines(as_json):
    """This user's machines that have a segment (live or stale)."""
    rows = []
    for name in lifecycle.our_machines():
        try:
            live = lifecycle.probe(name)
        except SmpdError as err:  # another user's entry, another layout, one being created: untouched
            rows.append({"name": name, "state": "left-alone", "cpus": None, "pid": None, "why": str(err)})
            continue
        rows.append({"name": name, "state": "up" if live else "stale-removed", "cpus": live.ncpus if live else None,
                     "pid": live.pid if live else None, "why": ""})
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no machines")
    for r in rows:
        click.echo(f"{r['name']}: " + {"up": f"up, {r['cpus']} CPUs, coordinator pid {r['pid']}",
                                       "stale-removed": "stale segment removed",
                                       "left-alone": f"left alone: {r['why']}"}[r["state"]])


def _print_json_or(obj, as_json: bool, view) -> None:
    if as_json:
        click.echo(json.dumps(obj))
    else:
        _console().print(view(obj))


def _kernel_options(f):
    for opt in reversed((
        click.option("--kernel", type=click.Choice(scenario_mod.KERNELS), default=None,
                     help="The kernel doing the kexec: pre-fix, 6.5, 6.6 [the running one's flavour]."),
        click.option("--park", type=click.Choice(scenario_mod.PARKS), default=None,
                     help="The old name of --kernel: none = pre-fix, init = 6.5, hlt = 6.6."),
        click.option("--into", type=click.Choice(scenario_mod.KERNELS), default=None,
                     help="The kernel kexec'd into [the same flavour]."),
        click.option("--boot", default=None, metavar="PARAMS",
                     help="Boot parameters of the new kernel, on top of the running one's: nosmt, smt, "
                          "maxcpus=N, kaslr[=SEED], nokaslr."),
        click.option("--inject", "injects", multiple=True, metavar="KIND@PHASE[:TARGET][xCOUNT]",
                     help="NMI/MCE/SMI at before-kick|during-kick|after-kick|during-copy|after-copy; repeatable. "
                          "TARGET a cpulist of CPUs 1..N-1 or 'all' (the default: CPUs 1..N-1; an MCE to "
                          "'all' during or after the copy is a broadcast and reaches CPU 0 too, where #MC "
                          "cannot be taken; an NMI or SMI never goes to CPU 0)."),
        click.option("--order", type=click.Choice(scenario_mod.ORDERS), default="sequential", show_default=True,
                     help="Order of the kexec copy."),
        click.option("--seed", type=Seed(), default=None, help="Seed of the scenario's choices [random, printed]."),
    )):
        f = opt(f)
    return f


def _view_options(f, timeline: bool = True):
    """--timeline FORM and --trace FILE: how a kexec's (a kick's, a chain's) timeline is shown."""
    f = click.option("--trace", "trace_file", default=None, metavar="FILE",
                     help="Also write the timeline as a Chrome trace-event JSON file: open it in "
                          "https://ui.perfetto.dev or chrome://tracing.")(f)
    if timeline:
        f = click.option("--timeline", "timeline_form", default="summary", show_default=True, metavar="FORM",
                         help=f"Which events to print: {TIMELINE_FORMS}.")(f)
    return f


def _timeline_form(text: str, ncpus: int) -> str | list[int]:
    if text in ("all", "summary"):
        return text
    if not text or not set(text) <= set("0123456789,-"):
        raise BadInput(f"--timeline '{text}': expected {TIMELINE_FORMS}")
    try:
        return cpulist.parse(text, ncpus)
    except BadInput as err:
        raise BadInput(f"--timeline: {err}") from None


def _check_trace(path: str | None, reading: str | None = None) -> None:
    """--trace FILE, before the run: writable as smpd writes outputs, and not the file the run
    reads (a --replay's soak file)."""
    if path is None:
        return
    files.check_output(path, "--trace")
    if reading is not None:
        try:
            same = os.path.samefile(path, reading)
        except OSError:
            same = False
        if same:
            raise BadInput(f"--trace {path} is the soak file this replay reads; name another file")


def _trace(path: str | None, reports: list[tuple[str, dict]], machine) -> None:
    """Write the trace after the report is out: a path that went bad during the run (a link
    planted meanwhile) loses the trace, not the report."""
    if path is None:
        return
    try:
        trace.write(path, reports, machine.name, machine.ncpus)
    except BadInput as err:
        raise SmpdError(f"the report above is complete, but the trace was not written: {err}") from None
    click.echo(f"trace: {path} (open it in https://ui.perfetto.dev or chrome://tracing)", err=True)


def _kernel_choice(kernel: str | None, park: str | None) -> str | None:
    if kernel is not None and park is not None:
        raise BadInput("--kernel and --park say the same thing; give one")
    return kernel if kernel is not None else park


def _locked_request(machine: lifecycle.Live, op: str, doing: str, **args) -> dict:
    """``op`` under the machine's lock (``doing`` names it to a soak or a command that holds it)."""
    with lifecycle.machine_lock(machine.name, doing):
        return machine.request(op, **args)


@contextlib.contextmanager
def _drawing(machine: lifecycle.Live):
    """While the block runs, on a terminal: how many APs are online in the generation the header
    names (a kexec, chain, reset or replay of thousands of CPUs takes seconds, most of them a kernel
    starting each AP). Yields the tick for the block's requests (None: nothing drawn)."""
    progress = None
    if sys.stderr.isatty():
        from smpd.tools.upprogress import GenerationProgress

        progress = GenerationProgress(machine.name, machine.ncpus, _console(stderr=True))
    try:
        yield progress and progress.tick
    finally:
        if progress is not None:
            progress.close()


def _drawn_request(machine: lifecycle.Live, op: str, doing: str, **args) -> dict:
    """_locked_request, drawn (_drawing)."""
    with _drawing(machine) as tick:
        return _locked_request(machine, op, doing, tick=tick, **args)


@main.command()
@name_option
@_kernel_options
@click.option("--crash", is_flag=True, help="kdump: panic on CPU 0, crash_smp_send_stop(), the crash kernel.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.option("--replay", default=None, metavar="FILE:TRIAL", help="Re-run one recorded soak trial's scenario.")
@_view_options
def kexec(name, kernel, park, into, boot, injects, order, seed, crash, as_json, replay, timeline_form, trace_file):
    """Run the kexec sequence on the machine and say precisely what happened.

    The outcome comes first: CLEAN, TRIPLE_FAULT, CORRUPTION, MCE_SHUTDOWN, SMM_HANG,
    STUCK or CPU_LOST, with its evidence; then the CPUs and the timeline. Afterwards
    the machine runs the new kernel (the next generation), which can kexec again;
    `smpd reset` power-cycles it to generation 1. Exit status: 0 on CLEAN, 3 on any
    other outcome, 1 when smpd itself failed, 2 on bad input.
    """
    if replay is not None:

        ctx = click.get_current_context()
        mixed = [p for p in ("kernel", "park", "into", "boot", "injects", "order", "seed", "crash")
                 if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        if mixed:
            raise BadInput(f"--replay takes the whole scenario from the file; drop --{mixed[0].rstrip('s')}")
    replay_file = None if replay is None else _soakrun().parse_replay_target(replay)[0]
    machine = lifecycle.require(name)
    form = _timeline_form(timeline_form, machine.ncpus)
    _check_trace(trace_file, replay_file)
    if replay is not None:
        with _drawing(machine) as tick, lifecycle.machine_lock(name, "a kexec --replay"):  # its reset and kexec
            r = _soakrun().replay(name, replay, tick)
    else:
        kernel = _kernel_choice(kernel, park)
        for spec in injects:
            scenario_mod.parse_injection(spec, machine.ncpus)
        scenario_mod.parse_boot(boot, machine.ncpus)
        r = _drawn_request(machine, "kexec", "a kexec", kernel=kernel, into=into, boot=boot, crash=crash,
                           inject=list(injects), order=order, seed=seed)
    _print_json_or(r, as_json, lambda r: _render().kexec_report(r, form))
    _trace(trace_file, [(f"generation {r['generation']['old']} -> {r['generation']['new']}", r)], machine)
    sys.exit(0 if r["outcome"] == "CLEAN" else OUTCOME_NOT_CLEAN)


@main.command()
@name_option
@click.option("--kexecs", type=Int(1, 100), required=True, help="Links of the chain (1..100).")
@_kernel_options
@click.option("--json", "as_json", is_flag=True, help="Every link's report, as one JSON object.")
@functools.partial(_view_options, timeline=False)
def chain(name, kexecs, kernel, park, into, boot, injects, order, seed, as_json, trace_file):
    """KEXECS kexecs in a row, no reset between: one outcome per link, the first failing one named.

    Each link's scenario seed derives from --seed and the link's number. The chain stops
    at a link that is not CLEAN. Exit status: 0 when every link is CLEAN, 3 when one was
    not, 1 when smpd itself failed, 2 on bad input.
    """
    kernel = _kernel_choice(kernel, park)
    machine = lifecycle.require(name)
    for spec in injects:
        scenario_mod.parse_injection(spec, machine.ncpus)
    scenario_mod.parse_boot(boot, machine.ncpus)
    _check_trace(trace_file)
    r = _drawn_request(machine, "chain", "a chain", kexecs=kexecs, kernel=kernel, into=into, boot=boot,
                       inject=list(injects), order=order, seed=seed)
    _print_json_or(r, as_json, lambda r: _render().chain_report(r))
    _trace(trace_file, [(f"link {n}: generation {link['generation']['old']} -> {link['generation']['new']}", link)
                        for n, link in enumerate(r["links"], 1)], machine)
    sys.exit(0 if r["first_failing_link"] is None else OUTCOME_NOT_CLEAN)


@main.command()
@name_option
@click.option("--cpu", type=Int(0, 4095), default=0, show_default=True,
              help="The CPU that panics (an online one; 0 is the boot CPU).")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@_view_options
def panic(name, cpu, as_json, timeline_form, trace_file):
    """panic() on one CPU with no crash kernel loaded: smp_send_stop() stops the others.

    No kick (no kexec is in progress) and no write: the parked CPUs stay in
    mwait_play_dead(). The 6.5 kernel parks the others in INIT only from the boot CPU
    (b1472a60a584); with [kernel] init_only_from_boot_cpu = false, a panic on another CPU
    sends INIT to CPU 0 and the machine resets (MACHINE_RESET). Afterwards the machine
    stays in panic(): `smpd reset` power-cycles it. Exit status: 0 on CLEAN, 3 on any other
    outcome, 1 when smpd itself failed, 2 on bad input.
    """
    machine = lifecycle.require(name)
    if cpu >= machine.ncpus:
        raise BadInput(f"--cpu {cpu}: machine '{name}' has CPUs 0..{machine.ncpus - 1}")
    form = _timeline_form(timeline_form, machine.ncpus)
    _check_trace(trace_file)
    r = _locked_request(machine, "panic", "a panic", cpu=cpu)
    _print_json_or(r, as_json, lambda r: _render().panic_report(r, form))
    _trace(trace_file, [(f"panic on CPU {cpu}", r)], machine)
    sys.exit(0 if r["outcome"] == "CLEAN" else OUTCOME_NOT_CLEAN)


@main.command()
@name_option
@click.option("--json", "as_json", is_flag=True, help="The kick report as one JSON object.")
@_view_options
def kick(name, as_json, timeline_form, trace_file):
    """Only smp_kick_mwait_play_dead(): who acknowledged, how fast, who is stuck.

    Kicked CPUs end in HLT; `smpd reset` parks them in mwait_play_dead() again. A pre-fix
    kernel has no kick (refused). Exit status: 0 when every CPU kicked acknowledged, 3 when one
    is stuck (pr_err_once), 1 when smpd itself failed, 2 on bad input.
    """
    machine = lifecycle.require(name)
    form = _timeline_form(timeline_form, machine.ncpus)
    _check_trace(trace_file)
    r = _locked_request(machine, "kick", "a kick")
    _print_json_or(r, as_json, lambda r: _render().kick_report(r, form))
    _trace(trace_file, [("smp_kick_mwait_play_dead()", r)], machine)
    sys.exit(OUTCOME_NOT_CLEAN if r["kick"]["stuck"] else 0)


@main.command()
@name_option
@click.option("--offline", "offline", default=None, metavar="CPUS",
              help="The CPUs to leave offline after the boot, a cpulist ('' for none) [default: those "
                   "offline before the first kexec].")
@click.option("--kernel", type=click.Choice(scenario_mod.KERNELS), default=None,
              help="Generation 1 boots as this kernel, with the machine's boot parameters, until the next "
                   "reset [the machine's own].")
def reset(name, offline, kernel):
    """A power cycle: generation 1 boots again, with the offline CPUs of before the first kexec
    (or --offline's)."""
    machine = lifecycle.require(name)
    if offline:  # checked here too, to name the option ('' is none)
        try:
            cpulist.parse(offline, machine.ncpus)
        except BadInput as err:
            raise BadInput(f"--offline '{offline}': {err}") from None
    r = _drawn_request(machine, "reset", "a reset", offline=offline, kernel=kernel)  # None: the handler's default
    waiting = r.get("not_started", [])
    parked = cpulist.format_list([c for c in r["offline"] if c not in waiting])
    where = [f"CPU {parked} in mwait_play_dead()"] if parked else []
    if waiting:
        where.append(f"CPU {cpulist.format_list(waiting)} not started by it (in wait-for-SIPI)")
    click.echo(f"machine '{name}' was power-cycled in {r['ms']:.1f} ms: generation 1 ({r['kernel']}) runs; "
               + (f"offline: {'; '.join(where)}" if where else "every CPU is online"))
    if r.get("restored_from_soak"):
        click.echo(r["restored_from_soak"])


@main.command()
@name_option
@click.argument("kind", type=click.Choice(scenario_mod.KINDS))
@click.option("--cpus", "target", default="all", show_default=True, help="A cpulist, or 'all' (CPUs 1..N-1).")
@click.option("--count", type=Int(1, scenario_mod.MAX_COUNT), default=1, show_default=True,
              help="How many times to send it, 1..1000 (signals of one kind that arrive before the CPU takes the "
                   "first merge into one: the NMI latch).")
@click.option("--json", "as_json", is_flag=True,
              help="The result as one JSON object: {injection, cpus: [...], not_taken, timeline}.")
def inject(name, kind, target, count, as_json):
    """Send a stray NMI, MCE or SMI now, and say what it did to each target CPU."""
    machine = lifecycle.require(name)
    scenario_mod.injection(kind, "after-copy", target, count, machine.ncpus, f"--cpus '{target}'")
    r = _locked_request(machine, "inject", "an injection", kind=kind, cpus=target, count=count)
    _print_json_or(r, as_json, lambda r: _render().injection_report(
        r, _ended_line(machine.name, r["ended"]) if r.get("ended") else None))


@main.command()
@click.option("--cpus", type=Cpus(), default=64, show_default=True, help="CPUs of the demo machine.")
@click.option("--name", "-n", type=MachineName(), default="demo", show_default=True, envvar="SMPD_NAME",
              help="Name of the demo's machine (or set SMPD_NAME); a machine of that name must not be up.")
@click.option("--watch", type=click.Choice(config_mod.WATCH_STRATEGIES), default="auto", show_default=True)
@click.option("--seed", type=Seed(), default=None, help="Seed of the machine and of every scenario.")
def demo(cpus, name, watch, seed):
    """The main job: every park policy against no injection and each of NMI, MCE, SMI.

    Brings up a machine, offlines all but CPU 0, runs the kexec for each policy
    (none, hlt, init) x injection (none, nmi, mce, smi after the copy), prints the
    matrix of outcomes with one line of evidence each and a kick-latency summary,
    then tears the machine down.
    """
    from smpd.tools import demo as demo_mod

    demo_mod.run(cpus=cpus, name=name, watch=watch, seed=seed, console=_console())


@main.group()
def config():
    """The configuration smpd up uses: config/default.toml, overridden by --config FILE."""


@config.command("show")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML file overriding config/default.toml, as `smpd up --config FILE` takes it.")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {section: {key: {"value": V, "from": FILE}}}.')
def config_show(config_file, as_json):
    """Every setting's effective value and the file it comes from (command-line options of
    `smpd up` win over both)."""
    cfg, sources = config_mod.load_with_sources(config_file)
    cfg.sizes(), cfg.boot()  # what `smpd up` checks across settings, for the file's own [machine] cpus
    table = {section: {key: {"value": value, "from": sources[(section, key)]} for key, value in values.items()}
             for section, values in cfg.raw.items()}
    if as_json:
        click.echo(json.dumps(table))
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("setting", "value", "from"):
        t.add_column(col, overflow="fold")
    default = str(config_mod.default_path())
    for section, values in table.items():
        for key, v in values.items():
            t.add_row(f"{section}.{key}", json.dumps(v["value"]),
                      Text("default", style="dim") if v["from"] == default else Text(v["from"], style="bold"))
    _console().print(t)
    click.echo(f"default: {default}")


@main.group()
def bench():
    """Benchmarks on a running machine."""


@bench.command("kick")
@name_option
@click.option("--targets", default=None, metavar="CPULIST", help="CPUs to kick [every parked CPU].")
@click.option("--rounds", type=Int(1, 10_000_000), default=1000, show_default=True,
              help="Kick rounds (each kicks every target, then re-parks them).")
@click.option("--duration", default=None, metavar="T",
              help="Run for this long instead (30s, 2m, 1h); --rounds is then ignored.")
@click.option("--json", "json_file", default=None, metavar="FILE", help="Write the figures as JSON.")
@click.option("--plot", "plot_file", default=None, metavar="FILE",
              help="Write the latency histogram (log scale): FILE.png, FILE.svg or FILE.pdf, by its extension.")
def bench_kick(name, targets, rounds, duration, json_file, plot_file):
    """Time real kick latencies: coordinator write -> CPU sees it -> coordinator sees the ack.

    Each round kicks every target out of mwait_play_dead() (smp_kick_mwait_play_dead's
    loop, first-hand on CPU 0), then re-parks them through mwait_play_dead(). Prints
    percentiles next to the host's own cache-line round trip.
    """
    from smpd.tools import benchkick

    seconds = inputs.parse_duration(duration) if duration is not None else None
    if json_file is not None:  # ('' too: refused as no name)
        files.check_output(json_file, "--json")
    if plot_file is not None:
        files.check_output(plot_file, "--plot")
        benchkick.check_plot_available(plot_file)
    machine = lifecycle.require(name)
    if targets is not None:
        cpulist.parse(targets, machine.ncpus)
    # Its rounds re-park the targets: no soak, kexec or hotplug between them (machine_lock).
    with lifecycle.machine_lock(machine.name, "a kick benchmark"):
        run, floor, floor_after, wake_floor, interrupted = benchkick.measure(machine, targets, rounds, seconds,
                                                                             _console(stderr=True))
    report = benchkick.Run.report(run, floor, wake_floor, floor_after)
    report["interrupted"] = interrupted
    # The report is printed whatever happens to its files: one checked before the run may be refused
    # now (another user may have put a file of theirs at its name since), and the run is not lost then.
    json_file, json_failed = benchkick.write_json_or_keep(json_file, report)
    plot_failed = None
    if plot_file is not None:
        try:
            benchkick.write_plot(plot_file, run, report)
        except SmpdError as err:  # refused (2), or could not be written whole (1)
            plot_file, plot_failed = None, err
    _console().print(_render().bench_kick(report, json_file, plot_file))
    failed = [err for err in (json_failed, plot_failed) if err is not None]
    if failed:
        raise (BadInput if all(isinstance(e, BadInput) for e in failed) else SmpdError)("; ".join(map(str, failed)))


@main.command()
@name_option
@click.option("--trials", type=Int(1, 10_000_000), default=None, help="Run this many trials [100].")
@click.option("--duration", default=None, metavar="T", help="Run for this long instead (30s, 10m, 2h).")
@click.option("--host-load", "host_load", default=None, metavar="SPEC",
              help="Load the host meanwhile: cpu:N, mem:N, io:N, syscall:N, stress-ng:ARGS (comma-separated).")
@click.option("--park", "parks", default="none,hlt,init", show_default=True,
              help="Kernels to draw from: pre-fix, 6.5, 6.6 or their old names none, init, hlt.")
@click.option("--inject-rate", type=Real(0, 1), default=0.3, show_default=True,
              help="Share of trials that get injections.")
@click.option("--kinds", default="nmi,mce,smi", show_default=True, help="Interrupt kinds to draw from.")
@click.option("--seed", type=Seed(), default=None, help="Seed of the whole trial sequence [random, recorded].")
@click.option("--out", default=None, metavar="FILE", help="JSON-lines results [soak-<seed>.jsonl].")
@click.option("--resume", default=None, metavar="FILE", help="Continue the run recorded in FILE.")
@click.option("--summary", "summary_file", default=None, metavar="FILE", help="Print the summary of FILE and exit.")
@click.option("--list", "list_outcome", default=None, metavar="OUTCOME",
              help="With --summary: every trial that ended OUTCOME (TRIPLE_FAULT, STUCK, ...), to replay.")
@click.option("--cluster", "cluster_address", default=None, metavar="ADDRESS|auto",
              help="Run on a Ray cluster (the 'cluster' extra): one machine per slot on every node.")
@click.option("--slots-per-node", type=Int(1, 64), default=None, help="With --cluster: machines per node [1].")
@click.option("--cpus", type=Cpus(), default=None, help="With --cluster: CPUs of each slot's machine [config: 64].")
def soak(name, trials, duration, host_load, parks, inject_rate, kinds, seed, out, resume, summary_file, list_outcome,
         cluster_address, slots_per_node, cpus):
    """Thousands of randomized kexec trials on the running machine, under host load.

    Each trial draws park policy, offline set, copy order and injections from the
    seed, runs the kexec, records the report (flushed and fsynced) and resets the
    machine. Ctrl-C stops after the current trial. Every trial can be replayed
    with `smpd kexec --replay FILE:TRIAL`.
    """

    ctx = click.get_current_context()
    given = {p for p in ("trials", "duration", "host_load", "parks", "inject_rate", "kinds", "seed", "out",
                         "cluster_address", "slots_per_node", "cpus")
             if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE}
    _soakrun().main(name=name, trials=trials, duration=duration, host_load=host_load, parks=parks,
                 inject_rate=inject_rate, kinds=kinds, seed=seed, out=out, resume=resume,
                 summary_file=summary_file, given=given, console=_console(), list_outcome=list_outcome,
                 cluster_address=cluster_address, slots_per_node=slots_per_node, cpus=cpus)
