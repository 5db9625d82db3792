from pipeline.cli.start import main

main()
