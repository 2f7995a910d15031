from facesense.cli import main

main()
