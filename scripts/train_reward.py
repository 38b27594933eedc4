"""`python scripts/train_reward.py ARGS ...` is `jaxrlhf reward ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["reward", *sys.argv[1:]]))
