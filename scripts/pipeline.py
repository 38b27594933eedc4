"""Run a whole pipeline file: `python scripts/pipeline.py [--config configs/tiny/pipeline.yaml]`.

The default is the offline, CPU-sized politeness task: data -> SFT -> reward model -> PPO,
preference pairs -> DPO and SLiC-HF, then an evaluation of all of them.
"""

import sys

from jaxrlhf.cli import pipeline_main

if __name__ == "__main__":
    sys.exit(pipeline_main())
