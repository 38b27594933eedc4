"""Run the online_dpo stage: `python scripts/online_dpo.py --config FILE [key=value ...]` (--help lists the keys)."""

import sys

from jaxrlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("online_dpo"))
