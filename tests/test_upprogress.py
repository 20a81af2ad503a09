"""`smpd up`'s and `smpd kexec`'s (`chain`'s, `reset`'s) progress on a terminal (smpd.tools.upprogress): what each reads of
the machine, and what it draws."""

import contextlib
import errno
import io

from rich.console import Console

from conftest import run_smpd
from smpd.tools.upprogress import BringUpProgress, GenerationProgress


def _progress(name: str, cpus: int, terminal: io.StringIO | None = None, kind=BringUpProgress) -> BringUpProgress:
    return kind(name, cpus, Console(file=terminal or io.StringIO(), force_terminal=True, width=100), show_after_s=0)


@contextlib.contextmanager
def _drawing(p: BringUpProgress):
    """``p``, closed at the end: it then holds neither the segment nor a drawing."""
    try:
        yield p
    finally:
        p.close()
    assert p.seg is None and p.progress is None


def _drawn(p: BringUpProgress) -> str:
    p.tick()
    return p.console.file.getvalue()


def test_it_counts_the_cpu_processes_forked_and_the_cpus_online_and_draws_the_aps_online(machine):
    """Read from the machine's segment: CPUs 5-7 taken offline still have their processes (forked),
    and are not online; CPU 0, the coordinator, is online and forked by nobody. Every process
    forked, what it draws is the APs online."""
    m = machine(8)
    run_smpd("offline", "5-7", name=m.name)
    with _drawing(_progress(m.name, 8)) as p:
        assert p.counts() == (7, 5)
        drawn = _drawn(p)
        assert "APs online" in drawn and "4/7" in drawn, drawn


class _GoneTerminal(io.StringIO):
    def write(self, s):
        raise OSError(errno.EIO, "Input/output error")


def test_a_terminal_gone_ends_the_drawing_not_the_command(machine):
    """A closed window whose SIGHUP was ignored: every write to it fails (EIO). Neither a tick nor
    the close raises; the drawing stops, and the segment is let go."""
    m = machine(4)
    p = _progress(m.name, 4, _GoneTerminal())
    p.tick()
    assert p.lost and p.progress is None
    p.tick()
    p.close()
    assert p.seg is None


def test_before_its_machine_has_a_segment_it_reads_and_draws_nothing(machine_name):
    p = _progress(machine_name, 8)
    p.tick()
    assert p.counts() is None and p.progress is None and p.console.file.getvalue() == ""
    p.close()


def test_a_kexec_counts_the_aps_online_in_the_generation_the_header_names(machine):
    """Every AP parked: none online in generation 1; after the kexec, generation 2's smp_init() has
    started all seven, and that is what it draws."""
    m = machine(8)
    run_smpd("offline", "1-7", name=m.name)
    with _drawing(_progress(m.name, 8, kind=GenerationProgress)) as p:
        assert p.counts() == (1, 0)
        run_smpd("kexec", "--seed", "1", name=m.name)
        assert p.counts() == (2, 7)
        drawn = _drawn(p)
        assert "generation 2: APs online" in drawn and "7/7" in drawn, drawn
