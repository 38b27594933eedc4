"""`python scripts/pipeline.py ARGS ...` is `jaxrlhf pipeline ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
