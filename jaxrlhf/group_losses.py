"""Critic-free policy gradients from groups of samples: RLOO (Ahmadian et al. 2024) and GRPO
(Shao et al. 2024) with the variants TRL's `GRPOTrainer` offers (Dr. GRPO, DAPO, BNPO, GSPO).

Pure functions, masks explicit, in the conventions of `jaxrlhf.losses`. A batch of `B = P * k`
rows holds `k` samples for each of `P` prompts, a group's rows consecutive (row `p * k + j` is
sample `j` of prompt `p`), so `[B]` rewards reshape to `[P, k]`. Advantages take the whole
(global) batch; the losses take `axis_name` like every loss in `losses`, returning this
device's share of the global value.
"""

import jax
import jax.numpy as jnp

from jaxrlhf.losses import _clean, _global_count, kl_penalty, masked_mean

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def _groups(x_B: jax.Array, k: int) -> jax.Array:
    if x_B.shape[0] % k:
        raise ValueError(f"{x_B.shape[0]} rows do not split into groups of {k}")
    return x_B.reshape(-1, k)


# The NaN-aware statistics below take the plain one wherever no entry is NaN: a count taken from
# the data divides differently from the constant size, and rewards with no NaN keep their
# advantages to the bit.

def nanmean(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """The mean of the non-NaN entries (torch's `nanmean`); NaN where there is none."""
    known = ~jnp.isnan(x)
    return jnp.where(jnp.all(known, axis=axis, keepdims=keepdims), jnp.mean(x, axis=axis, keepdims=keepdims),
                     jnp.mean(x, axis=axis, keepdims=keepdims, where=known))


def nanstd(x: jax.Array, axis=None) -> jax.Array:
    """The standard deviation of the non-NaN entries with Bessel's correction (TRL's `nanstd`);
    NaN where under 2 are."""
    known = ~jnp.isnan(x)
    return jnp.where(jnp.all(known, axis=axis), jnp.std(x, axis=axis, ddof=1),
                     jnp.std(x, axis=axis, ddof=1, where=known))


def _zero_nan(advantages_B: jax.Array) -> jax.Array:
    """TRL's `nan_to_num(advantages, nan=0.0)`: a row with no score, or whose baseline or std is
    undefined (no other scored row beside it), moves nothing."""
    return jnp.where(jnp.isnan(advantages_B), 0.0, advantages_B)


def rloo_advantages(rewards_B: jax.Array, k: int, normalize: bool = False) -> jax.Array:
    """RLOO: each sample's reward minus the mean reward of the other scored samples of its
    prompt -> `[B]` (they sum to zero over each group). `normalize` then whitens them over the
    batch's scored rows, (a - mean) / (std + 1e-4), as TRL's `normalize_advantages`. A NaN
    reward (every reward source returned None) is unscored, as in TRL's `RLOOTrainer`: left
    out of the baselines, its advantage 0, as is that of a row with no other scored sample."""
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs k >= 2 samples per prompt, not {k}")
    r_PxK = _groups(rewards_B.astype(jnp.float32), k)
    scored_PxK = ~jnp.isnan(r_PxK)
    others_PxK = jnp.sum(jnp.where(scored_PxK, r_PxK, 0.0), axis=1, keepdims=True) - r_PxK
    baseline_PxK = others_PxK / (jnp.sum(scored_PxK, axis=1, keepdims=True) - 1)
    advantages_B = (r_PxK - baseline_PxK).reshape(-1)
    if normalize:
        advantages_B = (advantages_B - nanmean(advantages_B)) / (nanstd(advantages_B) + STD_EPS)
    return _zero_nan(advantages_B)


def group_std(rewards_B: jax.Array, k: int, scale: str = "group") -> jax.Array:
    """The std GRPO scales each row's advantage by -> `[B]`: its group's (`group`, also what
    `none` reports), or the whole batch's (`batch`), of the non-NaN rewards (NaN under 2)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale={scale!r} is not one of {SCALE_REWARDS}")
    r = rewards_B.astype(jnp.float32)
    if scale == "batch":
        return jnp.full_like(r, nanstd(r))
    return jnp.repeat(nanstd(_groups(r, k), axis=1), k)


def group_advantages(rewards_B: jax.Array, k: int, scale: str = "group") -> jax.Array:
    """GRPO: each reward minus its group's mean, divided by `group_std(...) + 1e-4` unless
    `scale` is "none" (Dr. GRPO: no scaling, so no question-level difficulty bias) -> `[B]`,
    zero-mean over every group. A NaN reward (every reward source returned None) is unscored,
    as in TRL's `GRPOTrainer`: left out of its group's mean and of the std, its advantage 0, as
    is that of a row whose std is undefined (the only scored row of its group)."""
    r_PxK = _groups(rewards_B.astype(jnp.float32), k)
    centred_B = (r_PxK - nanmean(r_PxK, axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return _zero_nan(centred_B)
    return _zero_nan(centred_B / (group_std(rewards_B, k, scale) + STD_EPS))


def _sequence_mean(x_BxT, mask_BxT):
    return jnp.sum(x_BxT * mask_BxT, axis=-1) / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1.0)


def grpo_loss(logprobs_BxT, old_logprobs_BxT, ref_logprobs_BxT, advantages_B, mask_BxT, *, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.0, loss_type: str = "dapo",
              importance_sampling_level: str = "token", use_bias_correction_kl: bool = True,
              max_completion_length: int | None = None, num_items: jax.Array | float | None = None,
              axis_name: str | None = None):
    """GRPO's clipped surrogate with a k3 KL to the reference in the loss, as TRL computes it.

    Per token: -min(w A, clip(w, 1 - eps, 1 + eps_high) A) + beta * w * k3(pi, ref), with w =
    exp(logprobs - old_logprobs) (`importance_sampling_level="token"`) or, GSPO, one weight per
    sequence, exp of the mean log ratio over its tokens (`"sequence"`). The KL's factor w (TRL's
    `use_bias_correction_kl`, its default; DeepSeek-V3.2) is neither clipped nor detached, so it
    moves the gradient even where w = 1: beta * (grad k3 + k3 * grad logprobs), the unbiased
    gradient of the reverse KL to the reference; without it the KL term is beta * k3. Aggregated by
    `loss_type`:
    - `grpo`: mean over each sequence's tokens, then over sequences;
    - `dr_grpo`: sum over all tokens / (sequences * `max_completion_length`);
    - `dapo`: sum over all tokens / `num_items` (TRL: the active tokens of the global batch the
      optimizer step belongs to; default: this batch's active tokens);
    - `bnpo`: sum over all tokens / this batch's active tokens.
    Counts are global (over `axis_name`). `ref_logprobs` is ignored when beta is 0.
    Metrics under TRL's names: `kl` (mean per token of the KL term, w * k3 or k3), `clip_ratio/low_mean`,
    `clip_ratio/high_mean`, `clip_ratio/region_mean` (the share of tokens, or of sequences for
    GSPO, whose ratio is clipped where it would have moved the loss).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {GRPO_LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} is not one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}")
    mask = mask_BxT.astype(jnp.float32)
    logprobs, old = _clean(mask, logprobs_BxT, old_logprobs_BxT)
    if beta != 0.0:
        (ref,) = _clean(mask, ref_logprobs_BxT)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio_BxT = logprobs - old
    if importance_sampling_level == "sequence":
        log_weight = _sequence_mean(log_ratio_BxT, mask)[:, None]  # [B, 1]
    else:
        log_weight = log_ratio_BxT
    weight = jnp.exp(log_weight)
    adv = advantages_B.astype(jnp.float32)[:, None]
    per_token = -jnp.minimum(weight * adv, jnp.clip(weight, 1.0 - clip_eps, 1.0 + eps_high) * adv)
    per_token = jnp.broadcast_to(per_token, mask.shape)  # GSPO's is [B, 1]
    if beta != 0.0:
        kl_BxT = kl_penalty(logprobs, ref, "k3")
        if use_bias_correction_kl:
            kl_BxT = kl_BxT * weight  # GSPO's [B, 1] weight broadcast onto every token, as TRL
        per_token = per_token + beta * kl_BxT

    rows = _global_count(jnp.ones_like(mask[:, 0]), axis_name=axis_name)
    total = jnp.sum(jnp.where(mask > 0, per_token, 0.0))
    if loss_type == "grpo":
        loss = jnp.sum(_sequence_mean(per_token, mask)) / rows
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = total / (rows * max_completion_length)
    elif loss_type == "dapo" and num_items is not None:
        loss = total / jnp.maximum(num_items, 1.0)
    else:  # bnpo, and dapo over this batch
        loss = total / jnp.maximum(_global_count(mask, axis_name=axis_name), 1.0)

    low = ((weight < 1.0 - clip_eps) & (adv < 0)).astype(jnp.float32)
    high = ((weight > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)

    def clip_mean(x):
        if importance_sampling_level == "sequence":  # one weight per sequence: a share of sequences
            return masked_mean(x[:, 0], jnp.ones_like(x[:, 0]), axis_name=axis_name)
        return masked_mean(x, mask, axis_name=axis_name)

    metrics = {"clip_ratio/low_mean": clip_mean(low), "clip_ratio/high_mean": clip_mean(high),
               "clip_ratio/region_mean": clip_mean(jnp.maximum(low, high))}
    if beta != 0.0:
        metrics["kl"] = masked_mean(kl_BxT, mask, axis_name=axis_name)
    return loss, metrics


def rloo_loss(logprobs_BxT, old_logprobs_BxT, advantages_B, mask_BxT, *, clip_eps: float | None = 0.2,
              clip_eps_high: float | None = None, ref_logprobs_BxT=None, beta: float = 0.0,
              axis_name: str | None = None):
    """RLOO's policy loss on whole sequences (a completion is one action), mean over sequences.

    With `clip_eps`, TRL's clipped surrogate on the sequence ratio w = exp(sum of logprobs -
    sum of old logprobs): -min(w A, clip(w, 1 - eps, 1 + eps_high) A). With `clip_eps=None`,
    the paper's plain REINFORCE: -A * sum of logprobs (the same gradient at w = 1).
    With `beta` > 0 and `ref_logprobs`, the KL to the reference is a loss term instead of a
    reward penalty: + beta * the sequence's summed per-token k3 (as GRPO's, per sequence).
    Metrics under TRL's names: `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    `clip_ratio/region_mean` (shares of sequences; 0 without clipping), and `kl` (mean k3 per
    token) when the KL is in the loss.
    """
    mask = mask_BxT.astype(jnp.float32)
    logprobs, old = _clean(mask, logprobs_BxT, old_logprobs_BxT)
    logp_B, old_B = jnp.sum(logprobs, axis=-1), jnp.sum(old, axis=-1)
    adv_B = advantages_B.astype(jnp.float32)
    ones = jnp.ones_like(adv_B)
    if clip_eps is None:
        per_sequence = -adv_B * logp_B
        low = high = jnp.zeros_like(adv_B)
    else:
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        weight = jnp.exp(logp_B - old_B)
        per_sequence = -jnp.minimum(weight * adv_B, jnp.clip(weight, 1.0 - clip_eps, 1.0 + eps_high) * adv_B)
        low = ((weight < 1.0 - clip_eps) & (adv_B < 0)).astype(jnp.float32)
        high = ((weight > 1.0 + eps_high) & (adv_B > 0)).astype(jnp.float32)
    metrics = {}
    if beta != 0.0:
        (ref,) = _clean(mask, ref_logprobs_BxT)
        kl_BxT = jnp.where(mask > 0, kl_penalty(logprobs, ref, "k3"), 0.0)
        per_sequence = per_sequence + beta * jnp.sum(kl_BxT, axis=-1)
        metrics["kl"] = masked_mean(kl_BxT, mask, axis_name=axis_name)
    loss = masked_mean(per_sequence, ones, axis_name=axis_name)
    metrics |= {"clip_ratio/low_mean": masked_mean(low, ones, axis_name=axis_name),
               "clip_ratio/high_mean": masked_mean(high, ones, axis_name=axis_name),
               "clip_ratio/region_mean": masked_mean(jnp.maximum(low, high), ones, axis_name=axis_name)}
    return loss, metrics


def frac_zero_std(std_B: jax.Array) -> jax.Array:
    """TRL's `frac_reward_zero_std`: the share of rows whose (group or batch) std is 0
    (`torch.isclose(std, 0)`: |std| <= 1e-8; an undefined, NaN, std is not)."""
    return jnp.mean((jnp.abs(std_B) <= 1e-8).astype(jnp.float32))

