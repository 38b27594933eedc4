"""Finding a checkpoint (local folder or hub name) and reading its files: generation_config.json's
EOS ids, and the weights from safetensors (sharded or not) or, through torch's `weights_only`
loader, pickles."""

import json
import os
from pathlib import Path

import numpy as np

from jaxrlhf.errors import CheckpointError, ConfigError
from jaxrlhf.models.configs import token_ids

_SAFE_INDEX = "model.safetensors.index.json"
_TORCH_INDEX = "pytorch_model.bin.index.json"
_HUB_FILES = ["config.json", "*.safetensors", _SAFE_INDEX, "*.bin", _TORCH_INDEX, "*.json", "*.txt", "*.model"]


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub name resolved through huggingface_hub (so a
    populated cache works with `HF_HUB_OFFLINE=1`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{text} is a file; expected a checkpoint directory holding config.json")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not "org/name"
        raise CheckpointError(f"checkpoint directory {text} does not exist")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as e:  # the hub client raises many types; all mean "not found"
        raise CheckpointError(
            f"{text} is neither a local directory nor a model found on the Hugging Face hub "
            f"or in its local cache ({type(e).__name__}: {e})"
        ) from e


def json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, generation_config.json, adapter_config.json) that
    must hold an object; anything else is a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def generation_eos(directory: Path) -> dict:
    """`{"eos_token_id": ...}` from the checkpoint's generation_config.json when it sets one, else
    `{}`: transformers' `generate` stops on that file's ids (Llama 3's list several) and on
    config.json's only where the file is missing, so they override config.json's on load."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    eos = json_object(path).get("eos_token_id")
    try:
        token_ids(eos)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {} if eos is None else {"eos_token_id": eos}


def weight_files(directory: Path) -> list[Path]:
    for index, single in ((_SAFE_INDEX, "model.safetensors"), (_TORCH_INDEX, "pytorch_model.bin")):
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{directory / index} is not a valid shard index: {e}") from e
            files = [directory / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"shard {f} named in {directory / index} is missing")
            return files
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(
        f"{directory} holds no weights: expected model.safetensors, {_SAFE_INDEX}, pytorch_model.bin "
        f"or {_TORCH_INDEX} (found: {sorted(p.name for p in directory.iterdir())})"
    )


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            # The flax reader handles bfloat16, which numpy alone cannot represent.
            with safe_open(str(path), framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; install torch to read it (safely, with weights_only=True) "
            "or convert the checkpoint to safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(f"{path} could not be loaded with torch weights_only=True: {e}") from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
