from megaflow.cli import main

main()
