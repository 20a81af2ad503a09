"""smpd: an x86 SMP machine emulated with real OS processes over real shared memory.

CPU 0 is the coordinator (boot CPU and kexec CPU); CPUs 1..N-1 are OS processes
that run the emulated kernel's offline path, ``mwait_play_dead()``, against
monitored cache lines of one POSIX shared-memory segment.
"""

__version__ = "0.1.0"
