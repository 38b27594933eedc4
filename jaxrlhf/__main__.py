"""`python -m jaxrlhf COMMAND ...` is the `jaxrlhf` command (jaxrlhf/commands.py)."""

import sys

from jaxrlhf.commands import main

if __name__ == "__main__":
    sys.exit(main())
