"""What users run: the ``smpd`` command and everything it drives from outside a machine.

The entry point (``entry``) and the CLI (``cli``), its tables (``render``), finding,
starting and stopping machines (``lifecycle``), the demo (``demo``), the kick benchmark
and the host's floor (``benchkick``, ``hwfloor``, ``hwfloor.c``), soak runs and their file
(``soakrun``, ``soak``) and host load (``hostload``). It may import everything below.
"""
