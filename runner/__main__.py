from runner.run import main

main()
