"""`python scripts/chat.py ARGS ...` is `jaxrlhf chat ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
