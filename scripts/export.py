"""`python scripts/export.py ARGS ...` is `jaxrlhf export ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
