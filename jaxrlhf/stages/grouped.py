"""What the RLOO and GRPO stages share: k samples per prompt from the policy, scored by a
reward source, then the method's one compiled update; checkpoints, metrics and the export as
every training stage. The methods differ only in their config section and update."""

import time

import jax
import numpy as np

from jaxrlhf import data
from jaxrlhf.config import check
from jaxrlhf.parallel import data_parallel
from jaxrlhf.rewards import describe_reward
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import check_on_policy, sample, scored_batch, online_preflight


def check_config(config, section: str, name: str) -> None:
    """The checks a stage config can make alone (`section`: its method's key, e.g. "rloo";
    `name`: the method's, e.g. "RLOO")."""
    method, train = getattr(config, section), config.train
    check_on_policy(config.sampling, method.temperature, name, section)
    check(config.missing_eos_penalty is None or config.missing_eos_penalty >= 0,
          f"missing_eos_penalty={config.missing_eos_penalty} must be >= 0 (it is subtracted)")
    k = method.num_generations
    check(train.batch_size % k == 0,
          f"train.batch_size={train.batch_size} must be a multiple of {section}.num_generations={k}: each step "
          f"samples {k} responses to each of train.batch_size / {k} prompts")
    check(train.batch_size % method.num_minibatches == 0,
          f"train.batch_size={train.batch_size} must be a multiple of {section}.num_minibatches")


def plan(config, section: str, name: str, knobs: str) -> str:
    method, train = getattr(config, section), config.train
    reward = describe_reward(config.reward)
    return (f"{name}: {config.policy} vs reward {reward}, prompts {config.prompts.path}, {train.steps} steps x "
            f"{train.batch_size // method.num_generations} prompts x {method.num_generations} samples of "
            f"{config.sampling.max_new_tokens} tokens, {method.epochs} epochs x {method.num_minibatches} "
            f"minibatches, {knobs} -> {train.output_dir}/final")


def preflight(config, section: str, resume: bool = False) -> dict:
    """Every check the run makes before it writes (the policy and its tokenizer, the mesh, the
    reward source loads, the prompts and their column, the context budget, the run folder),
    writing nothing -> what the run needs. `--dry-run` runs exactly this."""
    method = getattr(config, section)
    return online_preflight(config, section, resume, minibatches=method.num_minibatches, section=section,
                             samples_per_prompt=method.num_generations)


def training(config, section: str, make_update) -> common.Training:
    """The run's update, `make_update(config.<section>)`; the reference only with a KL (beta)."""
    method = getattr(config, section)
    return common.Training(make_update(method), method.updates_per_step,
                           reference=config.compute.dtype if method.beta else None,
                           lora=common.lora_settings(config.lora))


def run(config, section: str, make_update, resume: bool = False):
    """Train `config`'s policy with `make_update(config.<section>)` -> the final export's path."""
    method, train = getattr(config, section), config.train
    k = method.num_generations
    ready = preflight(config, section, resume)
    module, tokenizer, mesh, scorer, rows, sampler = (
        ready[key] for key in ("module", "tokenizer", "mesh", "scorer", "rows", "sampler"))
    ids, mask = ready["prompts"][:2]
    prompts_per_step = train.batch_size // k
    out, state, lr = common.start_training(ready, train, spec := training(config, section, make_update))
    update = data_parallel(spec.step, mesh, state)

    def step_fn(state, i):
        # Each prompt k times in a row: a group's rows are consecutive in the global batch, and
        # each row draws its own sample (the sampler's key folds in the row index).
        idx = np.repeat(data.batch_indices(len(rows), prompts_per_step, i, train.seed), k)
        gen_key, update_key = jax.random.split(common.step_key(train.seed, i))
        started = time.perf_counter()
        rollout = sample(module, state.model_params(state.params), ids[idx], mask[idx], gen_key, sampler, mesh)
        # A reply no reward source scored is NaN: the update leaves it out of its group, as TRL's.
        batch, reward_metrics = scored_batch(rollout, idx, ready["prompts"], tokenizer, sampler, scorer,
                                             config.missing_eos_penalty, unscored=np.nan)
        rollout_s = time.perf_counter() - started
        state, metrics = update(state, batch, update_key)
        return state, {**metrics, **reward_metrics, "time/rollout_s": rollout_s}

    state = common.train_loop(out, state, step_fn, train, resume, section, extra_metrics=lambda s: {"learning_rate": lr(s)})
    return common.export(out, module, state, tokenizer, spec.lora, config.policy)
