"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over k samples per
prompt, no value head. One compiled function scores the rollout (policy and reference
logprobs), shapes the rewards with the KL to the reference, takes the leave-one-out
advantages over the global batch, then runs all epochs x minibatches. Defaults follow TRL's
`RLOOTrainer`."""

import dataclasses
from typing import Literal

import jax.numpy as jnp
from jax import lax

from jaxrlhf import group_losses, losses
from jaxrlhf.errors import ConfigError
from jaxrlhf.parallel import psum
from jaxrlhf.updates import common
from jaxrlhf.updates.common import TrainState


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
    num_generations: int = 2  # k samples per prompt (TRL's name and default)
    epochs: int = 1  # passes over each rollout (TRL's num_iterations)
    num_minibatches: int = 1
    # The sequence ratio's clip; null: plain REINFORCE (-A log pi), on-policy only (one update per rollout).
    clip_eps: float | None = 0.2
    clip_eps_high: float | None = None  # the upper clip, when it differs (DAPO's clip-higher)
    beta: float = 0.05  # the KL coefficient
    # "reward": TRL's and the paper's sequence-level shaping, score - beta * sum of k1 over the
    # response, before the baseline; "loss": beta * the summed per-token k3 as a loss term.
    kl_penalty: Literal["reward", "loss"] = "reward"
    normalize_advantages: bool = False  # whiten the advantages over the batch (TRL's option)
    temperature: float = 1.0  # must equal the sampling temperature of the rollout

    @property
    def updates_per_step(self) -> int:
        return self.epochs * self.num_minibatches

    def __post_init__(self):
        common.check_group_config(self, "the leave-one-out baseline of a sample is the mean of the others of its "
                                        "prompt")
        if self.clip_eps is None and self.updates_per_step > 1:
            raise ConfigError(f"clip_eps=null (REINFORCE, no importance weight) needs one update per rollout, not "
                              f"epochs x num_minibatches = {self.epochs} x {self.num_minibatches}: later updates "
                              f"would use stale samples unweighted; set clip_eps or epochs=1 and num_minibatches=1")


def make_rloo_update(config: RLOOConfig, axis_name: str | None = None):
    """-> `update(state, batch, key) -> (state, metrics)`.

    `state.apply_fn` is a causal LM's (GPT-2, Llama); `state.reference` the frozen reference. Batch:
    `sequences` `[B, P + N]` (left-padded prompt then response), `attention_mask`, `response_mask`
    `[B, N]` and `scores` `[B]`, the B rows `num_generations` samples of each prompt in turn
    (row `p * k + j` is sample j of prompt p), over the global batch (under pmap, every
    device's rows in order)."""
    k = config.num_generations

    def outputs(params, apply_fn, seq, attn, n):
        return common.response_outputs(apply_fn, params, seq, attn, n, config.temperature)

    def update(state: TrainState, batch, key):
        seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"].astype(jnp.float32)
        n = resp.shape[1]
        def logprobs(params):
            return common.score_responses(state, params, seq, attn, n, config.temperature,
                                          config.num_minibatches)["logprobs"]

        old_logprobs = logprobs(state.model_params(state.params))
        scores = lax.stop_gradient(batch["scores"].astype(jnp.float32))
        rewards = scores
        scored = {"seq": seq, "attn": attn, "resp": resp, "old_logprobs": old_logprobs}
        metrics = {}
        if config.beta != 0.0:
            ref_logprobs = logprobs(state.reference)
            if config.kl_penalty == "reward":
                # where, not a product: a logprob of -inf after EOS gives inf there, and inf * 0 = NaN.
                kl_BxN = jnp.where(resp > 0, losses.kl_penalty(old_logprobs, ref_logprobs, "k1"), 0.0)
                rewards = scores - config.beta * jnp.sum(kl_BxN, axis=-1)
                metrics["kl"] = psum(losses.masked_mean(kl_BxN, resp, axis_name=axis_name), axis_name)
            else:
                scored["ref_logprobs"] = ref_logprobs
        rewards_all = common.all_rows(rewards, axis_name)
        if rewards_all.shape[0] % k:
            raise ConfigError(f"{rewards_all.shape[0]} rollouts do not split into groups of num_generations={k}")
        scored["advantages"] = common.own_rows(
            group_losses.rloo_advantages(rewards_all, k, config.normalize_advantages), axis_name)

        def loss_fn(params, batch):
            logits, logprobs, _ = outputs(params, state.apply_fn, batch["seq"], batch["attn"], n)
            loss, loss_metrics = group_losses.rloo_loss(
                logprobs, batch["old_logprobs"], batch["advantages"], batch["resp"], clip_eps=config.clip_eps,
                clip_eps_high=config.clip_eps_high, ref_logprobs_BxT=batch.get("ref_logprobs"),
                beta=config.beta if config.kl_penalty == "loss" else 0.0, axis_name=axis_name)
            entropy = losses.masked_mean(losses.entropy(logits, config.temperature), batch["resp"],
                                         axis_name=axis_name)
            return loss, {**loss_metrics, "entropy": entropy}

        # The loss is a mean over sequences.
        state, train_metrics = common.minibatch_epochs(state, loss_fn, scored, common.rows, key, config.epochs,
                                                       config.num_minibatches, axis_name)
        metrics |= common.group_rollout_metrics(common.all_rows(scores, axis_name),
                                                group_losses.group_std(rewards_all, k), resp, axis_name)
        return state, {**{name: jnp.mean(v) for name, v in train_metrics.items()}, **metrics}

    return update
