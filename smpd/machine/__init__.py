"""The emulated hardware: one POSIX shared-memory segment and what touches it.

The segment's geometry and words (``layout``), creating and attaching it (``segment``),
the memory fence (``sync``), the one write path that makes MONITOR/MWAIT real (``bus``),
per-CPU event rings (``events``), and the compiled hot path with its choice
(``hotpath``, ``_hotpath.c``). Nothing here knows what a kernel is. It may import
smpd.host and below.
"""
