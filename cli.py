"""Thin entry point: `python cli.py ...` is the same as the installed `oob` command."""
from oobspec.cli import main

if __name__ == "__main__":
    main()
