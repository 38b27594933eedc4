"""Run the reward stage: `python scripts/train_reward.py --config FILE [key=value ...]` (--help lists the keys)."""

import sys

from jaxrlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("reward"))
