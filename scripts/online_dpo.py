"""`python scripts/online_dpo.py ARGS ...` is `jaxrlhf online-dpo ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["online-dpo", *sys.argv[1:]]))
