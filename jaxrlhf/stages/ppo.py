"""PPO against a reward source, with a KL leash to the frozen starting policy."""

import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxrlhf import data
from jaxrlhf.config import DataConfig, RewardSource, SamplingSection, TrainConfig, check
from jaxrlhf.parallel import data_parallel, host_share, unreplicate
from jaxrlhf.ppo import PPOConfig, check_kl_horizon, make_ppo_update
from jaxrlhf.rewards import make_scorer, penalise_missing_eos
from jaxrlhf.sampling import generate
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import decode_responses, encode_prompt_rows, sampling_config
from jaxrlhf.steps import TrainState
from jaxrlhf.trainer import run_loop


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

    def __post_init__(self):
        check(self.ppo.temperature == self.sampling.temperature,
              f"ppo.temperature={self.ppo.temperature} must equal sampling.temperature={self.sampling.temperature} "
              "(the update must score tokens under the distribution that sampled them)")
        s = self.sampling
        off_policy = {"sampling.top_k": s.top_k != 0, "sampling.top_p": s.top_p != 1.0,
                      "sampling.greedy": s.greedy, "sampling.min_new_tokens": s.min_new_tokens != 0}
        changed = [k for k, on in off_policy.items() if on]
        check(not changed, f"{', '.join(changed)} would make PPO off-policy: the update scores old, reference and "
                           "new logprobs under the tempered softmax, so rollouts must be drawn from it (set "
                           "top_k: 0, top_p: 1.0, greedy: false, min_new_tokens: 0)")
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted)")
        check(self.train.batch_size % self.ppo.num_minibatches == 0,
              f"train.batch_size={self.train.batch_size} must be a multiple of ppo.num_minibatches")
        check_kl_horizon(self.ppo, self.train.batch_size)
        per_device = self.train.batch_size // self.train.devices // self.ppo.num_minibatches
        check(per_device % self.train.grad_accum_steps == 0,
              f"train.grad_accum_steps={self.train.grad_accum_steps} must divide the {per_device} rows of each "
              f"minibatch on a device (train.batch_size={self.train.batch_size} / train.devices="
              f"{self.train.devices} / ppo.num_minibatches={self.ppo.num_minibatches})")


def plan(config: PPOStageConfig) -> str:
    reward = config.reward.model or config.reward.function
    kl = f"adaptive toward {config.ppo.kl_target}" if config.ppo.kl_target else "fixed"
    return (f"PPO: {config.policy} vs reward {reward}, prompts {config.prompts.path}, {config.train.steps} steps x "
            f"{config.train.batch_size} rollouts of {config.sampling.max_new_tokens} tokens, {config.ppo.epochs} "
            f"epochs x {config.ppo.num_minibatches} minibatches, KL coef {config.ppo.kl_coef} ({kl}) "
            f"-> {config.train.output_dir}/final")


def run(config: PPOStageConfig, resume: bool = False):
    train = config.train
    module, params, model_config, tokenizer = common.load_policy(config.policy, value_head=True,
                                                                 rng=jax.random.key(train.seed))
    scorer = make_scorer(config.reward)
    rows = data.load_rows(config.prompts, ("prompt",))
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, train.seed)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    out = common.prepare_output("ppo", train, config, resume, len(rows),
                                inputs=(config.policy, config.reward.model, config.prompts.path))
    tx, lr = common.optimizer(train, config.ppo.updates_per_step)
    state = TrainState.create(module, params, tx, ref_params=jax.tree.map(jnp.array, params),
                              kl_coef=jnp.float32(config.ppo.kl_coef), skip_nonfinite=train.on_nonfinite == "skip",
                              grad_accum_steps=train.grad_accum_steps)
    update = data_parallel(lambda axis: make_ppo_update(config.ppo, axis_name=axis), train.devices)

    def step_fn(state, i):
        idx = host_share(data.batch_indices(len(rows), train.batch_size, i, train.seed))
        gen_key, update_key = jax.random.split(common.step_key(train.seed, i))
        started = time.perf_counter()
        # Rollouts are sampled on the first device (so they do not depend on the device
        # count); the update that follows is data parallel.
        params = state.params if train.devices == 1 else unreplicate(state.params)
        rollout = generate(module, params, jnp.asarray(ids[idx]), jnp.asarray(mask[idx]), gen_key, settings)
        responses = decode_responses(tokenizer, rollout)
        scores = scorer([texts[j] for j in idx], responses)
        if config.missing_eos_penalty is not None:
            scores = penalise_missing_eos(scores, rollout, tokenizer.eos_token_id, config.missing_eos_penalty)
        batch = {"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
                 "response_mask": rollout.response_mask, "scores": jnp.asarray(scores)}
        rollout_s = time.perf_counter() - started
        state, metrics = update(state, batch, update_key)
        return state, {**metrics, "time/rollout_s": rollout_s}

    state = run_loop(out_dir=out, state=state, step_fn=step_fn, steps=train.steps, log_every=train.log_every,
                     save_every=train.save_every, keep_checkpoints=train.keep_checkpoints, resume=resume,
                     record={"stage": "ppo"}, tensorboard=train.tensorboard, devices=train.devices, desc="ppo",
                     extra_metrics=lambda s: {"learning_rate": lr(s)})
    # The export is the plain LM (the value head stays in the checkpoints).
    lm_params = {"transformer": jax.device_get(state.params)["transformer"]}
    return common.export(out, module.clone(value_head=False), lm_params, tokenizer)
