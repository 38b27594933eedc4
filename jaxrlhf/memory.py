"""A run's memory before the run, from shapes alone: per-device bytes of the trained params,
the optimizer state, the frozen models (reference, reward model), the update's batch and
temporaries and the sampler's KV cache, for a stage config, its model, batch, lengths, mesh
and levers. Nothing is allocated and no weight is read (config.json only): the state is the
stage's own (`Training`, `initial_state`) under `jax.eval_shape`, laid out as the run lays it
out (`parallel.state_shardings`), and the update is the stage's own compiled step
(`parallel.jit_for_mesh`) lowered on `jax.ShapeDtypeStruct`s and compiled; its temporaries are
XLA's `memory_analysis()` of that program, for the backend of the devices planned on."""

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.cli import stage
from jaxrlhf.errors import ConfigError
from jaxrlhf.models.hub import from_config
from jaxrlhf.models.layers import frozen_params, init_cache
from jaxrlhf.rewards import reward_models
from jaxrlhf.sampling import generate
from jaxrlhf.stages import common
from jaxrlhf.stages.online_dpo import make_pairs
from jaxrlhf.stages.rollout import rollout_batch, sampling_config

# Model shapes by name (`--model-config llama-3.1-8b`): config.json files, no weights.
NAMED_MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
ONLINE = ("ppo", "rloo", "grpo", "online_dpo")  # the stages that sample their own rollouts
FAKE_DEVICES = "--xla_force_host_platform_device_count"
PARTS = ("params", "optimizer state", "reference", "reward model", "update batch", "update temporaries",
         "sampler KV cache")


def fake_cpu_devices(n: int) -> None:
    """Plan on `n` fake CPU devices: set before JAX starts its backends (the first use of a
    device), which importing JAX does not do."""
    if n < 1:
        raise ConfigError(f"--devices {n}: must be at least 1")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{FAKE_DEVICES}={n}"])
    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != n:
        raise ConfigError(f"--devices {n}: JAX had already started with {jax.device_count()} device(s)")


def model_json(source, key: str) -> dict:
    """The config.json dict of `source`: a config dict, a config.json file, a checkpoint folder
    holding one, a name in configs/models, or a hub name (its config.json alone is fetched).
    `key` is where the source was given, for the error."""
    if isinstance(source, dict):
        return source
    path = Path(str(source)).expanduser()
    named = NAMED_MODELS / f"{path.name.removesuffix('.json')}.json"
    file = path / "config.json" if path.is_dir() else path if path.is_file() else named if named.is_file() else None
    if file is None and str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        file = _hub_config(str(source), key)
    if file is None or not file.is_file():
        known = ", ".join(sorted(p.stem for p in NAMED_MODELS.glob("*.json")))
        raise ConfigError(f"{key}={source}: no config.json there; give a checkpoint folder, a config.json file or "
                          f"a named shape ({known})")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={source}: {file} is not a JSON config ({e})") from None


def _hub_config(name: str, key: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(name, "config.json"))
    except Exception as e:  # the hub client raises many types; all mean "not found"
        raise ConfigError(f"{key}={name}: not found on the Hugging Face hub or in its cache "
                          f"({type(e).__name__})") from None


def levers(config) -> dict:
    """The compute levers of a stage config (its `compute` section)."""
    return {"dtype": config.compute.dtype, "remat": config.compute.remat}


def device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (arrays or `jax.ShapeDtypeStruct`s with a sharding):
    the largest shard of each leaf."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if x is not None)


def laid_out(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _policy(name: str, config, model_config) -> tuple[dict, dict]:
    """(the policy's config.json, how the stage builds it) of a stage config; `model_config`
    (a source, see `model_json`) replaces the config's own model."""
    if name in ("sft", "reward"):
        source, key = (config.model, "model") if config.model_config is None else (config.model_config, "model_config")
    else:
        source, key = config.policy, "policy"
    hf = model_json(model_config if model_config is not None else source, "--model-config" if model_config else key)
    build = {"head": "classification", "num_labels": 1} if name == "reward" else \
        {"head": "lm", "value_head": name == "ppo"}
    return hf, build


def _rollout(config, module, params, rows: int):
    """The shapes of the sampler's rollout of `rows` prompts of the config's lengths."""
    ids = jax.ShapeDtypeStruct((rows, config.sampling.max_prompt_tokens), jnp.int32)
    tokens = SimpleNamespace(eos_token_id=0, pad_token_id=0)  # ids do not change a shape
    settings = sampling_config(config.sampling, tokens, module.config)
    return jax.eval_shape(functools.partial(generate, module, settings=settings), params, ids, ids,
                          jax.eval_shape(jax.random.key, 0))


def _batch(name: str, config, module, params) -> dict:
    """The update's global batch as `jax.ShapeDtypeStruct`s, as the stage builds it."""
    b, f32, i32 = config.train.batch_size, jnp.float32, jnp.int32

    def rows(*keys, width):
        return {k: jax.ShapeDtypeStruct((b, width), i32) for k in keys}

    if name == "sft":
        return rows("input_ids", "attention_mask", "loss_mask", width=config.max_length)
    if name == "reward":
        if config.kind == "pairwise":
            return rows("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", width=config.max_length)
        return rows("input_ids", "attention_mask", width=config.max_length) | {"target": jax.ShapeDtypeStruct((b,), f32)}
    if name == "dpo":
        pairs = rows(*(f"{s}_{k}" for s in ("chosen", "rejected") for k in ("ids", "mask", "loss_mask")),
                     width=config.max_length)
        refs = {} if config.loss_type == "slic" else {f"ref_{s}_logps": jax.ShapeDtypeStruct((b,), f32)
                                                      for s in ("chosen", "rejected")}
        return pairs | refs
    if name == "online_dpo":  # the pairs of 2B replies: the stage's own make_pairs on rollout-shaped zeros
        rollout = _rollout(config, module, params, 2 * b)
        zeros = {k: np.zeros(v.shape, v.dtype) for k, v in rollout._asdict().items() if v is not None}
        pairs, _ = make_pairs(zeros["sequences"], zeros["attention_mask"], zeros["response_mask"].shape[1],
                              np.zeros(2 * b, np.float32))
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in pairs.items()}
    rollout = _rollout(config, module, params, b)
    return rollout_batch(rollout, jax.ShapeDtypeStruct((b,), f32))


def _sampler_rows(name: str, config) -> int:
    return 2 * config.train.batch_size if name == "online_dpo" else config.train.batch_size


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of each part (`PARTS`), for a stage on a mesh."""

    stage: str
    model: str
    mesh: tuple[int, int]  # (data, fsdp)
    parts: dict
    levers: dict
    grad_accum_steps: int
    analysis: dict  # the update's memory_analysis() in bytes (`compiled_memory`); empty if not compiled

    @property
    def resident(self) -> int:
        """What stays on the device all run: params, optimizer state, frozen models."""
        return sum(self.parts[p] for p in PARTS[:4])

    @property
    def peak(self) -> int:
        """The resident part plus the larger of the update (batch, temporaries) and sampling
        (the KV cache): they take turns, never both at once."""
        update = self.parts["update batch"] + self.parts["update temporaries"]
        return self.resident + max(update, self.parts["sampler KV cache"])


def plan(name: str, config, model_config=None, reward_config=None, compile_update: bool = True) -> Plan:
    """The memory plan of stage `name` under `config` (a loaded stage config) on the devices
    `config.train.mesh` takes; `model_config` / `reward_config` (sources, see `model_json`)
    replace the policy's and the reward model's config.json. Without `compile_update` the
    update's batch and temporaries are left out (no compile: seconds, even for 8B)."""
    train, compute = config.train, levers(config)
    hf, build = _policy(name, config, model_config)
    module, params, _ = from_config(hf, None, where="--model-config" if model_config else "the policy's config.json",
                                    **common.model_options(config.compute), **build)  # as the stage builds it
    training = stage(name)[0].training(config)
    mesh = common.train_mesh(train, getattr(getattr(config, name, None), "num_minibatches", 1), name)
    state = jax.eval_shape(lambda p: common.initial_state(module, p, train, training)[0], params)
    state = laid_out(state, parallel.state_shardings(state, mesh))
    # With LoRA, params are the frozen base and the trained adapters and heads (no reference).
    parts = dict.fromkeys(PARTS, 0) | {"params": device_bytes((state.base_params, state.params)),
                                       "optimizer state": device_bytes(state.opt_state),
                                       "reference": device_bytes(state.ref_params)}
    if name in ONLINE:
        parts["reward model"] = _reward_model_bytes(config, reward_config, compute, mesh)
        rows = _sampler_rows(name, config) // mesh.size
        width = config.sampling.max_prompt_tokens + config.sampling.max_new_tokens
        cache = jax.eval_shape(functools.partial(init_cache, module.config, rows, width, module.dtype))
        parts["sampler KV cache"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    analysis = {}
    if compile_update:
        batch = _batch(name, config, module, params)
        batch = laid_out(batch, jax.tree.map(lambda x: parallel.rows_sharding(mesh, len(x.shape)), batch))
        analysis = compiled_memory(training.step, mesh, state, batch)
        parts |= {"update batch": device_bytes(batch), "update temporaries": analysis["temp"]}
    return Plan(name, describe_model(hf), (mesh.shape[parallel.DATA], mesh.shape[parallel.FSDP]), parts, compute,
                train.grad_accum_steps, analysis)


def compiled_memory(step, mesh, state, batch) -> dict:
    """`step` compiled as the stages compile it (`parallel.jit_for_mesh`) for `state` and
    `batch` (arrays or `jax.ShapeDtypeStruct`s, laid out on `mesh`) -> its `memory_analysis()`
    in bytes per device: argument, output, alias, temp, generated_code."""
    key = laid_out(jax.eval_shape(jax.random.key, 0), parallel.replicated(mesh))
    with jax.set_mesh(mesh):
        analysis = parallel.jit_for_mesh(step, mesh, state).lower(state, batch, key).compile().memory_analysis()
    return {f: getattr(analysis, f"{f}_size_in_bytes") for f in ("argument", "output", "alias", "temp",
                                                                  "generated_code")}


def _reward_model_bytes(config, reward_config, compute: dict, mesh) -> int:
    """The reward models' params as the scorer holds them on the mesh (none for a function)."""
    total = 0
    for model in reward_models(config.reward):
        key = "--reward-config" if reward_config else "reward.model"
        hf = model_json(reward_config if reward_config is not None else model, key)
        _, params, _ = from_config(hf, None, head="classification", where=key)
        params = jax.eval_shape(functools.partial(frozen_params, dtype=compute["dtype"]), params)  # as scored
        total += device_bytes(laid_out(params, parallel.state_shardings(params, mesh)))
    return total


def describe_model(hf: dict) -> str:
    c = {k: hf.get(k) for k in ("n_layer", "num_hidden_layers", "n_embd", "hidden_size", "vocab_size")}
    layers = c["n_layer"] or c["num_hidden_layers"] or hf.get("n_layers")  # GPT-2, Llama / BERT, DistilBERT
    width = c["n_embd"] or c["hidden_size"] or hf.get("dim")
    return f"{hf.get('model_type')} ({layers} layers, width {width}, vocab {c['vocab_size']})"


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def advice(p: Plan) -> str:
    """Which lever brings the largest part down."""
    largest = max(PARTS, key=lambda part: p.parts[part])
    data, fsdp = p.mesh
    more_fsdp = (f"train.mesh.fsdp (now {fsdp}): train.mesh.data=1 train.mesh.fsdp={data * fsdp} splits params, "
                 f"optimizer state and frozen models {data * fsdp} ways" if data > 1 else
                 f"more devices on train.mesh.fsdp (each already holds 1/{fsdp} of params, optimizer state and "
                 "frozen models)")
    lever = {
        "params": more_fsdp, "optimizer state": more_fsdp,
        "reference": ("compute.dtype bfloat16 (stores frozen models in half the bytes), then " + more_fsdp)
        if p.levers["dtype"] == "float32" else more_fsdp,
        "update batch": "a smaller train.batch_size or shorter sequences (max_length, sampling lengths)",
        "update temporaries": f"train.grad_accum_steps (now {p.grad_accum_steps}): each device's rows in that many "
                              "microbatches" + (", then compute.remat block (activations recomputed per block in "
                                                "the backward pass)" if p.levers["remat"] == "none" else ""),
        "sampler KV cache": "a smaller train.batch_size or sampling.max_prompt_tokens + sampling.max_new_tokens "
                            "(the cache holds every row's whole sequence), or more devices",
    }
    lever["reward model"] = lever["reference"]
    return f"largest part: {largest} ({gib(p.parts[largest])}); the lever for it: {lever[largest]}"


def report(p: Plan) -> str:
    data, fsdp = p.mesh
    lines = [f"memory plan: {p.stage}, {p.model}, {data * fsdp} device(s) (data {data} x fsdp {fsdp}), "
             f"compute {p.levers['dtype']}, remat {p.levers['remat']}, grad_accum_steps {p.grad_accum_steps}; "
             f"bytes per device:"]
    left_out = () if p.analysis else ("update batch", "update temporaries")
    lines += [f"  {part:<20} {'not compiled' if part in left_out else gib(p.parts[part]):>12}" for part in PARTS]
    lines += [f"  {'total':<20} {gib(sum(p.parts.values())):>12}  (every part at once)",
              f"  {'peak':<20} {gib(p.peak):>12}  (params + optimizer + frozen, then the larger of the update and "
              f"sampling, which take turns)",
              *(["  (DPO scores the pairs under its reference once, before training: the reference is on the "
                 "devices then, not during the update)"] if p.stage == "dpo" else []),
              advice(p)]
    return "\n".join(lines)
