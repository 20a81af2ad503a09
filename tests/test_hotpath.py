"""The two hot-path backends, compiled (smpd/machine/_hotpath.c) and Python (smpd.machine.pyhotpath),
driven in this process through the same steps over a real segment: they must agree.

The other side of each step is real too: a helper thread raises bytes through the bus
(after it sees the waiter asleep), sends an interrupt signal to this thread, or, for the
kicker, a forked helper process plays the parked CPU and answers in status. A sleep that only
the doorbell (a signal to the process) ends runs in a forked child (``_as_a_cpu_process``).
"""

import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time

import multiprocess
import pytest

from conftest import REPO, in_forked_child, scratch_segment, wait_until
from smpd.host.proc import asleep_in_sigwait, die_with_parent, stat_fields
from smpd.kernel import kick
from smpd.machine import core, hotpath, layout as L, pyhotpath
from smpd.machine.bus import DOORBELL_SIGNAL, Bus

BACKENDS = ["python"] + (["c"] if hotpath.WHY_NOT is None else [])
CPU = 1
IRQ = signal.SIGUSR2  # stands for an interrupt signal (NMI, SMI or MCE)
MD_OFF = 5 * L.LINE  # "mwait_cpu_dead" of CPU 1: a line of emulated memory CPU 1 monitors


@pytest.fixture(params=BACKENDS)
def seg(request):
    with scratch_segment("hot") as s:
        s.set_hdr("hot_path", L.HotPath.C if request.param == "c" else L.HotPath.PYTHON)
        s.set_cb(CPU, "pid", os.getpid())  # the doorbell rings this process
        s.u16[s.geo.dir_off // L.DIR_ENTRY + MD_OFF // L.LINE] = CPU + 1  # CPU 1's MONITOR, armed
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {DOORBELL_SIGNAL})  # as a CPU process has it
        old_alarm, old_irq = signal.getsignal(signal.SIGALRM), signal.getsignal(IRQ)
        signal.signal(IRQ, lambda *_: None)
        try:
            yield s
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            signal.signal(signal.SIGALRM, old_alarm)
            signal.signal(IRQ, old_irq)


def _waiter(seg):
    return hotpath.waiter(seg, CPU, {IRQ}, DOORBELL_SIGNAL)


def _wake_word(seg) -> int:
    return seg.wake_mask(CPU)


def _when_asleep(seg, then) -> threading.Thread:
    """A thread that waits until the waiter sleeps, then does ``then()``."""
    sleeping = seg.cb_index32(CPU, "sleeping")

    def run():
        deadline = time.monotonic() + 30
        while not seg.u32[sleeping] and time.monotonic() < deadline:
            time.sleep(0.001)
        then()

    t = threading.Thread(target=run)
    t.start()
    return t


def _no_doorbell_deadline() -> int:
    """A deadline for a sleep only the doorbell ends: one never rung fails the test, not hang it."""
    return time.monotonic_ns() + 60 * 10**9


def _as_a_cpu_process(seg, steps):
    """``steps(seg)`` run in a forked child (conftest.in_forked_child) that CPU 1's doorbell rings.
    The doorbell is a signal to a process, and a pytest-xdist worker has a thread of its own that
    does not block it: one sent while the waiter is not inside sigwaitinfo() could go to that
    thread and be dropped, and would never show in sigpending(). The child has only the threads
    ``steps`` starts, each with the doorbell blocked as this thread has it (and as a CPU process
    has it)."""
    def child():
        seg.set_cb(CPU, "pid", os.getpid())
        return steps(seg)

    try:
        return in_forked_child(child)
    finally:
        seg.set_cb(CPU, "pid", os.getpid())


def _code(r) -> tuple:
    return r[0], r[1], r[2]


def test_the_backends_report_the_same_codes():
    assert (hotpath.WOKE, hotpath.TIMEOUT, hotpath.SIGNAL) == (pyhotpath.WOKE, pyhotpath.TIMEOUT, pyhotpath.SIGNAL)


def test_a_raised_wake_word_returns_at_once_and_is_left_for_the_caller(seg):
    Bus(seg).write(L.PHYS_BASE + MD_OFF, b"\x01\x00\x00\x00")
    assert _code(_waiter(seg).wait(-1, 0, None)) == (hotpath.WOKE, 0, 0)
    assert _wake_word(seg) == 1 << (8 * L.WAKE_WRITE)
    assert seg.cb(CPU, "woke_ns") == 0  # no doorbell ended a sleep: nothing to time a kick with


@pytest.mark.parametrize("spin_ns", [0, 1_000_000, -1], ids=["sleep", "spin-then-sleep", "spin"])
def test_a_deadline_with_nothing_raised_is_a_timeout_and_raises_nothing(seg, spin_ns):
    t0 = time.monotonic_ns()
    r = _waiter(seg).wait(spin_ns, t0 + 20_000_000, None)
    assert _code(r) == (hotpath.TIMEOUT, 0, 0)
    assert time.monotonic_ns() >= t0 + 20_000_000
    assert _wake_word(seg) == 0  # the Python spin's own timer byte was taken back
    assert seg.cb(CPU, "woke_ns") == 0  # a timeout is not a doorbell's wake-up


def test_a_write_to_the_monitored_line_wakes_a_sleeper_through_the_doorbell(seg):
    def sleeper(seg):
        bus = Bus(seg)
        t = _when_asleep(seg, lambda: bus.write(L.PHYS_BASE + MD_OFF + 4, b"\x02\x00\x00\x00"))
        r = _waiter(seg).wait(1_000_000, _no_doorbell_deadline(), None)  # spin 1 ms, then sleep
        t.join()
        return _code(r)

    t0 = time.monotonic_ns()
    assert _as_a_cpu_process(seg, sleeper) == (hotpath.WOKE, 0, 0)
    assert _wake_word(seg) == 1 << (8 * L.WAKE_WRITE)
    assert seg.u32[seg.cb_index32(CPU, "sleeping")] == 0
    assert t0 < seg.cb(CPU, "woke_ns") < time.monotonic_ns()  # when the doorbell had it running again


def test_an_interrupt_signal_ends_the_sleep_and_is_named(seg):
    main = threading.get_ident()
    t = _when_asleep(seg, lambda: signal.pthread_kill(main, IRQ))
    r = _waiter(seg).wait(0, 0, None)
    t.join()
    assert _code(r) == (hotpath.SIGNAL, IRQ, 0)
    assert _wake_word(seg) == 0
    assert seg.cb(CPU, "woke_ns") == 0  # an interrupt, not the doorbell


def test_a_spinner_sees_a_byte_raised_from_elsewhere(seg):
    bus = Bus(seg)
    t = threading.Timer(0.02, lambda: bus.wake(CPU, L.WAKE_IPI))
    t.start()
    r = _waiter(seg).wait(-1, 0, None)
    t.join()
    assert _code(r) == (hotpath.WOKE, 0, 0) and _wake_word(seg) == 1 << (8 * L.WAKE_IPI)


def test_only_the_compiled_waiter_acknowledges_a_kick_itself(seg):
    ack = hotpath.ack(seg, CPU, L.PHYS_BASE + MD_OFF, [])
    if seg.hdr("hot_path") == L.HotPath.PYTHON:
        assert ack is None
        with pytest.raises(TypeError, match="pass ack=None"):
            _waiter(seg).wait(0, 1, object())
    else:
        assert ack is not None


def _parked_cpu(seg, ready):
    """The forked helper: a parked CPU that answers the kick in status, as mwait_play_dead() does."""
    control = (seg.geo.mem_off + MD_OFF) // 4
    ready.set()
    deadline = time.monotonic() + 30
    while seg.u32[control] != L.CPUDEAD_MWAIT_KEXEC_HLT and time.monotonic() < deadline:
        pass
    seg.u32[control + 1] = L.CPUDEAD_MWAIT_KEXEC_HLT
    os._exit(0)


def _kick(seg, rounds: int):
    return Bus(seg).kicker.kick_one(MD_OFF, L.CPUDEAD_MWAIT_KEXEC_HLT, 5000, rounds)


def test_a_cpu_that_never_answers_gets_every_round_and_is_not_acknowledged(seg):
    acked, rounds, t_first, t_ack = _kick(seg, 3)
    assert (acked, rounds, t_ack) == (False, 3, 0) and t_first > 0
    assert seg.u32[(seg.geo.mem_off + MD_OFF) // 4] == L.CPUDEAD_MWAIT_KEXEC_HLT  # control was written
    assert _wake_word(seg) == 1 << (8 * L.WAKE_WRITE)  # through the bus: the monitor's owner was woken


def test_a_cpu_that_already_answered_takes_no_round(seg):
    seg.u32[(seg.geo.mem_off + MD_OFF) // 4 + 1] = L.CPUDEAD_MWAIT_KEXEC_HLT
    acked, rounds, _, t_ack = _kick(seg, 1000)
    assert (acked, rounds, t_ack) == (True, 0, 0)
    # and no round trip is made up for it: there was no write to answer
    e = kick.kick_one(seg, Bus(seg), CPU, L.PHYS_BASE + MD_OFF, 5000, 1000)
    assert e["acknowledged"] and e["rounds"] == 0 and not {"rtt_ns", "one_way_ns", "wake_ns"} & set(e), e


def test_a_cpu_that_answers_is_acknowledged_with_its_time(seg):
    ready = multiprocess.get_context("fork").Event()
    p = multiprocess.get_context("fork").Process(target=_parked_cpu, args=(seg, ready))
    p.start()
    try:
        assert ready.wait(30)
        acked, rounds, t_first, t_ack = _kick(seg, 1_000_000)  # up to 5 s: a loaded host
    finally:
        p.join(30)
    assert acked and 1 <= rounds < 1_000_000 and t_ack >= t_first > 0


def test_a_cpu_that_answers_at_once_still_gets_the_bus_s_write_byte_after(seg):
    """The compiled kicker looks for an awake CPU's answer before the rest of the bus's rule;
    the rule still follows: the monitor's owner has its WRITE byte, and nobody's doorbell rang."""
    seg.u32[(seg.geo.mem_off + MD_OFF) // 4 + 1] = 0

    def kicker(seg):  # its doorbell rings this process
        ready = multiprocess.get_context("fork").Event()
        p = multiprocess.get_context("fork").Process(target=_parked_cpu, args=(seg, ready))
        p.start()
        try:
            assert ready.wait(30)
            acked, rounds, _, _ = _kick(seg, 1_000_000)
        finally:
            p.join(30)
        return acked, rounds, DOORBELL_SIGNAL in signal.sigpending()

    acked, rounds, rung = _as_a_cpu_process(seg, kicker)
    assert acked and rounds >= 1
    assert _wake_word(seg) == 1 << (8 * L.WAKE_WRITE)
    assert not rung


def test_a_sleeping_cpu_s_kick_rings_its_doorbell(seg):
    seg.set_cb(CPU, "sleeping", 1)  # as the CPU process sets it before sigwaitinfo()
    # The doorbell rings the kicker's own process here, where it is blocked, as in a CPU process.
    kicked, rung = _as_a_cpu_process(seg, lambda seg: (_kick(seg, 1)[:2], DOORBELL_SIGNAL in signal.sigpending()))
    assert kicked == (False, 1) and rung
    assert _wake_word(seg) == 1 << (8 * L.WAKE_WRITE)


def test_a_cpu_s_stamp_after_the_kicker_saw_its_answer_gives_no_one_way_sample(seg):
    """The compiled CPU stamps kick_seen_ns right after its answer: a stamp the kicker's own sight
    of the answer beat (the CPU lost its core between the two) says nothing of the way out, and
    gives no sample rather than a made-up one. One way never exceeds the round trip."""
    seg.set_cb(CPU, "kick_seen_ns", 1_300)
    e = kick._entry(seg, CPU, True, 1, 1_000, 1_200, 0)
    assert "one_way_ns" not in e and e["rtt_ns"] == 200
    seg.set_cb(CPU, "kick_seen_ns", 1_100)
    assert kick._entry(seg, CPU, True, 1, 1_000, 1_200, 0)["one_way_ns"] == 100
    assert "one_way_ns" not in kick._entry(seg, CPU, True, 1, 1_000, 1_200, 1_100)  # not stamped this time


RT_IRQ = signal.SIGRTMIN + 7  # an interrupt signal numbered above the doorbell's, as smpd's are


def _raising_irq_byte(seg):
    """An interrupt signal's handler as smpd.machine.core's: it raises CPU 1's IRQ byte."""
    return lambda *_: seg.buf.__setitem__(seg.cb_byte(CPU, "wake", L.WAKE_IRQ), 1)


def _writer(seg, control_value, out, waiting, ipi_first=False, irq_first=False, tag_first=None):
    """The forked helper: a writer that stores ``control_value`` into CPU 1's monitored control word
    without the bus's WRITE byte (the moment between the bus's store and its byte, held open), says
    what the spinning CPU did meanwhile, then raises the byte, and then an IPI to end the HLT of a
    CPU that answered the kick. ``ipi_first``: an IPI's byte is raised just before the store, as
    when an IPI lands with the kick; ``irq_first``: an interrupt signal (RT_IRQ) is sent just
    before it, as when an NMI lands with the kick: the spinner's handler raises its byte;
    ``tag_first``: the segment offset of a resume tag overwritten just before the store, as by a
    kexec copy that reached the old kernel's page before the monitored line."""
    u32, md = seg.u32, (seg.geo.mem_off + MD_OFF) // 4
    entry = seg.geo.dir_off // L.DIR_ENTRY + MD_OFF // L.LINE
    waiting.wait(30)  # the waiter is about to spin; it takes its snapshot of control on entry
    time.sleep(0.05)
    watching = seg.cb(CPU, "mon_watch")  # it spins watching its control word
    if ipi_first or irq_first or tag_first is not None:
        # Both land while the spinner is stopped, so it finds them at once, wherever in its loop it
        # stopped: after its look at the wake words (it then sees control change first) or before
        # it. The signal is delivered as it runs again, before its next look at control: its
        # handler runs only when the spinner asks the interpreter (PyErr_CheckSignals()).
        parent = os.getppid()
        os.kill(parent, signal.SIGSTOP)
        while _proc_state(parent) != "T":
            time.sleep(0.0005)
        if ipi_first:
            seg.buf[seg.cb_byte(CPU, "wake", L.WAKE_IPI)] = 1
        elif irq_first:
            os.kill(parent, RT_IRQ)
        else:
            struct.pack_into("<Q", seg.buf, tag_first, 0xDEAD)
        u32[md] = control_value
        os.kill(parent, signal.SIGCONT)
    u32[md] = control_value
    deadline = time.monotonic() + 0.5
    while u32[md + 1] != L.CPUDEAD_MWAIT_KEXEC_HLT and time.monotonic() < deadline:
        pass
    out.put({"status": u32[md + 1], "wake": _wake_word(seg), "armed": seg.u16[entry], "watching": watching})
    Bus(seg).wake(CPU, L.WAKE_WRITE)
    if u32[md + 1] == L.CPUDEAD_MWAIT_KEXEC_HLT:  # answered: now in HLT, which the write does not end
        deadline = time.monotonic() + 30
        while seg.u16[entry] and time.monotonic() < deadline:  # it leaves the directory once it has its byte
            pass
        Bus(seg).wake(CPU, L.WAKE_IPI)
    os._exit(0)


def _spin(seg, control_value, wrapped: bool, **kw):
    """_spin_with_ack, in a forked child when ``wrapped`` (its signal handlers are its own)."""
    if wrapped:
        return in_forked_child(lambda: _spin_with_ack(seg, control_value, wrapped=True, **kw))
    return _spin_with_ack(seg, control_value, **kw)


def _resume_tags(seg) -> list:
    """The resume's tags, as hotpath.ack() takes them: three pages' first 16 bytes (page 2, 3 and 4
    past CPU 1's mwait_cpu_dead), written here."""
    mem, tags = seg.geo.mem_off, []
    for k in range(3):
        off = MD_OFF + (k + 2) * L.PAGE
        lo, hi = 0x1111_0000 + k, 0x2222_0000 + k
        struct.pack_into("<QQ", seg.buf, mem + off, lo, hi)
        tags.append((None, "text", (mem + off) // 8, lo, hi))
    return tags


WRAPPED = pytest.mark.parametrize("wrapped", [False, True], ids=["long-way", "fast-path"])


def _proc_state(pid: int) -> str:
    return stat_fields(pid)[0].decode()


def _spin_with_ack(seg, control_value, ipi_first=False, irq_first=None, checks=(), wrapped=False, tag_first=None):
    """``irq_first``: how the spinner's handler of RT_IRQ is set (see
    test_an_interrupt_that_reached_a_spinning_cpu_before_its_kick_is_taken_first); ``checks``:
    the resume's tags, as hotpath.ack() takes them; ``wrapped``: the Waiter's handlers of the
    interrupt signals installed in front of Python's, as a CPU process has them (then its spin
    makes the resume's checks in every round and answers a kick at once: the fast path; unwrapped,
    every kick goes the long way). Wrapped, in a forked child (in_forked_child): its handlers are
    that process's."""
    seg.set_hdr("hot_path", L.HotPath.C)
    ctx = multiprocess.get_context("fork")
    out, waiting = ctx.SimpleQueue(), ctx.Event()
    p = ctx.Process(target=_writer, args=(seg, control_value, out, waiting, ipi_first, bool(irq_first), tag_first))
    p.start()
    try:
        if irq_first or wrapped:
            w = hotpath.waiter(seg, CPU, {IRQ, RT_IRQ}, DOORBELL_SIGNAL)
            raise_irq = _raising_irq_byte(seg)
            signal.signal(RT_IRQ, raise_irq)  # as smpd.machine.core's, then the Waiter's in front
            signal.signal(IRQ, raise_irq)
            assert w.install_signal_handlers() is True
            if irq_first == "replaced":  # a signal.signal() after the wrap (none with ``wrapped`` alone)
                signal.signal(RT_IRQ, raise_irq)
        else:
            w = _waiter(seg)
        ack = hotpath.ack(seg, CPU, L.PHYS_BASE + MD_OFF, list(checks))
        waiting.set()
        r = w.wait(-1, 0, ack)
    finally:
        p.join(30)
    return r, out.get()


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("handler", ["wrapped", "replaced"])
def test_an_interrupt_that_reached_a_spinning_cpu_before_its_kick_is_taken_first(seg, handler):
    """An interrupt signal delivered to the spinning CPU just before it sees the kick on its control
    word has only tripped Python's C handler; the CPU runs the handler (its byte raised) before it
    answers, so the interrupt is taken first, in MWAIT, on the Python path, and no status is stored.
    The compiled Waiter asks the interpreter only when its own C handler, in front of Python's, says
    a signal came; a handler replaced since (``replaced``: a signal.signal() after the wrap) makes
    it ask every time. In a forked child: the signal must reach the spinning thread, not an
    xdist worker's own."""
    (code, _arg, seen), during = in_forked_child(
        lambda: _spin_with_ack(seg, L.CPUDEAD_MWAIT_KEXEC_HLT, irq_first=handler))
    assert during["status"] == 0 and during["armed"] == CPU + 1, during
    assert (code, seen) == (hotpath.WOKE, 0)
    assert _wake_word(seg) & (1 << 8 * L.WAKE_IRQ)
    assert seg.cb(CPU, "wake_write") == 0


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@WRAPPED
def test_a_spinning_cpu_answers_a_kick_it_sees_on_its_control_word_and_takes_the_write_byte_after(seg, wrapped):
    """MWAIT watches its line: a spinning CPU acknowledges the kick as soon as control changes to
    CPUDEAD_MWAIT_KEXEC_HLT, before the bus's WRITE byte (a second cache line) reaches it; then it
    waits, still in the directory, for that byte and consumes it, so HLT finds no stale write."""
    (code, _arg, seen), during = _spin(seg, L.CPUDEAD_MWAIT_KEXEC_HLT, wrapped)
    assert during == {"status": L.CPUDEAD_MWAIT_KEXEC_HLT, "wake": 0, "armed": CPU + 1, "watching": 1}, during
    assert seg.cb(CPU, "mon_watch") == 0  # no longer, in HLT
    assert code == hotpath.WOKE and seen > 0  # HLT, ended by the IPI
    assert _wake_word(seg) == 1 << (8 * L.WAKE_IPI)  # the WRITE byte was taken, the IPI is the caller's
    assert seg.u16[seg.geo.dir_off // L.DIR_ENTRY + MD_OFF // L.LINE] == 0
    assert seg.cb(CPU, "wake_write") == 1 and seg.cb(CPU, "state") == L.ExecState.HLT


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("overwritten", [None, 0, 1, 2, "hi"])
@WRAPPED
def test_a_spinning_cpu_answers_only_when_the_resume_finds_every_tag(seg, overwritten, wrapped):
    """The resume's tags (the old kernel's page tables, text and stack) are checked after the
    wake-up: all found, the compiled path answers; any one overwritten (its low word, or ``hi``:
    the last one's high word), it leaves the wake-up to the Python path, whose resume then fails
    as the kernel's would, and stores no status."""
    mem, tags = seg.geo.mem_off, _resume_tags(seg)
    if overwritten == "hi":
        struct.pack_into("<Q", seg.buf, mem + MD_OFF + 4 * L.PAGE + 8, 0xDEAD)
    elif overwritten is not None:
        struct.pack_into("<Q", seg.buf, mem + MD_OFF + (overwritten + 2) * L.PAGE, 0xDEAD)
    (code, _arg, seen), during = _spin(seg, L.CPUDEAD_MWAIT_KEXEC_HLT, wrapped, checks=tags)
    if overwritten is None:
        assert during["status"] == L.CPUDEAD_MWAIT_KEXEC_HLT and code == hotpath.WOKE and seen > 0, during
        return
    assert during["status"] == 0 and during["armed"] == CPU + 1, during
    assert (code, seen) == (hotpath.WOKE, 0)
    assert _wake_word(seg) & 0xFF == 1  # the WRITE byte, left for the caller
    assert seg.cb(CPU, "wake_write") == 0


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@WRAPPED
def test_a_control_word_changed_to_anything_else_waits_for_the_write_byte_and_goes_to_python(seg, wrapped):
    """A write that is not the kick (the kexec copy's bytes, say) is not answered in C: the CPU
    returns on the bus's WRITE byte, for the Python path to run mwait_play_dead()'s resume."""
    (code, _arg, seen), during = _spin(seg, 0x12345678, wrapped)
    assert during["status"] == 0 and during["wake"] == 0 and during["armed"] == CPU + 1, during
    assert (code, seen) == (hotpath.WOKE, 0)
    assert _wake_word(seg) & 0xFF == 1  # the WRITE byte, left for the caller
    assert seg.cb(CPU, "wake_write") == 0


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("attempt", range(8))
@WRAPPED
def test_a_kick_that_comes_with_an_ipi_is_not_answered_in_c(seg, attempt, wrapped):
    """The CPU looks for an interrupt or IPI that came with the kick before it answers (the kernel
    takes it first, in MWAIT): with the IPI's byte raised with the kick's store, the compiled path
    leaves both to the Python path and stores no status, whichever of the two it saw first (the
    attempts stop the spinner at random points of its loop; most see control change first)."""
    (code, _arg, seen), during = _spin(seg, L.CPUDEAD_MWAIT_KEXEC_HLT, wrapped, ipi_first=True)
    assert during["status"] == 0 and during["armed"] == CPU + 1, during
    assert (code, seen) == (hotpath.WOKE, 0)
    assert _wake_word(seg) & (1 << 8 * L.WAKE_IPI)
    assert seg.cb(CPU, "wake_write") == 0


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("attempt", range(8))
@WRAPPED
def test_a_tag_overwritten_just_before_the_kick_is_found_wherever_the_spinner_was(seg, attempt, wrapped):
    """The spin makes the resume's checks in every round, right after its load of control: what they
    read then is at least as new as every write before the one control shows. With the spinner
    stopped at a random point of its loop, a tag overwritten and then control written, it must find
    the tag gone and leave the kick to the Python path (a spin that made its checks before its load
    of control, and stopped between the two, would answer with the old kernel's page gone)."""
    mem, tags = seg.geo.mem_off, _resume_tags(seg)
    (code, _arg, seen), during = _spin(seg, L.CPUDEAD_MWAIT_KEXEC_HLT, wrapped, checks=tags,
                                       tag_first=mem + MD_OFF + 3 * L.PAGE)
    assert during["status"] == 0 and during["armed"] == CPU + 1, during
    assert (code, seen) == (hotpath.WOKE, 0)
    assert seg.cb(CPU, "wake_write") == 0


def _kick_a_sleeper(seg, bus, cpu_pid: int, irq_first: bool):
    """What the kicker of ``_sleeping_cpu_kicked`` does once CPU 1 (its child) sleeps in
    sigtimedwait(): either kick it (kick_one, a budget no loaded host misses) and, once it is in
    HLT, end that with an IPI; or, ``irq_first``, send it an interrupt signal and then the kick's
    write (its doorbell), both meant to be pending when it runs again: it shares this host core,
    in SCHED_IDLE, so neither wake-up preempts the kicker. sigtimedwait() then returns the
    doorbell (the lower number) with the interrupt pending."""
    entry = seg.geo.dir_off // L.DIR_ENTRY + MD_OFF // L.LINE
    wait_until(lambda: asleep_in_sigwait(cpu_pid), 30)  # past its last look at the bytes
    if irq_first:
        os.kill(cpu_pid, RT_IRQ)
        bus.write(L.PHYS_BASE + MD_OFF, L.CPUDEAD_MWAIT_KEXEC_HLT.to_bytes(4, "little"))
        return None
    acked = bus.kicker.kick_one(MD_OFF, L.CPUDEAD_MWAIT_KEXEC_HLT, 5000, 1_000_000)[0]
    wait_until(lambda: not seg.u16[entry], 30)  # HLT: out of the directory
    bus.wake(CPU, L.WAKE_IPI)
    return acked


def _sleeping_cpu(seg, lone: bool, kicker: int, out: int):
    """CPU 1 as a compiled CPU process (``lone`` as given), the kicker's child: asleep in MWAIT
    with the kick to answer (60 s at most), its interrupt handler raising the IRQ byte as
    smpd.machine.core's does. What its wait returned goes to ``out``."""
    answer = ("died", None)
    try:
        die_with_parent(kicker)
        seg.set_cb(CPU, "pid", os.getpid())  # the doorbell rings this process
        w = hotpath.waiter(seg, CPU, {IRQ, RT_IRQ}, DOORBELL_SIGNAL)
        ack = hotpath.ack(seg, CPU, L.PHYS_BASE + MD_OFF, [])
        w.lone = lone
        signal.signal(RT_IRQ, _raising_irq_byte(seg))
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # its wake-ups never preempt the kicker
        answer = ("ok", w.wait(0, _no_doorbell_deadline(), ack))  # a kicker that never rings: TIMEOUT
    except BaseException as err:  # noqa: B036 - whatever happened, said to the test
        answer = ("raised", repr(err))
    finally:
        try:
            os.write(out, pickle.dumps(answer))
        finally:
            os._exit(0)


def _sleeping_cpu_kicked(seg, lone: bool, irq_first: bool):
    """A forked kicker (the doorbell's sender, as the coordinator is) and its child, CPU 1
    (``_sleeping_cpu``), on one host core; the kicker does ``_kick_a_sleeper``. The CPU is the
    kicker's child, so that the kicker may read its /proc/PID/syscall where Yama allows that
    only of descendants. What the wait returned, what the kicker saw, and status after."""
    def steps(seg):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the CPU inherits it
        bus, me = Bus(seg), os.getpid()
        r, w = os.pipe()
        cpu = os.fork()
        if cpu == 0:
            os.close(r)
            _sleeping_cpu(seg, lone, me, w)
        os.close(w)
        try:
            acked = _kick_a_sleeper(seg, bus, cpu, irq_first)
        except BaseException:
            bus.wake(CPU, L.WAKE_IPI)  # end the CPU's wait: the test fails, it does not hang
            raise
        finally:
            with os.fdopen(r, "rb") as f:
                how, waited = pickle.loads(f.read() or pickle.dumps(("died", None)))
            os.waitpid(cpu, 0)
        assert how == "ok", (how, waited)
        return waited, acked

    seg.set_hdr("hot_path", L.HotPath.C)
    (code, arg, seen), acked = _as_a_cpu_process(seg, steps)
    status = seg.u32[(seg.geo.mem_off + MD_OFF) // 4 + 1]
    return code, arg, seen, acked, status


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("lone", [False, True], ids=["threads", "lone"])
def test_a_sleeping_cpu_answers_its_kick_and_sleeps_on_in_hlt(seg, lone):
    """Woken by its doorbell, the compiled CPU answers the kick and goes on in HLT, whether it does so
    still asleep to the interpreter (``lone``: a CPU process, one thread) or back in it: the same
    answer, the same stores."""
    code, _arg, seen, acked, status = _sleeping_cpu_kicked(seg, lone, irq_first=False)
    assert acked and status == L.CPUDEAD_MWAIT_KEXEC_HLT
    assert code == hotpath.WOKE and seen > 0  # HLT, ended by the IPI, after the kick answered at `seen`
    assert seg.cb(CPU, "state") == L.ExecState.HLT and seg.cb(CPU, "wake_write") == 1
    assert _wake_word(seg) == 1 << (8 * L.WAKE_IPI)  # the WRITE byte taken, the IPI the caller's


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("threads", [1, 2])
def test_a_compiled_waiter_asks_the_kernel_at_its_first_wait_whether_its_thread_is_alone(seg, threads):
    """A CPU's Waiter is built in the template, before the fork: whether its thread is its process's
    only one (``lone``), which its sleep's answer to a kick needs, it asks in the process that
    waits, at its first wait; one set before that is kept. The Python peer answers no kick in its
    sleep, and says False."""
    def child():
        stop = threading.Event()
        others = [threading.Thread(target=stop.wait) for _ in range(threads - 1)]
        for t in others:
            t.start()
        try:
            w, told = _waiter(seg), _waiter(seg)
            before = w.lone
            told.lone = True
            for waiter in (w, told):
                assert _code(waiter.wait(0, time.monotonic_ns() + 1_000_000, None)) == (hotpath.TIMEOUT, 0, 0)
            return before, w.lone, told.lone
        finally:
            stop.set()

    compiled = seg.hdr("hot_path") == L.HotPath.C
    assert in_forked_child(child) == ((None, threads == 1, True) if compiled else (False, False, True))


def test_an_interrupt_that_comes_before_its_cpu_owns_the_process_s_signals_waits_for_it(seg):
    """The template installs every CPU process's interrupt handlers before it forks, the signals
    blocked (core.install_interrupt_handlers): one that reaches a CPU process before its CPU owns
    them (own_interrupt_signals) is neither lost nor fatal; it waits, pending, and is that CPU's
    interrupt once owned. The mask is then the CPU's: the doorbell alone blocked."""
    def child():
        core.install_interrupt_handlers({"nmi": IRQ})
        me = core.CpuCore(seg, Bus(seg), CPU, {"nmi": IRQ})
        os.kill(os.getpid(), IRQ)
        before = (IRQ in signal.sigpending(), me.pending["nmi"], seg.wake_mask(CPU))
        me.own_interrupt_signals()
        return before, me.pending["nmi"], seg.wake_mask(CPU), signal.pthread_sigmask(signal.SIG_BLOCK, [])

    before, taken, mask, blocked = in_forked_child(child)
    assert before == (True, 0, 0)
    assert taken == 1 and mask == 1 << (8 * L.WAKE_IRQ)
    assert blocked == {DOORBELL_SIGNAL}


def test_a_first_wait_made_by_the_fork_loop_ends_as_the_same_wait_made_in_python(seg):
    """A compiled CPU process's first wait is made by the fork loop, as calls into C
    (CpuCore.first_wait_calls), and wait(came=) goes on from what it returned: the same mask, the
    same stores, as the wait made whole in Python. Where the wait draws spurious wake-ups, or on
    the Python hot path (no compiled taker), there are no such calls."""
    def one(by_calls: bool):
        core.install_interrupt_handlers({"nmi": IRQ})
        me = core.CpuCore(seg, Bus(seg), CPU, {"nmi": IRQ})
        seg.buf[me.wake_off + L.WAKE_IPI] = 1  # a wake-up with no message: back to the caller
        if by_calls:
            returned = [call() for call in me.first_wait_calls(True, None)][-1]
            mask = me.wait(init=True, came=returned)
        else:
            me.own_interrupt_signals()
            mask = me.wait(init=True)
        return (mask, seg.wake_mask(CPU), seg.cb(CPU, "busy"), seg.cb(CPU, "activity"),
                signal.pthread_sigmask(signal.SIG_BLOCK, []), core._this is me)

    if seg.hdr("hot_path") == L.HotPath.PYTHON:
        assert in_forked_child(lambda: core.CpuCore(seg, Bus(seg), CPU, {"nmi": IRQ}).first_wait_calls(True, None)) is None
        return
    made = in_forked_child(lambda: one(False))
    for field in ("wake", "busy", "activity"):
        seg.set_cb(CPU, field, 0)
    assert in_forked_child(lambda: one(True)) == made
    assert made[0] == 1 << (8 * L.WAKE_IPI) and made[-1]
    seg.set_hdr("spurious_per_s", 5)
    assert in_forked_child(lambda: core.CpuCore(seg, Bus(seg), CPU, {"nmi": IRQ}).first_wait_calls(True, None)) is None


def _rearm(seg) -> None:
    """CPU 1 back as the fixture left it: parked, its line monitored, nothing raised."""
    md = (seg.geo.mem_off + MD_OFF) // 4
    seg.u32[md] = seg.u32[md + 1] = 0
    for field in ("wake", "mon_write", "sleeping", "state", "wake_write"):
        seg.set_cb(CPU, field, 0)
    seg.u16[seg.geo.dir_off // L.DIR_ENTRY + MD_OFF // L.LINE] = CPU + 1


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
@pytest.mark.parametrize("lone", [False, True], ids=["threads", "lone"])
def test_an_interrupt_pending_with_a_sleeping_cpu_s_kick_is_taken_first(seg, lone):
    """An interrupt whose signal reached the sleeping CPU before its kick is taken first, in MWAIT, on
    the Python path, even where the doorbell (a lower signal number) ends the sleep with the
    interrupt pending: the CPU does not answer, and returns with the interrupt's byte raised and the
    write's left. The scheduler may still run the CPU between the two signals (a third process takes
    the kicker's core): then sigtimedwait() returns the interrupt alone, which says nothing here, and
    the attempt is made again. A CPU that answers, in any attempt, fails the test."""
    both = _wake_word(seg) | (1 << (8 * L.WAKE_IRQ)) | (1 << (8 * L.WAKE_WRITE))
    outcomes = []
    for _attempt in range(10):
        code, arg, seen, acked, status = _sleeping_cpu_kicked(seg, lone, irq_first=True)
        assert acked is None and status == 0, "answered with an interrupt pending"
        outcomes.append((code, arg, seen, _wake_word(seg)))
        if code == hotpath.WOKE:
            assert (seen, _wake_word(seg)) == (0, both)
            return
        assert (code, arg) == (hotpath.SIGNAL, RT_IRQ), outcomes  # the interrupt alone, first
        _rearm(seg)
    pytest.fail(f"the two signals were never pending together in 10 attempts: {outcomes}")


def test_a_forged_owner_or_pid_in_the_segment_wakes_nobody_and_raises_nothing(seg):
    """A same-uid writer of the segment can store any u16 owner and any u32 pid. An owner beyond
    the machine's CPUs names no CPU; a pid above pid_t's range (-1 or a process group once cast)
    is rung by no one: in the bus's writes and in the kick loop alike."""
    bus = Bus(seg)
    entry = seg.geo.dir_off // L.DIR_ENTRY + MD_OFF // L.LINE
    seg.u16[entry] = seg.geo.ncpus + 1
    assert bus.write_u32(L.PHYS_BASE + MD_OFF, 1) == 0
    assert bus.write(L.PHYS_BASE + MD_OFF - L.LINE, bytes(2 * L.LINE)) == 0  # two lines, one forged owner
    assert _wake_word(seg) == 0
    seg.u16[entry] = CPU + 1
    seg.set_cb(CPU, "sleeping", 1)
    for pid in (2**31, 2**32 - 1):
        seg.set_cb(CPU, "pid", pid)
        assert bus.write_u32(L.PHYS_BASE + MD_OFF, 2) == 1  # its byte is raised; no doorbell
        assert _wake_word(seg) == 1 << (8 * L.WAKE_WRITE)
        seg.set_cb(CPU, "mon_write", 0)
        assert _kick(seg, 2)[:2] == (False, 2)


def test_kick_each_skips_the_cpus_not_waiting_and_stops_after_one_that_does_not_answer(seg):
    """smp_kick_mwait_play_dead()'s loop over CPUs in the hot path: a CPU whose status is not
    CPUDEAD_MWAIT_WAIT at its turn is skipped (None); the first that does not answer ends the
    list, for the caller to report before it goes on."""
    u32, base = seg.u32, seg.geo.mem_off // 4
    md = [MD_OFF, MD_OFF + L.LINE, MD_OFF + 2 * L.LINE, MD_OFF + 3 * L.LINE]
    u32[base + md[0] // 4 + 1] = 0  # not in mwait_play_dead()
    u32[base + md[1] // 4 + 1] = L.CPUDEAD_MWAIT_WAIT  # waits, and nobody answers
    u32[base + md[2] // 4 + 1] = L.CPUDEAD_MWAIT_WAIT
    done = Bus(seg).kicker.kick_each(md, L.CPUDEAD_MWAIT_KEXEC_HLT, L.CPUDEAD_MWAIT_WAIT, 5000, 2)
    assert len(done) == 2 and done[0] is None and done[1][:2] == (False, 2)
    assert u32[base + md[1] // 4] == L.CPUDEAD_MWAIT_KEXEC_HLT and u32[base + md[2] // 4] == 0  # not reached
    u32[base + md[1] // 4 + 1] = L.CPUDEAD_MWAIT_KEXEC_HLT  # it answered in the meantime
    done = Bus(seg).kicker.kick_each(md[1:], L.CPUDEAD_MWAIT_KEXEC_HLT, L.CPUDEAD_MWAIT_WAIT, 5000, 2)
    assert done[0] is None and done[1][:2] == (False, 2)
    with pytest.raises(ValueError, match="outside emulated memory"):
        Bus(seg).kicker.kick_each([MD_OFF, -4], L.CPUDEAD_MWAIT_KEXEC_HLT, L.CPUDEAD_MWAIT_WAIT, 5000, 1)


def test_a_kick_outside_emulated_memory_is_refused(seg):
    for md in (seg.geo.npages * L.PAGE, 2**63 - 4):  # past the end; so far past that md + 8 wraps
        with pytest.raises(ValueError, match="outside emulated memory"):
            Bus(seg).kicker.kick_one(md, L.CPUDEAD_MWAIT_KEXEC_HLT, 5000, 1)


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
def test_the_compiled_hot_path_is_given_the_layout_sizes_and_refuses_others(seg):
    """_hotpath.c takes the line, directory-entry and event sizes from smpd.machine.layout, and
    says which sizes it implements rather than writing a layout it does not know."""
    from smpd.machine import _hotpath

    geo = seg.geo
    args = dict(mem_off=geo.mem_off, mem_len=geo.npages * L.PAGE, dir_off=geo.dir_off, cb_off=L.CB_OFF,
                cb_size=L.CB_SIZE, cb_write=L.CB["mon_write"][0], cb_sleeping=L.CB["sleeping"][0],
                cb_pid=L.CB["pid"][0], cb_watch=L.CB["mon_watch"][0], ncpus=geo.ncpus, doorbell=DOORBELL_SIGNAL,
                line=L.LINE, dir_entry=L.DIR_ENTRY)
    _hotpath.Kicker(seg.buf, **args)
    with pytest.raises(ValueError, match="2-byte"):
        _hotpath.Kicker(seg.buf, **{**args, "dir_entry": 4})
    with pytest.raises(ValueError, match="power of two"):
        _hotpath.Kicker(seg.buf, **{**args, "line": 48})
    for field, off in (("cb_write", L.CB_SIZE), ("cb_sleeping", L.CB_SIZE - 2), ("cb_pid", 2), ("cb_pid", -4),
                       ("cb_watch", 2), ("cb_watch", L.CB_SIZE)):
        with pytest.raises(ValueError, match="does not fit"):
            _hotpath.Kicker(seg.buf, **{**args, field: off})
    with pytest.raises(ValueError, match="whole number of 64-byte lines"):
        _hotpath.Kicker(seg.buf, **{**args, "mem_len": geo.npages * L.PAGE - 8})
    # Offsets whose sums would overflow (and so wrap below the segment's length) do not fit either.
    for field, off in (("mem_off", 2**63 - 64), ("cb_off", 2**63 - L.CB_SIZE), ("ncpus", 2**62)):
        with pytest.raises(ValueError, match="does not fit"):
            _hotpath.Kicker(seg.buf, **{**args, field: off})
    with pytest.raises(ValueError, match="not an aligned 4-byte field"):
        _hotpath.Waiter(seg.buf, wake=2**63 - 4, write=8192, sleeping=8196, watch=8200, irq_signals=[],
                        doorbell=DOORBELL_SIGNAL)
    # A buffer that shrinks after the checks (an mmap resized) is refused at the kick, not read past.
    m = mmap.mmap(-1, len(seg.buf))
    k, w = _hotpath.Kicker(m, **args), _hotpath.Waiter(m, wake=4096, write=8192, sleeping=8196, watch=8200, irq_signals=[],
                                                      doorbell=DOORBELL_SIGNAL)
    m.resize(4096)
    with pytest.raises(ValueError, match="needed"):
        k.kick_one(MD_OFF, L.CPUDEAD_MWAIT_KEXEC_HLT, 5000, 1)
    with pytest.raises(ValueError, match="needed"):
        w.wait(0, 1, None)
    del k, w
    m.close()
    seg.set_hdr("hot_path", L.HotPath.C)
    good = hotpath.ack(seg, CPU, L.PHYS_BASE + MD_OFF, [])
    assert good is not None
    with pytest.raises(ValueError, match="16-byte events"):
        _hotpath.Ack(**{**_ack_kwargs(seg), "ev_entry": 8})


def _kwargs_of(name: str, call) -> dict:
    """The arguments smpd.machine.hotpath gives _hotpath.<name> in ``call``, recorded."""
    seen = {}

    class Recorder:
        def __init__(self, **kw):
            seen.update(kw)

    real = getattr(hotpath._hotpath, name)
    setattr(hotpath._hotpath, name, Recorder)
    try:
        call()
    finally:
        setattr(hotpath._hotpath, name, real)
    return seen


def _ack_kwargs(seg):
    """hotpath.ack()'s arguments for CPU 1."""
    return _kwargs_of("Ack", lambda: hotpath.ack(seg, CPU, L.PHYS_BASE + MD_OFF, []))


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
def test_the_compiled_init_and_ack_refuse_offsets_past_any_buffer(seg):
    """An offset so large that the bytes a wait needs would overflow is refused when the Init or Ack
    is made (it had wrapped, and a wait then stored outside the segment); taken_ns is the C
    side's to write."""
    from smpd.machine import _hotpath

    seg.set_hdr("hot_path", L.HotPath.C)
    kw = _kwargs_of("Init", lambda: hotpath.init_taker(seg, CPU, Bus(seg), 0, {}))
    _hotpath.Init(**kw)
    for field, off in (("mbox_seq", 2**63 - 4), ("ev_ring", 2**63 - 8)):
        with pytest.raises(ValueError, match="too large"):
            _hotpath.Init(**{**kw, field: off})
    with pytest.raises(ValueError, match="too large"):
        _hotpath.Ack(**{**_ack_kwargs(seg), "control": 2**63 - 4})
    init = hotpath.init_taker(seg, CPU, Bus(seg), 0, {})
    with pytest.raises(AttributeError):
        init.taken_ns = 1


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
def test_the_compiled_waiter_refuses_a_second_wait_while_one_sleeps(seg):
    """It releases the GIL while it sleeps; a second thread's wait() on it is refused, not run
    over the first one's view of the segment."""
    seg.set_hdr("hot_path", L.HotPath.C)

    def sleeper(seg):
        w = _waiter(seg)
        second = {}

        def other():
            try:
                w.wait(0, time.monotonic_ns() + 10**9, None)
            except RuntimeError as err:
                second["error"] = str(err)
            Bus(seg).wake(CPU, L.WAKE_IPI)  # then end the first one's sleep

        t = _when_asleep(seg, other)
        r = w.wait(0, _no_doorbell_deadline(), None)
        t.join()
        return _code(r), second

    code, second = _as_a_cpu_process(seg, sleeper)
    assert code == (hotpath.WOKE, 0, 0)
    assert "already waiting in another thread" in second.get("error", ""), second


def test_a_control_block_word_is_never_seen_half_written(seg):
    """Another process writes a field over and over, 0xFFFF... and 1 by turns, while this one reads
    it: each read is one of the two, never 0 or a mix. A struct packs a value byte by byte after
    zeroing them, which a reader caught in the middle (a CPU reading mbox_seq, `smpd status`
    reading state) saw 21% of the time (smpd.machine.segment)."""
    ctx = multiprocess.get_context("fork")
    stop = ctx.Event()
    values = {"mbox_seq": (0xFFFFFFFF, 1), "kick_seen_ns": (0xFFFFFFFFFFFFFFFF, 1)}

    def writer():
        while not stop.is_set():
            for _ in range(1000):
                for field, (a, b) in values.items():
                    seg.set_cb(CPU, field, a)
                    seg.set_cb(CPU, field, b)

    for field, (a, _) in values.items():
        seg.set_cb(CPU, field, a)
    p = ctx.Process(target=writer, daemon=True)
    p.start()
    try:
        seen = {field: set() for field in values}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for field in values:
                for _ in range(1000):
                    seen[field].add(seg.cb(CPU, field))
    finally:
        stop.set()
        p.join(10)
    assert p.exitcode == 0
    for field, (a, b) in values.items():
        assert seen[field] <= {a, b}, f"{field} read as {sorted(seen[field] - {a, b})[:5]}"


def test_the_wake_path_profile_runs_each_step_and_leaves_no_segment():
    """bench/profile_wake.py drives the Python wake-up path by hand, on a segment of its own. It
    stopped running once, unnoticed, when the kernel package moved under it; a few rounds here."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "profile_wake.py"), "--rounds", "50"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for step in ("monitor", "kick bus write", "wait (consume)", "resume page checks", "control+ack",
                 "woken CPU to ack"):
        assert step in r.stdout, r.stdout
    assert not [f for f in os.listdir("/dev/shm") if "profile-wake" in f]


@pytest.mark.skipif(hotpath.WHY_NOT is not None, reason=f"no compiled hot path: {hotpath.WHY_NOT}")
def test_an_init_learns_only_a_whole_generation_entry_and_a_mwait_cpu_dead_inside_one_line_of_memory(seg):
    """An Init refuses a CPU its bus cannot name; Init.learn (what take_init may start the CPU in)
    refuses an entry of another size, an mwait_cpu_dead outside emulated memory or across a line
    (a wait would store there), and an ack that is not an Ack, and anything while a wait uses the
    Init; Init.holds (a dead CPU's held count) a signal that is none, or an offset a u32 cannot
    sit at."""
    from smpd.machine import _hotpath

    seg.set_hdr("hot_path", L.HotPath.C)
    kw = _kwargs_of("Init", lambda: hotpath.init_taker(seg, CPU, Bus(seg), 0, {}))
    with pytest.raises(ValueError, match="not one of"):  # its directory entry would name nobody
        _hotpath.Init(**{**kw, "cpu": seg.geo.ncpus})
    init = hotpath.init_taker(seg, CPU, Bus(seg), 0, {})
    entry = bytes(L.GEN_ENTRY.size)
    mem = seg.geo.npages * L.PAGE
    init.learn(entry, MD_OFF, None)
    for bad in ((entry[:-4], MD_OFF, None), (entry, mem - 4, None), (entry, -8, None), (entry, 2**63 - 8, None),
                (entry, L.LINE - 4, None), (entry, MD_OFF + 2, None), (entry, MD_OFF, object())):
        with pytest.raises(ValueError):
            init.learn(*bad)
    with pytest.raises(AttributeError):
        init.taken_state = 1
    assert init.taken_ack is None
    for bad in ((0, 0), (signal.NSIG, 0), (signal.SIGUSR1, 2**63 - 4), (signal.SIGUSR1, 2)):  # where a hold stores
        with pytest.raises(ValueError):
            init.holds(*bad)
    waiter = hotpath.waiter(seg, CPU, set(), DOORBELL_SIGNAL)
    sleeper = threading.Thread(target=waiter.wait, args=(0, time.monotonic_ns() + 2_000_000_000, None, init))
    sleeper.start()
    try:
        wait_until(lambda: seg.cb(CPU, "sleeping") == 1, what="the wait asleep")
        with pytest.raises(ValueError, match="no wait is using"):
            init.learn(entry, MD_OFF, None)
    finally:
        sleeper.join()
    init.learn(entry, MD_OFF, None)
