from fedpriv.cli import main

main()
