"""What runs on the machine: the Linux kernel's side of the story (DESIGN §1, §4, §5).

The kernel image and its memory (``image``), what a CPU executes when it resumes in
memory kexec may have overwritten (``resume``), a CPU process's kernel states with the
kernel's own names (``cpu``: ``smp_callin``, ``play_dead``, ``mwait_play_dead``,
``stop_this_cpu``), ``smp_kick_mwait_play_dead()`` (``kick``), the kexec sequence and its
outcome (``kexec``), and a kexec's scenario (``scenario``). It may import smpd.machine
and below.
"""
