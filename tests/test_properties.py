"""Garbage in, one line out: every parser, every option, the soak and config file readers.

Property-based (hypothesis). For generated garbage:

* every value parser either returns a valid value or raises BadInput, nothing else;
* every option and argument of every command (found by walking the click tree, so a
  new option is covered the day it is added) exits 2 with exactly one ``Error:``
  line, and creates or deletes nothing: no /dev/shm entry, no file where it ran;
* the soak file reader and the config reader, given damaged files, raise BadInput
  (one line at the CLI) and change nothing.

Commands run in-process (click's CliRunner) against a machine name of this run that
is not up: a machine name that could be a user's is never generated into a
command, and `up`/`demo` only ever get values their own parser refuses, so no
machine is ever made or touched here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import run_name
from smpd.tools import cli, hostload, soak
from smpd import config, cpulist, inputs
from smpd.host import names
from smpd.kernel import scenario
from smpd.errors import BadInput, ConfigError
from smpd.kernel.scenario import parse_boot

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=24)
# Text that looks almost right: digits of every script, separators, the syntax's own characters.
NEAR = st.lists(st.sampled_from(list("0123456789-,:x@._ \t\n+") + ["\uff11", "\u0661", "\u00b2", "all", "nmi",
                                                                   "after-copy", "0x", "cpu", "ms"]),
                max_size=10).map("".join)
GARBAGE = st.one_of(TEXT, NEAR)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- value parsers -------------------------------------------------------------------------

@pytest.mark.parametrize("parse", [
    lambda t: cpulist.parse(t, 64),
    lambda t: scenario.parse_injection(t, 64),
    hostload.parse,
    inputs.parse_duration,
    lambda t: config.parse_signal(t) if config._signame(t) is None else (_ for _ in ()).throw(BadInput(t)),
], ids=["cpulist", "injection", "host-load", "duration", "signal"])
@SETTINGS
@given(text=GARBAGE)
def test_value_parsers_accept_or_refuse_with_bad_input(parse, text):
    try:
        parse(text)
    except BadInput:
        pass


@SETTINGS
@given(text=GARBAGE)
def test_ascii_numbers_are_ascii(text):
    n = inputs.ascii_int(text, hex_ok=True)
    if n is not None:
        assert text.isascii() and text.strip() == text and "_" not in text
    x = inputs.ascii_real(text)
    if x is not None:
        assert text.isascii() and x == x and abs(x) != float("inf")


# -- every option of every command ------------------------------------------------------------

def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _value_params():
    for path, cmd in _commands(cli.main):
        for p in cmd.params:
            if isinstance(p, click.Option) and (p.is_flag or p.name == "help"):
                continue
            yield pytest.param(path, p, id=f"{' '.join(path)}:{p.opts[0] if p.opts else p.name}")


MAKES_MACHINES = {("up",), ("demo",)}


def _refused_by_its_type(param: click.Parameter, value: str) -> bool:
    try:
        param.type.convert(value, param, None)
    except click.BadParameter:
        return True
    return False


def _refused_by(parse, value: str) -> bool:
    try:
        parse(value)
    except BadInput:
        return True
    return False


@contextlib.contextmanager
def _scratch_cwd():
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="smpd-prop-") as d:
        os.chdir(d)
        try:
            yield d
        finally:
            os.chdir(old)


def _shm() -> set[str]:
    return set(os.listdir(names.SHM_DIR))


def _made_since(before: set[str], could_name: tuple[str, ...]) -> set[str]:
    """/dev/shm entries made since ``before`` for a machine this invocation could have named (its
    --name, the garbage value itself, the default name): any other machine coming up meanwhile is
    someone else's, a developer's or another test run's beside this one, and not this test's to
    count."""
    ours = set()
    for n in could_name:
        try:
            ours.add(names.segment(n)[1:])
        except Exception:  # not a name a segment can have: nothing can be made under it
            pass
    return (_shm() - before) & ours


@pytest.mark.parametrize("path, param", list(_value_params()))
@SETTINGS
@given(value=GARBAGE)
def test_garbage_for_any_option_is_one_error_line_exit_2_and_nothing_made(path, param, value):
    assume(value not in ("-h", "--help", "--version"))
    target = ["--name", run_name("prop")] if any(p.name == "name" for p in cmd_params(path)) and \
        param.name != "name" else []
    args = [*path, *target, *(param.opts[:1] if isinstance(param, click.Option) else []), value]
    before = _shm()
    with _scratch_cwd() as d:
        if param.name == "config_file":  # a file that is not there is a config error, whatever the command
            assume(not os.path.lexists(value))
        elif param.name == "boot" and path in MAKES_MACHINES:  # free text, refused by its parser
            assume(_refused_by(lambda v: parse_boot(v, config.MAX_CPUS), value))
        elif param.name == "name" or path in MAKES_MACHINES:
            # never a name that could be a user's machine, never a value `up` or `demo` would act on
            assume(_refused_by_its_type(param, value))
        r = CliRunner().invoke(cli.main, args, prog_name="smpd", env={"SMPD_NAME": None})
        assert not os.listdir(d), f"smpd {args} left {os.listdir(d)}"
    assert r.exit_code == 2, (args, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, r.stderr)
    assert not _made_since(before, (*target[1:], value, "default"))


def cmd_params(path: tuple[str, ...]) -> list[click.Parameter]:
    cmd: click.Command = cli.main
    for part in path:
        cmd = cmd.commands[part]
    return cmd.params


# -- the soak file reader -------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=8)
GOOD_HEADER = dict(soak.asdict(soak.Plan(seed=7, parks=["hlt"], inject_rate=0.3, kinds=["nmi"], cpus=4, trials=10)))
GOOD_RECORD = {"trial": 0, "seed": 1, "park": "hlt", "offline": "1-3", "order": "random", "inject": [],
               "outcome": "CLEAN", "trial_ms": 12.5, "kick": {"rtt_ns": [100], "stuck": 0, "over_budget": 0,
                                                           "budget_ns": 5000000}}


@SETTINGS
@given(which=st.sampled_from(["header", "record"]), key=st.sampled_from(sorted({*GOOD_HEADER, *GOOD_RECORD})),
       value=JSON, tail=st.binary(max_size=12))
def test_a_damaged_soak_file_is_bad_input_and_stays_as_it_was(which, key, value, tail):
    header, record = dict(GOOD_HEADER), dict(GOOD_RECORD)
    (header if which == "header" else record)[key] = value
    data = (json.dumps(header) + "\n" + json.dumps(record) + "\n").encode() + tail
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        f.write(data)
        f.flush()
        try:
            plan, records, _ = soak.read(f.name)
            soak.summarize(plan, records)  # what --summary does with it: must not fail either
        except BadInput:
            pass
        f.seek(0)
        assert f.read() == data


# -- the config reader ---------------------------------------------------------------------

@SETTINGS
@given(body=st.one_of(st.binary(max_size=64), TEXT.map(str.encode),
                      st.dictionaries(st.sampled_from(["machine", "watch", "kick", "host", "x"]),
                                      st.dictionaries(TEXT, JSON, max_size=3), max_size=2)
                      .map(lambda d: "\n".join(f"[{s}]\n" + "\n".join(f"{json.dumps(k)} = {json.dumps(v)}"
                                                                      for k, v in t.items())
                                               for s, t in d.items()).encode())))
def test_a_config_file_is_valid_or_a_config_error(body):
    with tempfile.NamedTemporaryFile(suffix=".toml") as f:
        f.write(body)
        f.flush()
        try:
            config.load(f.name)
        except ConfigError:
            pass
