"""Export a stage's checkpoint to Hugging Face layout (config.json + model.safetensors +
tokenizer), loadable by `transformers` unchanged. It replaces only an earlier export (pass
--overwrite to replace anything else) and never the run folder it reads:

    python scripts/export.py runs/tiny/ppo exported/ppo-step30 [--step 30]
"""

import argparse
import sys
from pathlib import Path

from jaxrlhf.errors import JaxRLHFError
from jaxrlhf.stages.export import export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a stage's output_dir (holding config.json and checkpoints/)")
    parser.add_argument("out", type=Path, help="where to write the HF-layout folder")
    parser.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace `out` even if it holds something other than an earlier export")
    args = parser.parse_args(argv)
    try:
        print(f"exported to {export_run(args.run_dir, args.out, args.step, overwrite=args.overwrite)}")
    except JaxRLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
