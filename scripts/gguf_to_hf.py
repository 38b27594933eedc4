"""`python scripts/gguf_to_hf.py ARGS ...` is `jaxrlhf gguf-to-hf ARGS ...` (an alias kept for old commands)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main(["gguf-to-hf", *sys.argv[1:]]))
