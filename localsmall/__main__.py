"""`python -m localsmall` entry point."""

from localsmall.cli import main

main()
