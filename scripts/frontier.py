"""The reward-KL frontier: `python scripts/frontier.py --config configs/tiny/frontier.yaml [key=value ...]`
(--help lists the keys). Rerun to continue: finished points are skipped (one whose recorded config, train.steps
included, differs from the one asked for is refused)."""

import sys

from jaxrlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("frontier"))
