"""`python scripts/dpo.py ARGS ...` is `jaxrlhf dpo ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
