"""`python scripts/evaluate.py ARGS ...` is `jaxrlhf evaluate ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
