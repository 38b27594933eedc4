"""PPO for a causal LM policy (GPT-2, Llama) with a value head: the whole update as one compiled function.

`make_ppo_update` scores a rollout (policy logprobs and values, reference logprobs, and the
reward when a jittable reward function is given), builds per-token rewards (KL penalty to
the reference on every response token, the score on the last real one), runs GAE, whitens
the advantages, then all epochs x minibatches as nested `lax.scan`s. Nothing returns to
Python inside. Defaults follow TRL's PPO and "The N Implementation Details of RLHF with PPO".
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxrlhf import losses
from jaxrlhf.errors import ConfigError
from jaxrlhf.parallel import psum
from jaxrlhf.updates import common
from jaxrlhf.updates.common import TrainState


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    epochs: int = 4
    num_minibatches: int = 1
    clip_eps: float = 0.2
    vf_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0  # must equal the sampling temperature of the rollout
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    kl_coef: float = 0.05  # the initial coefficient; stays fixed unless kl_target is set
    kl_target: float | None = None  # adaptive control (Ziegler et al.) toward this KL
    kl_horizon: int = 10000

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per PPO iteration: every epoch takes one per minibatch."""
        return self.epochs * self.num_minibatches

    def __post_init__(self):
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={self.kl_estimator!r} is not one of {list(losses.KL_ESTIMATORS)}")
        for name in ("epochs", "num_minibatches", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")


def check_kl_horizon(config: PPOConfig, n_rollouts: int) -> None:
    """Refuse an adaptive controller whose factor could reach 0 or below: with the error
    clipped at -0.2, 1 - 0.2 * n_rollouts / horizon > 0 needs horizon > n_rollouts / 5. (A
    zero or negative coefficient would turn the KL leash off or into a reward for drifting.)"""
    if config.kl_target is not None and 5 * config.kl_horizon <= n_rollouts:
        raise ConfigError(f"kl_horizon={config.kl_horizon} must exceed rollouts per update / 5 = {n_rollouts} / 5 "
                          "with kl_target set, or the adaptive KL coefficient can reach 0 or below")


def update_kl_coef(coef: jax.Array, kl: jax.Array, n_steps, config: PPOConfig) -> jax.Array:
    """The KL controller. Fixed when `config.kl_target` is None; else Ziegler et al.'s
    adaptive rule: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, which
    stays positive when `check_kl_horizon(config, n_steps)` passes."""
    if config.kl_target is None:
        return coef
    error = jnp.clip(kl / config.kl_target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / config.kl_horizon)


def make_ppo_update(config: PPOConfig, reward_fn: Callable | None = None, axis_name: str | None = None):
    """-> `update(state, batch, key) -> (state, metrics)`.

    `state.apply_fn` is a causal LM with `value_head=True`; `state.reference` the frozen
    reference (same module, e.g. the initial params); `state.kl_coef` the KL coefficient.
    Batch: `sequences` `[B, P + N]` (left-padded prompt then response), `attention_mask`
    `[B, P + N]`, `response_mask` `[B, N]`, and `scores` `[B]` unless `reward_fn` is given:
    `reward_fn(state.reward_params, sequences, attention_mask, response_mask) -> [B]`, traced
    into the update.
    Each epoch's minibatches are one permutation of the whole rollout (all devices), so N
    devices give the one-device update; with `state.grad_accum_steps` = k each minibatch is
    split into k microbatches (see `apply_loss`).
    """

    def response_outputs(params, apply_fn, seq, attn, n):
        return common.response_outputs(apply_fn, params, seq, attn, n, config.temperature)

    def update(state: TrainState, batch, key):
        seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"].astype(jnp.float32)
        b, n = resp.shape
        n_rollouts = b * (1 if axis_name is None else lax.axis_size(axis_name))
        check_kl_horizon(config, n_rollouts)  # shapes are static: this runs once, at trace time
        old = common.score_responses(state, state.model_params(state.params), seq, attn, n, config.temperature,
                                     config.num_minibatches, entropy=True)
        old_logprobs, old_values = old["logprobs"], old["values"]
        entropy_per_token = psum(losses.masked_mean(old["entropy"], resp, axis_name=axis_name), axis_name)
        ref_logprobs = common.score_responses(state, state.reference, seq, attn, n, config.temperature,
                                              config.num_minibatches)["logprobs"]
        scores = batch["scores"] if reward_fn is None else reward_fn(state.reward_params, seq, attn, batch["response_mask"])
        scores = lax.stop_gradient(scores.astype(jnp.float32))

        # where, not a product: a logprob of -inf after EOS gives inf there, and inf * 0 = NaN.
        kl = jnp.where(resp > 0, losses.kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator), 0.0)
        last_real = jax.nn.one_hot(jnp.sum(resp, axis=-1).astype(jnp.int32) - 1, n)
        rewards = -state.kl_coef * kl + last_real * scores[:, None]
        if config.whiten_rewards:
            rewards = losses.masked_whiten(rewards, resp, shift_mean=False, axis_name=axis_name)
        advantages, returns = losses.gae(rewards, old_values, resp, config.gamma, config.lam)
        advantages = losses.masked_whiten(advantages, resp, axis_name=axis_name)

        scored = {"seq": seq, "attn": attn, "resp": resp, "old_logprobs": old_logprobs, "old_values": old_values,
                  "advantages": advantages, "returns": returns}

        def loss_fn(params, batch):
            _, logprobs, values = response_outputs(params, state.apply_fn, batch["seq"], batch["attn"], n)
            pg, pg_metrics = losses.ppo_policy_loss(
                logprobs, batch["old_logprobs"], batch["advantages"], batch["resp"], config.clip_eps, axis_name)
            vf, vf_metrics = losses.ppo_value_loss(
                values, batch["old_values"], batch["returns"], batch["resp"], config.vf_clip_eps, axis_name)
            return pg + config.vf_coef * vf, {"policy/loss": pg, "value/loss": vf, **pg_metrics, **vf_metrics}

        # Every loss and metric is a mean over response tokens.
        state, train_metrics = common.minibatch_epochs(state, loss_fn, scored, lambda batch: jnp.sum(batch["resp"]),
                                                       key, config.epochs, config.num_minibatches, axis_name)

        def global_mean(x_B):
            return common.global_mean(x_B, axis_name)

        kl_per_seq = jnp.sum(kl, axis=-1)
        mean_kl = global_mean(kl_per_seq)
        score_mean = global_mean(scores)
        metrics = {
            **jax.tree.map(jnp.mean, train_metrics),
            "objective/scores": score_mean,
            "objective/scores_std": jnp.sqrt(jnp.maximum(global_mean(scores**2) - score_mean**2, 0.0)),
            "objective/kl": mean_kl,
            "objective/kl_coef": state.kl_coef,
            "objective/non_score_reward": -state.kl_coef * mean_kl,
            # TRL's objective/entropy: the sampled response's negative logprob, summed over its tokens.
            "objective/entropy": global_mean(-jnp.sum(jnp.where(resp > 0, old_logprobs, 0.0), axis=-1)),
            "policy/entropy_per_token": entropy_per_token,
            "response_length": global_mean(jnp.sum(resp, axis=-1)),
        }
        state = state.replace(kl_coef=update_kl_coef(state.kl_coef, mean_kl, n_rollouts, config))
        return state, metrics

    return update
