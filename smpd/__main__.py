from smpd.tools.entry import main

main(prog_name="smpd")
