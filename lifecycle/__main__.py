"""`python -m lifecycle` runs the rkel command line."""

from lifecycle.cli import main

main()
