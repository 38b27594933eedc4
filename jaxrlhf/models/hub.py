"""Hugging Face checkpoints <-> our Flax param trees.

Loading walks our abstract param tree and, for each leaf, derives the HF tensor name by rule
(`_hf_key`), looks it up, transposes torch `Linear` kernels, and checks the shape. Nothing is
ever unpickled except through torch's `weights_only` loader.
"""

import dataclasses
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxrlhf import outputs
from jaxrlhf.errors import CheckpointError
from jaxrlhf.models.bert import (
    BertForSequenceClassification,
    BertModel,
    DistilBertForSequenceClassification,
    DistilBertModel,
)
from jaxrlhf.models.configs import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig
from jaxrlhf.models.files import generation_eos, json_object, read_tensors, resolve, weight_files
from jaxrlhf.models.gpt2 import GPT2LMHeadModel, GPT2Model
from jaxrlhf.models.llama import LlamaForCausalLM, LlamaModel

log = logging.getLogger(__name__)

Params = dict[str, Any]

# The encoder layer's generic names, as each BERT-family checkpoint spells them.
_BERT_LAYER = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_ln": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_ln": "output.LayerNorm",
}
_DISTILBERT_LAYER = {
    "query": "attention.q_lin",
    "key": "attention.k_lin",
    "value": "attention.v_lin",
    "attn_out": "attention.out_lin",
    "attn_ln": "sa_layer_norm",
    "ffn_in": "ffn.lin1",
    "ffn_out": "ffn.lin2",
    "ffn_ln": "output_layer_norm",
}


@dataclasses.dataclass(frozen=True)
class _Head:
    cls: type[nn.Module]  # built as cls(config, dtype, remat=...)
    hf_architecture: str


@dataclasses.dataclass(frozen=True)
class _Arch:
    config_cls: type
    trunk: str  # the trunk's name under a head model, and the HF key prefix
    heads: dict[str, _Head]
    module_names: Callable[[str], str]  # our module path "a/b_0/c" -> HF module path "a.b.0.c"
    is_torch_linear: Callable[[str], bool]  # HF module path -> kernel stored [out, in]
    new_ok: str  # regex: params a checkpoint may lack (heads), initialised fresh instead


def _dotted(path: str) -> str:
    """"transformer/h_0/attn" -> "transformer.h.0.attn": Flax names list members `h_0`."""
    return re.sub(r"(^|/)(h|layer|layers)_(\d+)(?=/|$)", r"\1\2.\3", path).replace("/", ".")


def _encoder_names(layer_names: dict[str, str], trunk: str, encoder: str) -> Callable[[str], str]:
    def rename(path: str) -> str:
        m = re.fullmatch(rf"((?:{trunk}/)?)layer_(\d+)/(\w+)", path)
        if m:
            prefix = m[1].replace("/", ".")
            return f"{prefix}{encoder}.layer.{m[2]}.{layer_names[m[3]]}"
        return _dotted(path.replace("pooler", "pooler/dense"))

    return rename


ARCHITECTURES: dict[str, _Arch] = {
    "gpt2": _Arch(
        GPT2Config,
        "transformer",
        {
            "base": _Head(GPT2Model, "GPT2Model"),
            "lm": _Head(GPT2LMHeadModel, "GPT2LMHeadModel"),
        },
        _dotted,
        # GPT-2's Conv1D stores [in, out] like Flax; only the value head is a torch Linear.
        lambda name: name.startswith("v_head"),
        r"v_head\.",
    ),
    "llama": _Arch(
        LlamaConfig,
        "model",
        {
            "base": _Head(LlamaModel, "LlamaModel"),
            "lm": _Head(LlamaForCausalLM, "LlamaForCausalLM"),
        },
        _dotted,
        # Every Llama projection (and the value head) is a torch Linear; lm_head is stored [V, D] like ours.
        lambda name: True,
        r"v_head\.",
    ),
    "bert": _Arch(
        BertConfig,
        "bert",
        {
            "base": _Head(BertModel, "BertModel"),
            "classification": _Head(BertForSequenceClassification, "BertForSequenceClassification"),
        },
        _encoder_names(_BERT_LAYER, "bert", "encoder"),
        lambda name: True,
        r"(bert\.)?pooler\.|classifier\.",
    ),
    "distilbert": _Arch(
        DistilBertConfig,
        "distilbert",
        {
            "base": _Head(DistilBertModel, "DistilBertModel"),
            "classification": _Head(DistilBertForSequenceClassification, "DistilBertForSequenceClassification"),
        },
        _encoder_names(_DISTILBERT_LAYER, "distilbert", "transformer"),
        lambda name: True,
        r"pre_classifier\.|classifier\.",
    ),
}

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _hf_key(arch: _Arch, path: tuple[str, ...]) -> tuple[str, bool]:
    """Our param path -> (HF tensor name, whether the HF tensor is the transpose of ours)."""
    module = arch.module_names("/".join(path[:-1]))
    return f"{module}.{_LEAF_NAMES[path[-1]]}", path[-1] == "kernel" and arch.is_torch_linear(module)


def _candidates(key: str, trunk: str) -> list[str]:
    """Names a tensor may have: with or without the trunk prefix (HF saves base models without
    it), and the gamma/beta LayerNorm names of older BERT checkpoints."""
    names = [key, key.removeprefix(trunk + ".") if key.startswith(trunk + ".") else f"{trunk}.{key}"]
    for name in list(names):
        if name.endswith("LayerNorm.weight"):
            names.append(name.removesuffix("weight") + "gamma")
        if name.endswith("LayerNorm.bias"):
            names.append(name.removesuffix("bias") + "beta")
    return names


# ---------------------------------------------------------------------------------------------
# Reading configs


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json, its `eos_token_id` replaced by generation_config.json's when that sets one."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face checkpoint directory?")
    hf = json_object(path)
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; jaxrlhf loads {sorted(ARCHITECTURES)}"
        )
    return hf | generation_eos(directory)


# ---------------------------------------------------------------------------------------------
# Public API


def load_config(name_or_path: str | os.PathLike, *, head: str | None = None, revision: str | None = None) -> Any:
    """A checkpoint's model config, checked as `load_pretrained` checks it, and its weight files
    found, without reading the weights: for validating every input before a long run starts."""
    directory = resolve(name_or_path, revision)
    hf = read_hf_config(directory)
    weight_files(directory)
    return _build(hf, head, False, None, jnp.float32, where=str(directory / "config.json")).config


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: str | None = None,
    value_head: bool = False,
    num_labels: int | None = None,
    dtype: jnp.dtype | str = jnp.float32,
    remat: bool = False,
    revision: str | None = None,
    rng: jax.Array | None = None,
) -> tuple[nn.Module, Params, Any]:
    """Load a GPT-2, Llama, BERT or DistilBERT checkpoint -> `(module, params, config)`.

    `head`: "base", "lm" (GPT-2, Llama) or "classification" (BERT/DistilBERT); by default the one
    the checkpoint's `architectures` names. `value_head` adds PPO's scalar head to a causal LM;
    `num_labels` sets the classification width (1 = regression). Head tensors the checkpoint
    lacks are initialised from `rng` (with a warning naming them); any other missing tensor is
    an error. Params are float32; `dtype` is the compute dtype (see `layers.frozen_params`); `remat`
    rematerialises each transformer block in the backward pass (same params and gradients, less
    memory). Use as
    `module.apply({"params": params}, input_ids, attention_mask)`.
    """
    directory = resolve(name_or_path, revision)
    hf = read_hf_config(directory)
    module = _build(hf, head, value_head, num_labels, dtype, where=str(directory / "config.json"), remat=remat)
    state: dict[str, tuple[np.ndarray, Path]] = {}
    for path in weight_files(directory):
        state.update({k: (v, path) for k, v in read_tensors(path).items()})
    params = _params_from_state(ARCHITECTURES[hf["model_type"]], module, state, directory, rng)
    return module, params, module.config


def from_config(
    hf_config: dict[str, Any],
    rng: jax.Array | None,
    *,
    head: str | None = None,
    value_head: bool = False,
    num_labels: int | None = None,
    dtype: jnp.dtype | str = jnp.float32,
    remat: bool = False,
    where: str = "model config",
) -> tuple[nn.Module, Params, Any]:
    """A freshly initialised model from a config.json-style dict (with `model_type`); float32
    params, `dtype` and `remat` as `load_pretrained`'s. With `rng=None` the params are only
    their `jax.ShapeDtypeStruct`s (nothing allocated: for planning memory)."""
    module = _build(hf_config, head, value_head, num_labels, dtype, where, remat)
    params = _abstract_params(module) if rng is None else jax.jit(module.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return module, params, module.config


def _build(hf, head, value_head, num_labels, dtype, where, remat=False) -> nn.Module:
    if hf.get("model_type") not in ARCHITECTURES:
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not supported; "
                              f"jaxrlhf builds {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[hf["model_type"]]
    if num_labels is not None:
        hf = {**{k: v for k, v in hf.items() if k not in ("id2label", "label2id")}, "num_labels": num_labels}
    config = arch.config_cls.from_hf(hf, where=where)
    head = head or _default_head(arch, hf)
    if head not in arch.heads:
        raise CheckpointError(f"head={head!r} is not available for {hf['model_type']}; choose one of {sorted(arch.heads)}")
    if value_head and head != "lm":
        raise CheckpointError(f"value_head=True is only available for causal LM policies (head 'lm'), not head {head!r}")
    return arch.heads[head].cls(config, jnp.dtype(dtype), remat=remat, **({"value_head": True} if value_head else {}))


def _default_head(arch: _Arch, hf: dict[str, Any]) -> str:
    named = set(hf.get("architectures") or [])
    for head, spec in arch.heads.items():
        if spec.hf_architecture in named:
            return head
    # A checkpoint that names no architecture we know: the most useful head for its family.
    return "lm" if "lm" in arch.heads else "base"


def _abstract_params(module: nn.Module) -> Params:
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]


def _params_from_state(arch, module, state, directory, rng) -> Params:
    flat = flatten_dict(_abstract_params(module))
    params, missing, fresh, used = {}, [], [], set()
    for path, leaf in flat.items():
        key, transposed = _hf_key(arch, path)
        found = next((k for k in _candidates(key, arch.trunk) if k in state), None)
        if found is None:
            (fresh if re.match(arch.new_ok, key) else missing).append((path, key))
            continue
        used.add(found)
        tensor, file = state[found]
        value = tensor.T if transposed else tensor
        if value.shape != leaf.shape:
            raise CheckpointError(
                f"tensor {found} in {file} has shape {tuple(tensor.shape)}; the model built from "
                f"{directory / 'config.json'} expects {tuple(leaf.shape[::-1] if transposed else leaf.shape)}"
            )
        params[path] = jnp.asarray(value, jnp.float32)
    if missing:
        names = ", ".join(k for _, k in missing[:5])
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) the model needs are not in the checkpoint, e.g. {names}"
        )
    if fresh:
        warnings.warn(
            f"{directory}: initialising new head tensors not in the checkpoint: {', '.join(k for _, k in fresh)}",
            stacklevel=3,
        )
        rng = jax.random.key(0) if rng is None else rng
        init = flatten_dict(jax.jit(module.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"])
        params.update({path: init[path] for path, _ in fresh})
    unused = sorted(set(state) - used)
    if unused:
        log.info("%s: %d checkpoint tensors not used by this model, e.g. %s", directory, len(unused), unused[:3])
    return unflatten_dict(params)


def save_pretrained(
    directory: str | os.PathLike,
    module: nn.Module,
    params: Params,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    **record,
) -> Path:
    """Write `module`'s params in HF layout (config.json + model.safetensors, and the tokenizer's
    files when given) that `transformers.AutoModel*.from_pretrained` loads unchanged.

    The folder is built beside the target and swapped in at the end, so an interrupted save
    never leaves a half-written checkpoint, nor loses the one that was there. It replaces only
    an earlier export (`record`, e.g. the source run, goes into its marker file); a folder of
    anything else only with `overwrite` (see `jaxrlhf.outputs`).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arch_name, head = _architecture_of(module)
    arch = ARCHITECTURES[arch_name]
    config = module.config
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, where="save_pretrained")
    tensors = {}
    for path, value in flatten_dict(params).items():
        key, transposed = _hf_key(arch, path)
        value = np.asarray(value, np.float32)
        tensors[key] = np.ascontiguousarray(value.T if transposed else value)

    def build(staging: Path) -> None:
        hf = config.to_hf(arch.heads[head].hf_architecture)
        hf["torch_dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        try:
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk, say: a write failure like any other
            raise OSError(f"model.safetensors: {e}") from e
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    return outputs.replace_folder(directory, "export", build, overwrite=overwrite, **record)


def _architecture_of(module: nn.Module) -> tuple[str, str]:
    for arch_name, arch in ARCHITECTURES.items():
        for head, spec in arch.heads.items():
            if type(module) is spec.cls:
                return arch_name, head
    raise CheckpointError(f"save_pretrained does not know how to export a {type(module).__name__}")


def check_tokenizer(tokenizer: Any, config: Any, where: str) -> None:
    """Raise if the tokenizer can produce ids past the model's embedding table."""
    vocab_size = config.vocab_size
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}; ids >= {vocab_size} would index past the embedding table"
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def load_tokenizer(name_or_path: str | os.PathLike, config: Any | None = None, revision: str | None = None):
    """The checkpoint's tokenizer (transformers `AutoTokenizer`), checked against `config`."""
    from transformers import AutoTokenizer

    directory = resolve(name_or_path, revision)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone, silently.
        raise CheckpointError(f"{directory} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                              "save the tokenizer beside the model, or name one with the config's tokenizer key")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory} has no loadable tokenizer: {e}") from e
    if config is not None:
        check_tokenizer(tokenizer, config, where=str(directory))
    return tokenizer
