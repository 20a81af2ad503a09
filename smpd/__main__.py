from smpd.cli import main

main()
