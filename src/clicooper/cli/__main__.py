from clicooper.cli.main import main

main()
