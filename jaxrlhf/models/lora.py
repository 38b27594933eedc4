"""LoRA (Hu et al. 2021) on the linear layers of GPT-2, Llama, BERT and DistilBERT, as PEFT
does it: y = x W + b + (alpha / r) * x A B, A `[in, r]` (PEFT's default init, kaiming-uniform:
U(-1/sqrt(in), 1/sqrt(in))), B `[r, out]` zeros, so a fresh adapter is the base model exactly.

Why a small module-level implementation (and not qwix, Tunix's choice): every linear layer of
our models is one class, `layers.Dense`, and params are plain pytrees. So an adapter is a
`{"lora_a", "lora_b"}` pair inserted next to a Dense's `kernel` in the params tree (`combine`),
which `Dense` adds to its output when present. Then nothing else changes: every update, the
sampler's cached decode, the scorers and remat call `apply({"params": p})` as before, and the
reference is the same tree without the pairs (the base: no second copy). The trained leaves
(`state.params`) are the adapters and the heads that train fully (`HEADS`, PEFT's
`modules_to_save`), so the gradient, the optimizer state and the checkpoints are theirs alone;
the base rides in the state frozen. qwix would intercept the modules instead (not installed here,
and a second way of building params next to ours).

Trees: an adapters tree mirrors the params tree (`params["transformer"]["h_0"]["attn"]["c_attn"]`
-> `adapters[...same path...] = {"lora_a": [in, r], "lora_b": [r, out]}`, float32). Settings
travel as a plain dict `{"rank", "alpha", "dropout", "targets"}`; scale = alpha / rank.
"""

import math

import jax
import jax.numpy as jnp

from jaxrlhf.errors import ConfigError

# What trains fully beside the adapters (PEFT's modules_to_save): PPO's value head, a reward
# model's classifier and, for DistilBERT, its pre_classifier too (PEFT's SEQ_CLS matches
# "classifier" as a name suffix). Top-level keys of the params tree, each one family's own.
HEADS = ("v_head", "classifier", "pre_classifier")

# PEFT's target names -> our Dense module names, per model family. GPT-2 and Llama share
# transformers' names; BERT's "dense" is PEFT's suffix match on attention.output.dense,
# intermediate.dense, output.dense and pooler.dense.
PEFT_NAMES = {
    "gpt2": {n: (n,) for n in ("c_attn", "c_proj", "c_fc")},
    "llama": {n: (n,) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
    "bert": {"query": ("query",), "key": ("key",), "value": ("value",),
             "dense": ("attn_out", "ffn_in", "ffn_out", "pooler")},
    "distilbert": {"q_lin": ("query",), "k_lin": ("key",), "v_lin": ("value",), "out_lin": ("attn_out",),
                   "lin1": ("ffn_in",), "lin2": ("ffn_out",)},
}
# PEFT's defaults when no targets are given (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
# (None for DistilBERT: PEFT asks for target_modules there.)
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "bert": ("query", "value")}
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output (LM or classifier) head


def settings(rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, targets=None) -> dict:
    """The settings dict (PEFT's defaults: r 8, alpha 8, no dropout, the family's targets)."""
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": _names(targets)}


def _names(targets) -> list[str] | None:
    """PEFT's `target_modules` as a list (it takes one name as a string too: "all-linear")."""
    return None if targets is None else [targets] if isinstance(targets, str) else list(targets)


def peft_settings(lora: dict, family: str) -> dict:
    """`lora` with its targets as PEFT's config names them: the family's default for null,
    the string "all-linear" for that shorthand."""
    targets = lora["targets"] or list(DEFAULT_TARGETS[family])
    return {**lora, "targets": ALL_LINEAR if targets == [ALL_LINEAR] else targets}


def scale(lora: dict) -> float:
    return lora["alpha"] / lora["rank"]


def module_names(targets, family: str, key: str = "lora.targets") -> frozenset[str]:
    """Our Dense module names that PEFT's `targets` (None: PEFT's default for `family`) name;
    an unknown name is a ConfigError naming `key`."""
    names = PEFT_NAMES.get(family)
    if names is None:
        raise ConfigError(f"LoRA supports gpt2, llama, bert and distilbert models, not {family!r}")
    if targets is None and family not in DEFAULT_TARGETS:
        raise ConfigError(f"{key}: PEFT has no default targets for {family}; name them (from {sorted(names)}) "
                          f"or give {ALL_LINEAR!r}")
    targets = DEFAULT_TARGETS[family] if targets is None else tuple(_names(targets))
    if ALL_LINEAR in targets:
        targets = tuple(names) if targets == (ALL_LINEAR,) else None
        if targets is None:
            raise ConfigError(f"{key}: {ALL_LINEAR!r} stands alone, not in a list with other names")
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise ConfigError(f"{key}={list(targets)}: {unknown or 'none'} not among {family}'s linear layers "
                          f"{sorted(names)} (or {ALL_LINEAR!r})")
    return frozenset(n for t in targets for n in names[t])


def target_paths(params, names: frozenset[str]) -> list[tuple[str, ...]]:
    """Paths of the Dense modules named in `names` (dicts holding a 2-D `kernel`), outside `HEADS`."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if path and path[-1] in names and getattr(node.get("kernel"), "ndim", 0) == 2:
                found.append(path)
            for k, v in node.items():
                if not (not path and k in HEADS):
                    walk(v, (*path, k))

    walk(params, ())
    return found


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> dict:
    """A copy of the dicts along `path` with `value` at its end (other subtrees shared)."""
    if not path:
        return value
    return {**tree, path[0]: _set(tree.get(path[0], {}), path[1:], value)}


def init(params, lora: dict, family: str, key: jax.Array) -> dict:
    """A fresh adapters tree for `params` (PEFT's init: A kaiming-uniform, B zeros)."""
    adapters: dict = {}
    paths = target_paths(params, module_names(lora["targets"], family))
    for i, path in enumerate(paths):
        d_in, d_out = _get(params, path)["kernel"].shape
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on torch's [r, in] weight
        a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, lora["rank"]), jnp.float32, -bound, bound)
        adapters = _set(adapters, path, {"lora_a": a, "lora_b": jnp.zeros((lora["rank"], d_out), jnp.float32)})
    return adapters


def _pairs(adapters, path=()):
    """(path, {"lora_a", "lora_b"}) of every adapter in the tree."""
    if "lora_a" in adapters:
        yield path, adapters
        return
    for k, v in adapters.items():
        yield from _pairs(v, (*path, k))


def paths(adapters) -> list[tuple[str, ...]]:
    """The params paths of the Dense modules an adapters tree adapts."""
    return [path for path, _ in _pairs(adapters)]


def trainable(params, adapters) -> dict:
    """The trained leaves of a LoRA run: the adapters and the heads that train fully (copies:
    the frozen base keeps the heads' starting values, as the reference)."""
    return {"lora": adapters, "heads": {k: jax.tree.map(jnp.array, params[k]) for k in HEADS if k in params}}


def combine(base, trained: dict, lora_scale: float, dropout: tuple[float, jax.Array] | None = None) -> dict:
    """The params a forward pass reads: `base` with the trained heads, and each adapter's A and
    scale * B beside its Dense's kernel (`layers.Dense` adds x A (scale B)). `dropout` (rate,
    key): each adapter's input dropped at that rate, with its own key (a loss pass's)."""
    params = {**base, **trained["heads"]}
    for i, (path, pair) in enumerate(_pairs(trained["lora"])):
        extra = {} if dropout is None else {"lora_dropout": {
            "rate": jnp.float32(dropout[0]), "key": jax.random.key_data(jax.random.fold_in(dropout[1], i))}}
        params = _set(params, path, {**_get(params, path), "lora_a": pair["lora_a"],
                                     "lora_b": lora_scale * pair["lora_b"], **extra})
    return params


def merge(params, adapters, lora_scale: float) -> dict:
    """`params` with every adapted kernel replaced by kernel + scale * A B (float32): the plain
    model the adapter makes, for a Hugging Face export."""
    for path, pair in _pairs(adapters):
        dense = _get(params, path)
        kernel = dense["kernel"].astype(jnp.float32) + lora_scale * (pair["lora_a"] @ pair["lora_b"])
        params = _set(params, path, {**dense, "kernel": kernel})
    return params


def merged(base, trained: dict, lora_scale: float) -> dict:
    """The whole trained model as plain float32 params (base with the trained heads, adapters
    merged): what a run exports."""
    whole = merge({**base, **trained["heads"]}, trained["lora"], lora_scale)
    return jax.tree.map(lambda x: x.astype(jnp.float32), whole)
