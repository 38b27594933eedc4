"""`python scripts/make_preferences.py ARGS ...` is `jaxrlhf preferences ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["preferences", *sys.argv[1:]]))
