"""PPO against a reward source, with a KL leash to the frozen starting policy."""

import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxrlhf import data
from jaxrlhf.config import (ComputeConfig, DataConfig, LoRAConfig, Reward, SamplingSection,
                            TrainConfig, check, pad_token_key)
from jaxrlhf.parallel import data_parallel
from jaxrlhf.rewards import describe_reward
from jaxrlhf.updates.ppo import PPOConfig, check_kl_horizon, make_ppo_update
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import PROMPT_COLUMNS, check_on_policy, sample, scored_batch, online_preflight


COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class PPOStageConfig:
    policy: str  # the starting policy (usually the SFT export); also the frozen reference
    reward: Reward  # one source, or a list of weighted sources
    prompts: DataConfig
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # batch_size = rollouts per step
    # TRL's missing_eos_penalty: subtracted from the score of a rollout that never emitted EOS
    # (a reply cut at max_new_tokens), so rambling does not pay. Off when null.
    missing_eos_penalty: float | None = None
    pad_token: str | None = pad_token_key()  # the policy's (the reward model's: reward.pad_token)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # every model the stage runs
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        check_on_policy(self.sampling, self.ppo.temperature, "PPO", "ppo")
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted)")
        check(self.train.batch_size % self.ppo.num_minibatches == 0,
              f"train.batch_size={self.train.batch_size} must be a multiple of ppo.num_minibatches")
        check_kl_horizon(self.ppo, self.train.batch_size)


def plan(config: PPOStageConfig) -> str:
    reward = describe_reward(config.reward)
    kl = f"adaptive toward {config.ppo.kl_target}" if config.ppo.kl_target else "fixed"
    return (f"PPO: {config.policy} vs reward {reward}, prompts {config.prompts.path}, {config.train.steps} steps x "
            f"{config.train.batch_size} rollouts of {config.sampling.max_new_tokens} tokens, {config.ppo.epochs} "
            f"epochs x {config.ppo.num_minibatches} minibatches, KL coef {config.ppo.kl_coef} ({kl}) "
            f"-> {config.train.output_dir}/final")


def preflight(config: PPOStageConfig, resume: bool = False) -> dict:
    """Every check the run makes before it writes (the policy and its tokenizer, the mesh, the
    reward source loads, the prompts and their column, the context budget, the run folder),
    writing nothing -> what the run needs. `--dry-run` runs exactly this."""
    return online_preflight(config, "ppo", resume, value_head=True, minibatches=config.ppo.num_minibatches)


def training(config: PPOStageConfig) -> common.Training:
    return common.Training(make_ppo_update(config.ppo), config.ppo.updates_per_step, reference=config.compute.dtype,
                           fields={"kl_coef": jnp.float32(config.ppo.kl_coef)}, lora=common.lora_settings(config.lora))


def run(config: PPOStageConfig, resume: bool = False):
    train = config.train
    ready = preflight(config, resume)
    module, tokenizer, mesh, scorer, rows, sampler = (
        ready[k] for k in ("module", "tokenizer", "mesh", "scorer", "rows", "sampler"))
    ids, mask = ready["prompts"][:2]
    out, state, lr = common.start_training(ready, train, spec := training(config))
    update = data_parallel(spec.step, mesh, state)

    def step_fn(state, i):
        idx = data.batch_indices(len(rows), train.batch_size, i, train.seed)
        gen_key, update_key = jax.random.split(common.step_key(train.seed, i))
        started = time.perf_counter()
        rollout = sample(module, state.model_params(state.params), ids[idx], mask[idx], gen_key, sampler, mesh)
        batch, reward_metrics = scored_batch(rollout, idx, ready["prompts"], tokenizer, sampler, scorer,
                                             config.missing_eos_penalty)
        rollout_s = time.perf_counter() - started
        state, metrics = update(state, batch, update_key)
        return state, {**metrics, **reward_metrics, "time/rollout_s": rollout_s}

    state = common.train_loop(out, state, step_fn, train, resume, "ppo", extra_metrics=lambda s: {"learning_rate": lr(s)})
    return common.export(out, module, state, tokenizer, spec.lora, config.policy)
