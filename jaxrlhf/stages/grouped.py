"""What the RLOO and GRPO stages share: k samples per prompt from the policy, scored by a
reward source, then the method's one compiled update; checkpoints, metrics and the export as
every training stage. The methods differ only in their config section and update."""

import time

import jax
import numpy as np

from jaxrlhf import data
from jaxrlhf.config import check
from jaxrlhf.parallel import data_parallel, on_host, put_state
from jaxrlhf.rewards import make_scorer
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import PROMPT_COLUMNS, check_on_policy, encode_prompt_rows, sample, sampling_config, scored_batch
from jaxrlhf.trainer import run_loop
from jaxrlhf.updates.common import TrainState


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
    reward = config.reward.model or config.reward.function
    return (f"{name}: {config.policy} vs reward {reward}, prompts {config.prompts.path}, {train.steps} steps x "
            f"{train.batch_size // method.num_generations} prompts x {method.num_generations} samples of "
            f"{config.sampling.max_new_tokens} tokens, {method.epochs} epochs x {method.num_minibatches} "
            f"minibatches, {knobs} -> {train.output_dir}/final")


def preflight(config, section: str, resume: bool = False) -> dict:
    """Every check the run makes before it writes (the policy and its tokenizer, the mesh, the
    reward source loads, the prompts and their column, the context budget, the run folder),
    writing nothing -> what the run needs. `--dry-run` runs exactly this."""
    method, train = getattr(config, section), config.train
    k = method.num_generations
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = common.load_policy(config.policy, pad_token=config.pad_token)
    mesh = common.train_mesh(train, method.num_minibatches, section)
    scorer = make_scorer(config.reward, mesh)
    rows = data.load_rows(config.prompts, tuple(PROMPT_COLUMNS["prompts"]))
    prompts_per_step = train.batch_size // k
    check(prompts_per_step <= len(rows), f"train.batch_size={train.batch_size} / {section}.num_generations={k} = "
                                         f"{prompts_per_step} prompts per step, more than the {len(rows)} prompts "
                                         f"of {config.prompts.path}")
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, train.seed)
    sampler = sampling_config(config.sampling, tokenizer, model_config)
    # Every prompt stands for k rollouts, so the batch of rollouts is drawn from len(rows) * k.
    output = common.check_output(section, train, config, resume, len(rows) * k,
                                 inputs=(config.policy, config.reward.model, config.prompts.path))
    return {"module": module, "params": params, "tokenizer": tokenizer, "mesh": mesh, "scorer": scorer, "rows": rows,
            "prompts": (ids, mask, texts), "sampler": sampler, "output": output}


def run(config, section: str, make_update, resume: bool = False):
    """Train `config`'s policy with `make_update(config.<section>)` -> the final export's path."""
    method, train = getattr(config, section), config.train
    k = method.num_generations
    ready = preflight(config, section, resume)
    module, params, tokenizer, mesh, scorer, rows, sampler = (
        ready[key] for key in ("module", "params", "tokenizer", "mesh", "scorer", "rows", "sampler"))
    ids, mask, texts = ready["prompts"]
    prompts_per_step = train.batch_size // k
    out = common.record_config(ready["output"])
    tx, lr = common.optimizer(train, method.updates_per_step)
    with on_host():
        state = TrainState.create(module, params, tx, ref_params=params if method.beta else None,
                                  skip_nonfinite=train.on_nonfinite == "skip", grad_accum_steps=train.grad_accum_steps)
    state = put_state(state, mesh)
    update = data_parallel(make_update(method), mesh, state)

    def step_fn(state, i):
        # Each prompt k times in a row: a group's rows are consecutive in the global batch, and
        # each row draws its own sample (the sampler's key folds in the row index).
        idx = np.repeat(data.batch_indices(len(rows), prompts_per_step, i, train.seed), k)
        gen_key, update_key = jax.random.split(common.step_key(train.seed, i))
        started = time.perf_counter()
        rollout = sample(module, state.params, ids[idx], mask[idx], gen_key, sampler, mesh)
        batch = scored_batch(rollout, [texts[j] for j in idx], tokenizer, scorer, config.missing_eos_penalty)
        rollout_s = time.perf_counter() - started
        state, metrics = update(state, batch, update_key)
        return state, {**metrics, "time/rollout_s": rollout_s}

    state = run_loop(out_dir=out, state=state, step_fn=step_fn, steps=train.steps, log_every=train.log_every,
                     save_every=train.save_every, keep_checkpoints=train.keep_checkpoints, resume=resume,
                     record={"stage": section}, tensorboard=train.tensorboard, desc=section,
                     extra_metrics=lambda s: {"learning_rate": lr(s)})
    return common.export(out, module, state.params, tokenizer)
