"""`python scripts/rloo.py ARGS ...` is `jaxrlhf rloo ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["rloo", *sys.argv[1:]]))
