"""`python scripts/frontier.py ARGS ...` is `jaxrlhf frontier ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["frontier", *sys.argv[1:]]))
