from zsadcli.cli import main

main()
