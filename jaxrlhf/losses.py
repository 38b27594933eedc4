"""Pure loss functions: no model, no optimizer, masks explicit, shapes `[B]` or `[B, T]`.

Alignment is the caller's: `logits[:, t]` score `tokens[:, t]` (shift by one for next-token
prediction before calling). Masks are 0/1 (or bool) and every value at a masked position is
ignored: it changes neither a loss nor its gradient.

Data parallelism: every scalar loss takes `axis_name`. Under `pmap` it then returns this
device's *share* of the mean over the global batch (local sum / global count), so summing the
losses, and their gradients, over the axis gives exactly the single-device result even when
devices hold different numbers of valid tokens. With `axis_name=None` it is the plain mean.
"""

import jax
import jax.numpy as jnp
from jax import lax

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo")


# The log-softmax is written so XLA fuses each reduction with its reads of the logits: no float32
# copy of `[B, T, V]` beyond the logits themselves. Measured with `memory_analysis()` on float32
# logits [2, 64, 50257] (24.5 MiB) at temperature 0.7, compiled temporaries on CPU: token_logprobs 0 MiB
# (jax.nn.logsumexp of logits / temperature: 24.5), its gradient 0; entropy 24.5 MiB (0 at
# temperature 1; jax.nn.log_softmax: 24.5), token_logprobs and entropy together 24.5 (49.1
# before). A vocabulary-chunked log-softmax (a scan over 8 slices) held 3.1 MiB: no better once
# the logits exist, so the scoring passes bound memory by scoring rows in chunks instead.
def _logsumexp(logits_BxTxV: jax.Array, temperature: float) -> jax.Array:
    """log sum exp(logits / temperature) over the vocabulary -> `[B, T]`, in float32."""
    max_BxT = lax.stop_gradient(jnp.max(logits_BxTxV, axis=-1).astype(jnp.float32))
    shifted_BxTxV = (logits_BxTxV.astype(jnp.float32) - max_BxT[..., None]) / temperature
    return jnp.log(jnp.sum(jnp.exp(shifted_BxTxV), axis=-1)) + max_BxT / temperature


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log p(tokens[b, t]) under softmax(logits[b, t] / temperature) -> `[B, T]`, in float32."""
    picked_BxT = jnp.take_along_axis(logits_BxTxV, tokens_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BxT.astype(jnp.float32) / temperature - _logsumexp(logits_BxTxV, temperature)


def entropy(logits_BxTxV: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) at each position -> `[B, T]`."""
    logp = logits_BxTxV.astype(jnp.float32) / temperature - _logsumexp(logits_BxTxV, temperature)[..., None]
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _clean(mask, *xs):
    """Zero every `x` where `mask` is 0, so junk there (even NaN) reaches no value or gradient."""
    return tuple(jnp.where(mask > 0, x, 0.0) for x in xs)


def _global_count(mask, axis=None, axis_name=None):
    count = jnp.sum(mask, axis=axis)
    return count if axis_name is None else lax.psum(count, axis_name)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None, axis_name: str | None = None) -> jax.Array:
    """Mean of `x` over `mask` (over `axis`, or everything). With `axis_name`: this device's
    share of the global mean (see the module docstring). An all-masked mean is 0, not NaN."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)
    return total / jnp.maximum(_global_count(mask, axis, axis_name), 1.0)


def masked_whiten(x_BxT: jax.Array, mask_BxT: jax.Array, shift_mean: bool = True, axis_name: str | None = None):
    """(x - mean) / std over the mask, statistics pooled across devices when `axis_name` is set
    -> `[B, T]`, 0 at masked positions. The variance is unbiased (Bessel), as in TRL; with
    `shift_mean=False` the mean is added back (only the scale changes)."""
    mask = mask_BxT.astype(jnp.float32)
    (x,) = _clean(mask, x_BxT)

    def pooled(v):
        return v if axis_name is None else lax.psum(v, axis_name)

    n = pooled(jnp.sum(mask))
    mean = pooled(jnp.sum(x * mask)) / jnp.maximum(n, 1.0)
    var = pooled(jnp.sum((x - mean) ** 2 * mask)) / jnp.maximum(n - 1.0, 1.0)
    whitened = (x - mean) * lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened * mask


def sft_loss(logits_BxTxV, labels_BxT, mask_BxT, axis_name: str | None = None) -> jax.Array:
    """Mean token negative log-likelihood of `labels` over `mask` (prompt tokens masked out)."""
    return masked_mean(-token_logprobs(logits_BxTxV, labels_BxT), mask_BxT, axis_name=axis_name)


def sequence_logprobs(logits_BxTxV, tokens_BxT, mask_BxT, average: bool = False) -> jax.Array:
    """Summed (or length-averaged) token logprobs over each row's mask -> `[B]`."""
    mask = mask_BxT.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask > 0, token_logprobs(logits_BxTxV, tokens_BxT), 0.0), axis=-1)
    return total_B / jnp.maximum(jnp.sum(mask, axis=-1), 1.0) if average else total_B


def regression_loss(pred_B: jax.Array, target_B: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Mean squared error between predicted and target scores."""
    return masked_mean((pred_B - target_B) ** 2, jnp.ones_like(pred_B), axis_name=axis_name)


def pairwise_reward_loss(r_chosen_B, r_rejected_B, margin=0.0, axis_name: str | None = None) -> jax.Array:
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected - margin) (`margin` as in
    Llama 2's reward model; scalar or `[B]`)."""
    losses_B = -jax.nn.log_sigmoid(r_chosen_B - r_rejected_B - margin)
    return masked_mean(losses_B, jnp.ones_like(losses_B), axis_name=axis_name)


def kl_penalty(logprobs_BxT: jax.Array, ref_logprobs_BxT: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || ref) from samples of pi -> `[B, T]`.

    With log r = ref - pi: k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r (unbiased and >= 0; Schulman, "Approximating KL divergence"),
    abs = |log r|.
    """
    log_ratio = ref_logprobs_BxT - logprobs_BxT
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    if estimator == "abs":
        return jnp.abs(log_ratio)
    raise ValueError(f"estimator={estimator!r} is not one of {KL_ESTIMATORS}")


def gae(rewards_BxT, values_BxT, mask_BxT, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's masked (response) tokens.

    Positions past the mask count as terminal (reward 0, value 0), as in TRL.
    -> (advantages `[B, T]`, returns = advantages + values `[B, T]`), 0 where masked.
    """
    mask = mask_BxT.astype(jnp.float32)
    rewards, values = _clean(mask, rewards_BxT, values_BxT)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas_TxB = (rewards + gamma * next_values - values).T

    def backwards(last_B, delta_B):
        adv_B = delta_B + gamma * lam * last_B
        return adv_B, adv_B

    _, adv_TxB = lax.scan(backwards, jnp.zeros_like(deltas_TxB[0]), deltas_TxB, reverse=True)
    advantages = adv_TxB.T * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT, clip_eps: float,
                    axis_name: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate: mean over the mask of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = exp(logprobs - old_logprobs). Metrics: clip fraction, approx KL (mean of (log r)^2 / 2,
    as TRL logs it), mean ratio."""
    mask = mask_BxT.astype(jnp.float32)
    logprobs_BxT, old_logprobs_BxT, advantages_BxT = _clean(mask, logprobs_BxT, old_logprobs_BxT, advantages_BxT)
    log_ratio = logprobs_BxT - old_logprobs_BxT
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_BxT * ratio
    clipped = -advantages_BxT * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask, axis_name=axis_name)
    metrics = {
        "policy/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask, axis_name=axis_name),
        "policy/approx_kl": masked_mean(0.5 * log_ratio**2, mask, axis_name=axis_name),
        "policy/ratio": masked_mean(ratio, mask, axis_name=axis_name),
    }
    return loss, metrics


def ppo_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_eps: float,
                   axis_name: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss: 0.5 * mean over the mask of max((v - R)^2, (v_clipped - R)^2), with
    v_clipped = old + clip(v - old, -eps, eps). Metrics: value clip fraction."""
    values_BxT, old_values_BxT, returns_BxT = _clean(mask_BxT, values_BxT, old_values_BxT, returns_BxT)
    clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip_eps, clip_eps)
    err_unclipped = (values_BxT - returns_BxT) ** 2
    err_clipped = (clipped - returns_BxT) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(err_unclipped, err_clipped), mask_BxT, axis_name=axis_name)
    clipfrac = masked_mean((err_clipped > err_unclipped).astype(jnp.float32), mask_BxT, axis_name=axis_name)
    return loss, {"value/clipfrac": clipfrac}


def preference_loss(pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B, beta: float, loss_type: str,
                    label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair preference losses `[B]` from sequence logprobs of the policy and the reference.

    With h = (pi_c - pi_r) - (ref_c - ref_r):
    - "sigmoid" (DPO, with conservative label smoothing eps):
      -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    - "hinge" (TRL's reference-normalised hinge, margin 1/beta): relu(1 - beta h)
    - "ipo" (Azar et al.): (h - 1 / (2 beta))^2. IPO is defined on length-averaged logprobs;
      pass averaged ones (`sequence_logprobs(..., average=True)`) to follow TRL (the IPO
      authors' normalisation).
    """
    h = (pi_chosen_B - pi_rejected_B) - (ref_chosen_B - ref_rejected_B)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type={loss_type!r} is not one of {PREFERENCE_LOSSES}")


def slic_loss(pi_chosen_B, pi_rejected_B, reg_nll_B, delta: float, reg_weight: float) -> jax.Array:
    """SLiC-HF (Zhao et al. 2023), per pair `[B]`: the rank calibration hinge on policy
    logprobs, max(0, delta - log pi(y+|x) + log pi(y-|x)), plus `reg_weight` times the SFT
    regulariser `reg_nll`. In the paper `reg_nll` is -log pi(y_ref|x), the *sequence* NLL
    (summed over tokens) of the SFT target; `make_dpo_step` passes the chosen response's."""
    return jax.nn.relu(delta - pi_chosen_B + pi_rejected_B) + reg_weight * reg_nll_B
