"""`python -m splitexit` runs the CLI."""

from splitexit.cli import main

main()
