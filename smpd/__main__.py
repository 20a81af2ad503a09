from smpd.tools.cli import main

main(prog_name="smpd")
