"""Plan a training stage's memory per device before running it, from shapes alone:
`python scripts/memory_plan.py --config FILE [--model-config NAME|FILE] [--devices N] [key=value ...]`."""

import sys

from jaxrlhf.cli import memory_plan_main

if __name__ == "__main__":
    sys.exit(memory_plan_main())
