"""`python scripts/memory_plan.py ARGS ...` is `jaxrlhf memory-plan ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["memory-plan", *sys.argv[1:]]))
