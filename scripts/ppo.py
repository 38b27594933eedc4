"""Run the ppo stage: `python scripts/ppo.py --config FILE [key=value ...]` (--help lists the keys)."""

import sys

from jaxrlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("ppo"))
