"""`python scripts/sft.py ARGS ...` is `jaxrlhf sft ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
