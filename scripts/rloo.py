"""Run the rloo stage: `python scripts/rloo.py --config FILE [key=value ...]` (--help lists the keys)."""

import sys

from jaxrlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("rloo"))
