"""Run the grpo stage: `python scripts/grpo.py --config FILE [key=value ...]` (--help lists the keys)."""

import sys

from jaxrlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("grpo"))
