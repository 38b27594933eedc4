"""GRPO (Shao et al. 2024) and the variants TRL's `GRPOTrainer` offers: group-normalised
advantages over k samples per prompt, the clipped ratio (per token, or per sequence: GSPO)
with a k3 KL to the reference in the loss, and TRL's token-loss normalisations. One compiled
function scores the rollout, takes the advantages over the global batch and runs all epochs x
minibatches. Defaults follow TRL's."""

import dataclasses
import warnings
from typing import Literal

import jax.numpy as jnp
from jax import lax

from jaxrlhf import group_losses, losses
from jaxrlhf.errors import ConfigError
from jaxrlhf.updates import common
from jaxrlhf.updates.common import TrainState


# The token-sum losses: under GSPO's one ratio per sequence they weight a sequence by its length.
LENGTH_WEIGHTED = ("dr_grpo", "dapo", "bnpo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 8  # k samples per prompt (TRL's name and default)
    epochs: int = 1  # passes over each rollout (TRL's num_iterations)
    num_minibatches: int = 1  # optimizer updates per pass (TRL: steps_per_generation / grad accumulation)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO's clip-higher (0.28 in the paper); null: clip_eps
    beta: float = 0.0  # the KL coefficient (TRL's default: no KL, no reference pass)
    # Advantages divided by the std of each group, of the batch (PPO-Lite), or not (Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # grpo: per-sequence mean, then batch mean; dr_grpo: sum / (batch * max_new_tokens); dapo:
    # sum / active tokens of the rollout per optimizer update; bnpo: sum / the minibatch's tokens.
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    # The KL term times the (unclipped, differentiable) ratio: the unbiased reverse-KL gradient
    # (DeepSeek-V3.2). TRL's name and default; it changes the gradient whenever beta > 0.
    use_bias_correction_kl: bool = True
    temperature: float = 1.0  # must equal the sampling temperature of the rollout

    @property
    def updates_per_step(self) -> int:
        return self.epochs * self.num_minibatches

    def __post_init__(self):
        common.check_group_config(self, "advantages compare the samples of a prompt")
        if self.importance_sampling_level == "sequence" and self.loss_type in LENGTH_WEIGHTED:
            # TRL warns about the same pairing (GRPOTrainer.__init__).
            warnings.warn(f"importance_sampling_level='sequence' with loss_type={self.loss_type!r} sums per-token "
                          "contributions, which weights each sequence by its completion length instead of optimizing "
                          "the per-sequence objective; for the GSPO paper's setup set loss_type='grpo'", stacklevel=3)


def make_grpo_update(config: GRPOConfig, axis_name: str | None = None):
    """-> `update(state, batch, key) -> (state, metrics)`; the state and batch as in
    `make_rloo_update` (`state.reference` is read only when beta > 0). `dr_grpo`'s constant
    is the response width N (the sampler's max_new_tokens), TRL's max_completion_length."""
    k = config.num_generations

    def outputs(params, apply_fn, seq, attn, n):
        return common.response_outputs(apply_fn, params, seq, attn, n, config.temperature)

    def update(state: TrainState, batch, key):
        seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"].astype(jnp.float32)
        n = resp.shape[1]
        devices = 1 if axis_name is None else lax.axis_size(axis_name)
        scored = {"seq": seq, "attn": attn, "resp": resp}
        # With one update per rollout its own logprobs are the old ones: no extra pass (as TRL).
        def logprobs(params):
            return common.score_responses(state, params, seq, attn, n, config.temperature,
                                          config.num_minibatches)["logprobs"]

        if config.updates_per_step > 1:
            scored["old_logprobs"] = logprobs(state.model_params(state.params))
        if config.beta != 0.0:
            scored["ref_logprobs"] = logprobs(state.reference)
        scores_all = common.all_rows(lax.stop_gradient(batch["scores"].astype(jnp.float32)), axis_name)
        if scores_all.shape[0] % k:
            raise ConfigError(f"{scores_all.shape[0]} rollouts do not split into groups of num_generations={k}")
        scored["advantages"] = common.own_rows(
            group_losses.group_advantages(scores_all, k, config.scale_rewards), axis_name)
        # dapo's normaliser, TRL's: the rollout's active tokens per optimizer update, i.e. this
        # many tokens per row of the (micro)batch an update's loss sees.
        tokens_per_row = common.global_mean(jnp.sum(resp, axis=-1), axis_name)

        def loss_fn(params, batch):
            logits, logprobs, _ = outputs(params, state.apply_fn, batch["seq"], batch["attn"], n)
            old_logprobs = batch["old_logprobs"] if "old_logprobs" in batch else lax.stop_gradient(logprobs)
            loss, loss_metrics = group_losses.grpo_loss(
                logprobs, old_logprobs, batch.get("ref_logprobs"), batch["advantages"], batch["resp"],
                clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, beta=config.beta,
                loss_type=config.loss_type, importance_sampling_level=config.importance_sampling_level,
                use_bias_correction_kl=config.use_bias_correction_kl, max_completion_length=n,
                num_items=common.rows(batch) * devices * tokens_per_row, axis_name=axis_name)
            entropy = losses.masked_mean(losses.entropy(logits, config.temperature), batch["resp"],
                                         axis_name=axis_name)
            return loss, {**loss_metrics, "entropy": entropy}

        # bnpo is a mean over the tokens of what the update sees; the other losses are row means
        # (dapo's and dr_grpo's denominators are fixed per row), so microbatches weigh by rows.
        count_fn = (lambda batch: jnp.sum(batch["resp"])) if config.loss_type == "bnpo" else common.rows
        state, train_metrics = common.minibatch_epochs(state, loss_fn, scored, count_fn, key, config.epochs,
                                                       config.num_minibatches, axis_name)
        scale = "group" if config.scale_rewards == "none" else config.scale_rewards  # TRL reports the group's
        metrics = common.group_rollout_metrics(scores_all, group_losses.group_std(scores_all, k, scale), resp,
                                               axis_name)
        return state, {**{name: jnp.mean(v) for name, v in train_metrics.items()}, **metrics}

    return update
