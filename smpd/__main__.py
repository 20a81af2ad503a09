from smpd.cli import main

main(prog_name="smpd")
