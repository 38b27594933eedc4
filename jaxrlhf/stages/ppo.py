"""PPO against a reward source, with a KL leash to the frozen starting policy."""

import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxrlhf import data
from jaxrlhf.config import DataConfig, RewardSource, SamplingSection, TrainConfig, check, pad_token_key
from jaxrlhf.parallel import data_parallel, on_host, put_state
from jaxrlhf.updates.ppo import PPOConfig, check_kl_horizon, make_ppo_update
from jaxrlhf.rewards import make_scorer
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import PROMPT_COLUMNS, check_on_policy, encode_prompt_rows, sample, sampling_config, scored_batch
from jaxrlhf.updates.common import TrainState
from jaxrlhf.trainer import run_loop


COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class PPOStageConfig:
    policy: str  # the starting policy (usually the SFT export); also the frozen reference
    reward: RewardSource
    prompts: DataConfig
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # batch_size = rollouts per step
    # TRL's missing_eos_penalty: subtracted from the score of a rollout that never emitted EOS
    # (a reply cut at max_new_tokens), so rambling does not pay. Off when null.
    missing_eos_penalty: float | None = None
    pad_token: str | None = pad_token_key()  # the policy's (the reward model's: reward.pad_token)

    def __post_init__(self):
        check_on_policy(self.sampling, self.ppo.temperature, "PPO", "ppo")
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted)")
        check(self.train.batch_size % self.ppo.num_minibatches == 0,
              f"train.batch_size={self.train.batch_size} must be a multiple of ppo.num_minibatches")
        check_kl_horizon(self.ppo, self.train.batch_size)


def plan(config: PPOStageConfig) -> str:
    reward = config.reward.model or config.reward.function
    kl = f"adaptive toward {config.ppo.kl_target}" if config.ppo.kl_target else "fixed"
    return (f"PPO: {config.policy} vs reward {reward}, prompts {config.prompts.path}, {config.train.steps} steps x "
            f"{config.train.batch_size} rollouts of {config.sampling.max_new_tokens} tokens, {config.ppo.epochs} "
            f"epochs x {config.ppo.num_minibatches} minibatches, KL coef {config.ppo.kl_coef} ({kl}) "
            f"-> {config.train.output_dir}/final")


def preflight(config: PPOStageConfig, resume: bool = False) -> dict:
    """Every check the run makes before it writes (the policy and its tokenizer, the mesh, the
    reward source loads, the prompts and their column, the context budget, the run folder),
    writing nothing -> what the run needs. `--dry-run` runs exactly this."""
    train = config.train
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = common.load_policy(
            config.policy, pad_token=config.pad_token, value_head=True, rng=jax.random.key(train.seed))
    mesh = common.train_mesh(train, config.ppo.num_minibatches)
    scorer = make_scorer(config.reward, mesh)
    rows = data.load_rows(config.prompts, tuple(COLUMNS["prompts"]))
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, train.seed)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    output = common.check_output("ppo", train, config, resume, len(rows),
                                 inputs=(config.policy, config.reward.model, config.prompts.path))
    return {"module": module, "params": params, "tokenizer": tokenizer, "mesh": mesh, "scorer": scorer, "rows": rows,
            "prompts": (ids, mask, texts), "settings": settings, "output": output}


def run(config: PPOStageConfig, resume: bool = False):
    train = config.train
    ready = preflight(config, resume)
    module, params, tokenizer, mesh, scorer, rows, settings = (
        ready[k] for k in ("module", "params", "tokenizer", "mesh", "scorer", "rows", "settings"))
    ids, mask, texts = ready["prompts"]
    out = common.record_config(ready["output"])
    tx, lr = common.optimizer(train, config.ppo.updates_per_step)
    with on_host():
        state = TrainState.create(module, params, tx, ref_params=params,
                                  kl_coef=jnp.float32(config.ppo.kl_coef),
                                  skip_nonfinite=train.on_nonfinite == "skip", grad_accum_steps=train.grad_accum_steps)
    state = put_state(state, mesh)
    update = data_parallel(make_ppo_update(config.ppo), mesh, state)

    def step_fn(state, i):
        idx = data.batch_indices(len(rows), train.batch_size, i, train.seed)
        gen_key, update_key = jax.random.split(common.step_key(train.seed, i))
        started = time.perf_counter()
        rollout = sample(module, state.params, ids[idx], mask[idx], gen_key, settings, mesh)
        batch = scored_batch(rollout, [texts[j] for j in idx], tokenizer, scorer, config.missing_eos_penalty)
        rollout_s = time.perf_counter() - started
        state, metrics = update(state, batch, update_key)
        return state, {**metrics, "time/rollout_s": rollout_s}

    state = run_loop(out_dir=out, state=state, step_fn=step_fn, steps=train.steps, log_every=train.log_every,
                     save_every=train.save_every, keep_checkpoints=train.keep_checkpoints, resume=resume,
                     record={"stage": "ppo"}, tensorboard=train.tensorboard, desc="ppo",
                     extra_metrics=lambda s: {"learning_rate": lr(s)})
    # The export is the plain LM (the value head stays in the checkpoints).
    lm_params = {k: v for k, v in state.params.items() if k != "v_head"}
    return common.export(out, module.clone(value_head=False), lm_params, tokenizer)
