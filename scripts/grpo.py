"""`python scripts/grpo.py ARGS ...` is `jaxrlhf grpo ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["grpo", *sys.argv[1:]]))
