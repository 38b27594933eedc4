"""LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained` loads onto the transformers base model, and back.

An adapters tree mirrors the model's params: at the path of each adapted `Dense` it holds
`{"lora_a": [in, r], "lora_b": [r, out]}` (float32); the merged kernel is
`kernel + alpha / r * lora_a @ lora_b`. PEFT stores `lora_A.weight` `[r, in]` and `lora_B.weight`
`[out, r]` under `base_model.model.<HF module path>`, for torch `Linear` and GPT-2's `Conv1D`
alike (for Conv1D it transposes the product instead: `fan_in_fan_out`). Settings are a plain
dict `{"rank", "alpha", "dropout", "targets"}`, `targets` as PEFT spells them (module names,
matched as PEFT does: the whole HF module path or its last dotted parts) or "all-linear".

A sequence classifier (`bert`, `distilbert`: PEFT's SEQ_CLS task) trains its fresh head in full;
PEFT keeps such modules whole (`modules_to_save`, stored under their plain tensor names), and so
do `save_adapter(..., modules_to_save=)` and `load_modules_to_save`.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxrlhf import outputs
from jaxrlhf.errors import CheckpointError, ConfigError
from jaxrlhf.models.files import json_object, read_tensors
from jaxrlhf.models.hub import ARCHITECTURES, _candidates, _hf_key

Params = dict[str, Any]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TORCH_WEIGHTS = "adapter_model.bin"  # what PEFT writes with safe_serialization=False
_PREFIX = "base_model.model."  # PeftModel's name for the wrapped transformers model
TASK_TYPES = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS", "distilbert": "SEQ_CLS"}
ALL_LINEAR = "all-linear"
# PEFT options that change what an adapter computes, each with the value plain LoRA has.
_PLAIN = {"use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
          "lora_bias": False, "use_qalora": False, "layer_replication": None, "trainable_token_indices": None,
          "target_parameters": None, "alora_invocation_tokens": None, "use_bdlora": None}
# Initialisations that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA change
# them: their adapters fit only the changed base, unless PEFT converted them on saving).
_BASE_KEEPING_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _arch(family: str):
    if family not in TASK_TYPES:
        raise ConfigError(f"adapter family {family!r} is not supported; choose one of {sorted(TASK_TYPES)}")
    return ARCHITECTURES[family]


def _selects(targets: list[str] | str, name: str) -> bool:
    """PEFT's rule (`check_target_module_exists`): a string is a regex on the whole module path,
    a list entry names the path or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# ---------------------------------------------------------------------------------------------
# Out


def save_adapter(folder: str | os.PathLike, adapters: Params, settings: dict, family: str,
                 base_model: str | os.PathLike | None, modules_to_save: Params | None = None,
                 overwrite: bool = False, **record) -> Path:
    """Write `adapters` (trained with `settings`) as a PEFT LoRA adapter for `base_model` (the
    hub name or folder recorded as `base_model_name_or_path`). `modules_to_save`: a params-shaped
    tree of modules trained in full (a sequence classifier's head), saved whole as PEFT does.
    Written whole beside the target and swapped in, replacing only an earlier adapter (or
    anything with `overwrite`; see `jaxrlhf.outputs`); `record` goes into its marker file."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arch = _arch(family)
    rank, alpha, dropout, targets = _checked(settings)
    if isinstance(targets, str) and targets != ALL_LINEAR:  # PEFT's regex form is for reading only
        raise ConfigError(f"adapter settings: targets must be {ALL_LINEAR!r} or a list of module names, "
                          f"got {targets!r}")
    tensors, adapted = {}, []
    for path, pair in _modules(adapters).items():
        name = arch.module_names("/".join(path))
        shapes = {k: np.shape(v) for k, v in pair.items()}
        if set(pair) != {"lora_a", "lora_b"} or len(shapes["lora_a"]) != 2 or len(shapes["lora_b"]) != 2 \
                or shapes["lora_a"][1] != rank or shapes["lora_b"][0] != rank:
            raise ConfigError(f"adapters at {'/'.join(path)}: expected lora_a [in, {rank}] and lora_b [{rank}, out], "
                              f"got {shapes}")
        if targets != ALL_LINEAR and not _selects(targets, name):
            raise ConfigError(f"adapters at {'/'.join(path)} ({name}) are not among the targets {targets}; "
                              "PEFT would not apply them")
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            tensors[f"{_PREFIX}{name}.{theirs}.weight"] = np.ascontiguousarray(np.asarray(pair[ours], np.float32).T)
        adapted.append(name)
    if not adapted:
        raise ConfigError("save_adapter: the adapters tree holds no lora_a/lora_b pair")
    saved = set()
    for path, value in flatten_dict(modules_to_save or {}).items():
        key, transposed = _hf_key(arch, path)
        value = np.asarray(value, np.float32)
        tensors[_PREFIX + key] = np.ascontiguousarray(value.T if transposed else value)
        saved.add(key.rsplit(".", 1)[0])
    both = sorted(n for n in saved if n in adapted or (targets != ALL_LINEAR and _selects(targets, n)))
    if both:
        raise ConfigError(f"modules {both} are both LoRA targets and saved whole; PEFT allows one or the other")
    conv1d = {not arch.is_torch_linear(name) for name in adapted}
    if len(conv1d) > 1:  # PEFT has one fan_in_fan_out for the whole adapter
        raise ConfigError(f"adapters mix GPT-2 Conv1D and torch Linear modules ({sorted(adapted)}); PEFT cannot")
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[family], "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "fan_in_fan_out": conv1d.pop(), "inference_mode": True, "init_lora_weights": True,
        # "all-linear" as PEFT saves it: the modules it chose. PEFT's choice on loading could
        # differ from ours (it adapts BERT's pooler, say); the list cannot.
        "target_modules": sorted(adapted) if targets == ALL_LINEAR else list(targets),
        "modules_to_save": sorted(saved) or None,
        "base_model_name_or_path": None if base_model is None else str(base_model), "revision": None,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, **_PLAIN,
    }

    def build(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk, say: a write failure like any other
            raise OSError(f"{WEIGHTS_NAME}: {e}") from e

    return outputs.replace_folder(folder, "adapter", build, overwrite=overwrite, **record)


def _checked(settings: dict, keys=("rank", "alpha", "dropout", "targets"), where="adapter settings",
             error=ConfigError) -> tuple[int, float, float, list[str] | str]:
    """(rank, alpha, dropout, targets) read from `settings` under `keys` (PEFT's names in its
    config), each checked; `error` names `where`."""
    rank, alpha, dropout, targets = (settings.get(k) for k in keys)
    dropout = 0.0 if dropout is None else dropout
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise error(f"{where}: {keys[0]} must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise error(f"{where}: {keys[1]} must be a number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise error(f"{where}: {keys[2]} must be a number in [0, 1), got {dropout!r}")
    if not isinstance(targets, str) and not (isinstance(targets, list) and targets
                                             and all(isinstance(t, str) for t in targets)):
        raise error(f"{where}: {keys[3]} must be {ALL_LINEAR!r} or a list of module names, got {targets!r}")
    return rank, float(alpha), float(dropout), targets


def _modules(adapters: Params) -> dict[tuple[str, ...], dict]:
    """module path -> its `{"lora_a", "lora_b"}` leaves."""
    modules: dict[tuple[str, ...], dict] = {}
    for path, value in flatten_dict(adapters).items():
        modules.setdefault(path[:-1], {})[path[-1]] = value
    return modules


# ---------------------------------------------------------------------------------------------
# In


def load_adapter(folder: str | os.PathLike, params: Params, family: str) -> tuple[Params, dict]:
    """A PEFT LoRA adapter folder (ours or PEFT's) -> `(adapters, settings)` for the model whose
    params are `params`, checked against them: every adapted module must be one of the model's
    `Dense` layers, every shape must fit, and options plain LoRA lacks (rsLoRA, DoRA, per-module
    ranks, ...) are refused. `settings["targets"]` are the fewest names that select exactly the
    adapted modules (the config's own list when none is shorter; PEFT saves "all-linear" as full
    paths). A sequence classifier's whole-saved head comes from `load_modules_to_save`."""
    adapters, settings, _ = _read(Path(folder).expanduser(), params, family)
    return adapters, settings


def load_modules_to_save(folder: str | os.PathLike, params: Params, family: str) -> Params:
    """The modules an adapter folder saves whole (PEFT's `modules_to_save`: a sequence
    classifier's head), as a params-shaped tree to put over `params`; `{}` when there are none."""
    return _read(Path(folder).expanduser(), params, family)[2]


def _read(folder: Path, params: Params, family: str) -> tuple[Params, dict, Params]:
    arch = _arch(family)
    config_path = folder / CONFIG_NAME
    rank, alpha, dropout, targets = _read_config(config_path)
    flat = flatten_dict(params)
    kernels = {arch.module_names("/".join(p[:-1])): p[:-1] for p in flat if p[-1] == "kernel"}
    _check_targets(config_path, targets, set(kernels), family)
    file = next((folder / n for n in (WEIGHTS_NAME, _TORCH_WEIGHTS) if (folder / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    leaves = {_hf_key(arch, p)[0]: p for p in flat}
    adapters, heads = {}, {}
    for key, tensor in read_tensors(file).items():
        m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        name = key.removeprefix(_PREFIX)
        if not key.startswith(_PREFIX) or (m is None and "lora_" in name):
            raise CheckpointError(f"{file}: tensor {key} is not a LoRA weight jaxrlhf can load")
        known = kernels if m else leaves
        found = next((c for c in _candidates(m[1] if m else name, arch.trunk) if c in known), None)
        if found is None:
            raise CheckpointError(f"{file}: tensor {key} is for {m[1] if m else name}, which this {family} model lacks")
        if m:  # lora_A [r, in], lora_B [out, r] -> lora_a [in, r], lora_b [r, out]
            in_, out = flat[kernels[found] + ("kernel",)].shape
            is_a = m[2] == "A"
            path, transposed = kernels[found] + ("lora_a" if is_a else "lora_b",), True
            want = (rank, in_) if is_a else (out, rank)
        else:  # a module saved whole, under its HF tensor name
            path = leaves[found]
            transposed = _hf_key(arch, path)[1]
            want = flat[path].shape[::-1] if transposed else flat[path].shape
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}; with r={rank} this {family} "
                                  f"model needs {tuple(want)}")
        (adapters if m else heads)[path] = jnp.asarray(tensor.T if transposed else tensor, jnp.float32)
    adapters = unflatten_dict(adapters)
    modules = _modules(adapters)
    if not modules:
        raise CheckpointError(f"{file} holds no LoRA weights")
    for path, pair in modules.items():
        if len(pair) != 2:
            lacking = "lora_B" if "lora_a" in pair else "lora_A"
            raise CheckpointError(f"{file}: {_PREFIX}{arch.module_names('/'.join(path))}.{lacking}.weight is missing")
    adapted = {arch.module_names("/".join(p)) for p in modules}
    settings = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": _targets(targets, adapted, set(kernels))}
    return adapters, settings, unflatten_dict(heads)


def _read_config(config_path: Path) -> tuple[int, float, float, list[str] | str]:
    """adapter_config.json's (r, lora_alpha, lora_dropout, target_modules), once it is known to
    describe a plain LoRA adapter."""
    if not config_path.parent.is_dir():
        raise CheckpointError(f"adapter folder {config_path.parent} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path.parent} has no {CONFIG_NAME}; is it a PEFT adapter folder?")
    config = json_object(config_path)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; "
                              "jaxrlhf loads LORA adapters")
    for key, plain in _PLAIN.items():
        if config.get(key) and config[key] != plain:
            raise CheckpointError(f"{config_path}: {key}={config[key]!r} is not supported; jaxrlhf loads plain "
                                  f"LoRA adapters ({key}={plain!r})")
    init = config.get("init_lora_weights", True)
    if (init if isinstance(init, bool) else str(init).lower()) not in _BASE_KEEPING_INITS:
        raise CheckpointError(f"{config_path}: init_lora_weights={init!r} changed the base weights the adapter fits; "
                              "save it with PEFT's path_initial_model_for_weight_conversion to load it on the base")
    return _checked(config, ("r", "lora_alpha", "lora_dropout", "target_modules"), str(config_path), CheckpointError)


def _check_targets(config_path: Path, targets: list[str] | str, names: set[str], family: str) -> None:
    """Each target_modules entry (a regex string: the whole) must select one of the model's
    linear modules: an adapter for another family fails here, naming what it wanted."""
    if targets == ALL_LINEAR:
        return  # the tensors say which modules
    for target in [targets] if isinstance(targets, str) else targets:
        selector = target if isinstance(targets, str) else [target]
        if not any(_selects(selector, n) for n in names):
            raise CheckpointError(f"{config_path}: target_modules {target!r} names no linear module of this {family} "
                                  f"model (it has {', '.join(sorted(names)[:3])}, ...)")


def _targets(listed: list[str] | str, adapted: set[str], names: set[str]) -> list[str]:
    """The fewest names that select exactly the adapted modules among the model's `names`: the
    config's own list when none is shorter, else the modules' last names when they do, else
    their full paths (PEFT saves "all-linear" as full paths)."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    exact = [t for t in (listed, short) if not isinstance(t, str) and {n for n in names if _selects(t, n)} == adapted]
    return list(min(exact, key=len)) if exact else sorted(adapted)
