from btpo_cli.cli import main

main()
