from secretsd.cli import main

main()
