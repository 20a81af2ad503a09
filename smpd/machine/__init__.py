"""The emulated hardware: one POSIX shared-memory segment and what touches it.

The segment's geometry and words (``layout``), creating and attaching it (``segment``),
the memory fence (``sync``), the one write path that makes MONITOR/MWAIT real (``bus``),
per-CPU event rings (``events``), the IPI mailboxes' coordinator half (``mailbox``),
a CPU's hardware side (``core``: wait, timers,
MONITOR/MWAIT, IPIs taken) and the hot path with its choice (``hotpath``): the
compiled ``_hotpath.c`` and its Python peer ``pyhotpath``, the same two objects with
the same codes, tested against each other. Nothing here knows what a kernel is. It may import
smpd.host and below.
"""
