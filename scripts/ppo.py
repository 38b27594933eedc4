"""`python scripts/ppo.py ARGS ...` is `jaxrlhf ppo ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
