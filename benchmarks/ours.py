"""The jaxrlhf side of each benchmark: the library's own compiled steps, as a stage runs them.

`prepare` writes the random-init weights both sides load; `setup` returns a zero-argument
callable that runs one step to completion.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import workloads as wl
from jaxrlhf.models import GPT2Model, from_config, load_pretrained, save_pretrained
from jaxrlhf.parallel import jit_step
from jaxrlhf.updates.ppo import PPOConfig, make_ppo_update
from jaxrlhf.sampling import SamplingConfig, generate
from jaxrlhf.updates import (GRPOConfig, RLOOConfig, TrainState, make_dpo_step, make_grpo_update, make_optimizer,
                             make_reward_step, make_rloo_update, make_sft_step)


def prepare(w: wl.Workload, workdir: Path) -> None:
    """Random-init weights of `w`'s model size in HF layout at `workdir/model` (and, for a GPT-2,
    the PPO / RLOO / GRPO heads in `heads.npz`): the same for every workload of that size."""
    head = "classification" if w.size == "minilm" else "lm"
    module, params, config = from_config(w.model_config(), jax.random.key(0), head=head)
    save_pretrained(workdir / "model", module, params)
    if w.size in wl.GPT2_SIZES:
        np.savez(workdir / "heads.npz", **wl.ppo_heads(config.n_embd))


def _state(module, params, **frozen) -> TrainState:
    tx, _ = make_optimizer(wl.LEARNING_RATE)
    return TrainState.create(module, params, tx, **frozen)


def _keys():
    """A fresh key for every step of a benchmark."""
    return iter(jax.random.split(jax.random.key(1), 100_000))


def runner(step, state, batch):
    """Run `step(state, batch, key) -> (state, metrics)` on `state` in place; each call
    blocks until the step is done."""
    keys = _keys()
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch, next(keys))
        jax.block_until_ready((holder[0], metrics))

    return run


def setup(w: wl.Workload, workdir: Path):
    model_dir = workdir / "model"
    if w.name == "sft":
        module, params, _ = load_pretrained(model_dir, head="lm")
        b = wl.sft_batch(w)
        batch = {"input_ids": b["input_ids"], "attention_mask": np.ones_like(b["input_ids"]),
                 "loss_mask": b["loss_mask"]}
        return runner(jit_step(make_sft_step()), _state(module, params), jax.tree.map(jnp.asarray, batch))
    if w.name == "generation":
        module, params, _ = load_pretrained(model_dir, head="lm")
        ids = jnp.asarray(wl.prompts(w))
        mask = jnp.ones_like(ids)
        settings = SamplingConfig(max_new_tokens=w.response, pad_token_id=w.eos)
        keys = _keys()
        return lambda: generate(module, params, ids, mask, next(keys), settings).sequences.block_until_ready()
    if w.name == "dpo":
        module, params, _ = load_pretrained(model_dir, head="lm")
        pairs = wl.preference_pairs(w)
        batch = {}
        for k in ("chosen", "rejected"):
            ids = np.concatenate([pairs["prompt"], pairs[k]], axis=1)
            batch |= {f"{k}_ids": ids, f"{k}_mask": np.ones_like(ids),
                      f"{k}_loss_mask": (np.arange(ids.shape[1]) >= w.prompt)[None].repeat(w.batch, 0)}
        state = _state(module, params, ref_params=jax.tree.map(jnp.array, params))
        return runner(jit_step(make_dpo_step("sigmoid", beta=0.1)), state, jax.tree.map(jnp.asarray, batch))
    if w.name == "ppo":
        return _ppo(w, model_dir, workdir / "heads.npz")
    if w.name in ("rloo", "grpo"):
        return _group(w, model_dir, workdir / "heads.npz")
    if w.name == "reward":
        return runner(*reward_step(w, model_dir))
    raise ValueError(f"unknown workload {w.name!r}")


def reward_step(w: wl.Workload, model_dir: Path):
    """The reward workload's compiled step, its state and batch -> (step, state, batch);
    `step(state, batch, key) -> (state, metrics)`."""
    module, params, _ = load_pretrained(model_dir, head="classification", num_labels=1)
    b = wl.regression_batch(w)
    batch = {"input_ids": b["input_ids"], "attention_mask": np.ones_like(b["input_ids"]), "target": b["target"]}
    return jit_step(make_reward_step("regression")), _state(module, params), jax.tree.map(jnp.asarray, batch)


def _reward_fn(config, params, heads):
    """The reward model: the policy's trunk with a score vector on the last token's state
    -> (its params, `reward_fn(params, sequences, attention_mask, response_mask) -> [B]`)."""
    trunk = GPT2Model(config)
    reward_params = {"trunk": jax.tree.map(jnp.array, params["transformer"]), "score": jnp.asarray(heads["reward"])}

    def reward_fn(rp, sequences_BxT, attention_mask_BxT, response_mask_BxN):
        hidden_BxTxD, _ = trunk.apply({"params": rp["trunk"]}, sequences_BxT, attention_mask_BxT)
        last_B = sequences_BxT.shape[1] - response_mask_BxN.shape[1] + jnp.sum(response_mask_BxN, -1) - 1
        return hidden_BxTxD[jnp.arange(last_B.shape[0]), last_B] @ rp["score"]

    return reward_params, reward_fn


def _group(w: wl.Workload, model_dir: Path, heads_file: Path):
    """One RLOO or GRPO iteration as their stage runs it: sample k responses to each prompt,
    score them with the reward model, then the one compiled update (old and reference
    logprobs, advantages, one optimizer update)."""
    module, params, config = load_pretrained(model_dir, head="lm")
    reward_params, reward_fn = _reward_fn(config, params, np.load(heads_file))
    if w.name == "rloo":
        update = make_rloo_update(RLOOConfig(num_generations=wl.GROUP_SIZE, beta=wl.GROUP_BETA))
    else:
        update = make_grpo_update(GRPOConfig(num_generations=wl.GROUP_SIZE, beta=wl.GROUP_BETA))
    update, score = jit_step(update), jax.jit(reward_fn)
    state = _state(module, params, ref_params=jax.tree.map(jnp.array, params))
    settings = SamplingConfig(max_new_tokens=w.response, pad_token_id=wl.EOS)

    def iteration(state, prompts, key):
        gen_key, update_key = jax.random.split(key)
        rollout = generate(module, state.params, prompts["ids"], prompts["mask"], gen_key, settings)
        batch = {"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
                 "response_mask": rollout.response_mask}
        batch["scores"] = score(reward_params, *batch.values())
        return update(state, batch, update_key)

    ids = jnp.asarray(wl.prompts(w))
    return runner(iteration, state, {"ids": ids, "mask": jnp.ones_like(ids)})


def _ppo(w: wl.Workload, model_dir: Path, heads_file: Path):
    """One PPO iteration as the PPO stage runs it: sample the rollouts, then one compiled
    update that scores them (policy, values, reference, reward model) and runs the epochs."""
    module, params, config = load_pretrained(model_dir, head="lm", value_head=True, rng=jax.random.key(0))
    heads = np.load(heads_file)
    params["v_head"]["summary"]["kernel"] = jnp.asarray(heads["value"])[:, None]
    reward_params, reward_fn = _reward_fn(config, params, heads)
    state = _state(module, params, ref_params=jax.tree.map(jnp.array, params), reward_params=reward_params,
                   kl_coef=jnp.float32(0.05))
    update = jit_step(make_ppo_update(PPOConfig(epochs=wl.PPO_EPOCHS, num_minibatches=1), reward_fn))
    settings = SamplingConfig(max_new_tokens=w.response, pad_token_id=wl.EOS)

    def iteration(state, prompts, key):
        gen_key, update_key = jax.random.split(key)
        rollout = generate(module, state.params, prompts["ids"], prompts["mask"], gen_key, settings)
        batch = {"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
                 "response_mask": rollout.response_mask}
        return update(state, batch, update_key)

    ids = jnp.asarray(wl.prompts(w))
    return runner(iteration, state, {"ids": ids, "mask": jnp.ones_like(ids)})
