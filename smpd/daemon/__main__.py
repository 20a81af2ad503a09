from smpd.daemon.supervisor import main

main()
