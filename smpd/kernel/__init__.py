"""What runs on the machine: the Linux kernel's side of the story (DESIGN §1, §4, §5).

Each generation's memory map (``memmap``, ``generations``), the kernel image's pages
(``image``), power-on and starting the APs (``boot``), what a CPU executes when it
resumes in memory kexec may have overwritten (``resume``) and after a wake-up or an
interrupt (``execute``), a CPU process's kernel states with the kernel's own names
(``cpu``: ``smp_callin``, ``play_dead``, ``mwait_play_dead``, ``stop_this_cpu``),
``smp_kick_mwait_play_dead()`` (``kick``), the kexec sequence (``kexec``) with the
copy and the new kernel's own writes (``relocate``) and what it reads back about each CPU
(``observe``), the outcome as a pure function
(``outcome``), the timeline (``timeline``) and a kexec's scenario (``scenario``). It may
import smpd.machine and below.
"""
