"""The coordinator process (``python -P -m smpd.daemon``): CPU 0, the owner of a machine.

The supervisor, sole owner of the segment and the CPU processes (``supervisor``); the
requests it serves, behind one boundary (``handlers``), the kernel's among them in
``kernel_ops`` (kexec, chain, panic, kick, inject, reset, the kick benchmark); ``smpd status``'s snapshot
(``status``); the janitor and the stale-machine clean-up (``janitor``); how it is told
to stop (``stopping``); the authenticated channel its clients use (``channel``). It may
import smpd.config, smpd.kernel and below.
"""
