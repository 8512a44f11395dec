from lors_convert.cli import main

main()
