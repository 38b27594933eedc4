"""Train state, optimizer and the update-function factories for SFT, reward and DPO / SLiC.

Each factory returns a pure `step(state, batch, key) -> (state, metrics)` written for one
device: `parallel.data_parallel` compiles it for a mesh of any size (the stages' path). With
`axis_name` set, run it under `parallel.pmap_step` instead: the gradients and metrics are
summed over devices as global-mean shares (see `losses`). Either way N devices give the
one-device update on the same global batch. PPO's update lives in `ppo.py`.

Batches are dicts of arrays; each factory's docstring lists the keys it reads.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from jaxrlhf import losses
from jaxrlhf.errors import ConfigError
from jaxrlhf.parallel import constrain_rows, psum

Params = Any
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Trained params and optimizer state, plus the frozen params a stage scores with.

    Frozen params travel in the state (not in a closure) so they stay arguments of the
    compiled step instead of being baked into it as constants."""

    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    step: jax.Array
    params: Params
    opt_state: Any
    ref_params: Params | None = None  # the frozen reference policy (DPO, PPO)
    reward_params: Params | None = None  # a reward model scored inside the PPO update
    kl_coef: jax.Array | None = None  # PPO's KL penalty coefficient
    # On a NaN/inf loss or gradient: False applies the update anyway (the loop then stops the
    # run); True leaves params and optimizer state as they were and reports skipped=1.
    skip_nonfinite: bool = struct.field(pytree_node=False, default=False)
    # Microbatches per update: each batch's rows are split into this many, run one after another
    # inside the one compiled update (only one microbatch's activations are held at a time).
    grad_accum_steps: int = struct.field(pytree_node=False, default=1)

    @classmethod
    def create(cls, module, params, tx, **frozen) -> "TrainState":
        return cls(apply_fn=module.apply, tx=tx, step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=tx.init(params), **frozen)


def make_optimizer(
    learning_rate: float,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and a warm-up then constant / linear / cosine schedule
    -> (optimizer, schedule). `warmup_steps` and `total_steps` count optimizer updates: the
    schedule is evaluated at the optimizer's own update count."""
    decays = {"constant": None, "linear": "linear", "cosine": "cosine"}
    if schedule not in decays:
        raise ConfigError(f"schedule={schedule!r} is not one of {sorted(decays)}")
    if schedule != "constant" and not total_steps:
        raise ConfigError(f"schedule={schedule!r} needs total_steps")
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else None
    decay_steps = max((total_steps or 0) - warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(learning_rate),
        "linear": optax.linear_schedule(learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(learning_rate, decay_steps),
    }[schedule]
    lr = optax.join_schedules([warmup, after], [warmup_steps]) if warmup else after
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    tx = optax.chain(*parts, optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return tx, lr


def rows(batch) -> jax.Array:
    """The number of rows of a batch: the count a per-row mean divides by (see `apply_loss`)."""
    return jnp.float32(jax.tree.leaves(batch)[0].shape[0])


def apply_loss(state: TrainState, loss_fn, batch, count_fn, axis_name: str | None) -> tuple[TrainState, Metrics]:
    """One optimizer update on the whole `batch` (arrays with rows on axis 0).

    `loss_fn(params, batch) -> (loss share, metric shares)`: means over `count_fn(batch)`
    (the loss's denominator on this device's batch: its tokens, or `rows`), as shares of the
    mean over devices when `axis_name` is set. The batch is split into
    `state.grad_accum_steps` = k microbatches `[k, B / k, ...]`, microbatch j holding rows
    j, j + k, j + 2k, ... (so that on a mesh each device's rows split among all k), run one
    after another (`lax.scan`); each microbatch's loss, gradient and metrics are scaled by its
    share of the whole batch's count, so their sum (then over devices) is the whole batch's
    mean: k microbatches give the update of one, however their token counts differ."""
    k = state.grad_accum_steps
    b = jax.tree.leaves(batch)[0].shape[0]
    if b % k:
        raise ConfigError(f"a batch of {b} rows does not split into grad_accum_steps={k} microbatches")
    micro = constrain_rows(jax.tree.map(lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1), batch), axis=1)
    counts_K = psum(jax.vmap(count_fn)(micro), axis_name)  # each microbatch's count on all devices
    weights_K = counts_K / jnp.maximum(jnp.sum(counts_K), 1.0)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(total, xs):
        microbatch, weight = xs
        return jax.tree.map(lambda t, x: t + weight * x, total, grad_fn(state.params, microbatch)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro)))
    ((loss, metrics), grads), _ = lax.scan(accumulate, zeros, (micro, weights_K))
    grads, loss, metrics = psum((grads, loss, metrics), axis_name)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
    if state.skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        kept = state.replace(step=state.step + 1)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new, metrics


def _mean(x_B: jax.Array, axis_name: str | None) -> jax.Array:
    return losses.masked_mean(x_B, jnp.ones_like(x_B), axis_name=axis_name)


def scored_mask(mask_BxT, loss_mask_BxT) -> jax.Array:
    """Which next tokens a causal LM's logits score: `[B, T - 1]`, 1 on real `loss_mask` tokens."""
    return loss_mask_BxT[:, 1:] * mask_BxT[:, 1:]


def sequence_logps(apply_fn, params, ids_BxT, mask_BxT, loss_mask_BxT, temperature: float = 1.0) -> jax.Array:
    """Summed logprobs of the `loss_mask` tokens of each row under a causal LM, its logits
    divided by `temperature` -> `[B]`; position t's logits score token t + 1."""
    logits = apply_fn({"params": params}, ids_BxT, mask_BxT, head_slice=slice(0, -1)).logits / temperature
    return losses.sequence_logprobs(logits, ids_BxT[:, 1:], scored_mask(mask_BxT, loss_mask_BxT))


# Compiled once per model and shape; params stay an argument, never a baked-in constant.
sequence_logps_jit = jax.jit(sequence_logps, static_argnames=("apply_fn",))


def make_sft_step(axis_name: str | None = None):
    """Next-token NLL on the response. Batch: `input_ids`, `attention_mask`, `loss_mask`
    (1 on the tokens to learn, i.e. the response), all `[B, T]`."""

    def learned_tokens(batch):  # [B, T - 1]: which next tokens the loss is on
        return batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]

    def step(state: TrainState, batch, key):
        del key  # SFT has no randomness (dropout is off)

        def loss_fn(params, batch):
            logits = state.apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"],
                                    head_slice=slice(0, -1)).logits
            loss = losses.sft_loss(logits, batch["input_ids"][:, 1:], learned_tokens(batch), axis_name)
            return loss, {}

        return apply_loss(state, loss_fn, batch, lambda batch: jnp.sum(learned_tokens(batch)), axis_name)

    return step


def _scores(state, params, ids, mask, token_types=None):
    kwargs = {} if token_types is None else {"token_type_ids_BxT": token_types}
    return state.apply_fn({"params": params}, ids, mask, **kwargs)[:, 0]


def make_reward_step(kind: str = "regression", axis_name: str | None = None):
    """Reward-model training on a one-output head.

    - "regression": batch `input_ids`, `attention_mask` `[B, T]`, `target` `[B]`; MSE.
    - "pairwise": batch `chosen_ids`, `chosen_mask`, `rejected_ids`, `rejected_mask` `[B, T]`,
      optional `margin` `[B]`; Bradley-Terry loss, with accuracy and margin metrics.
    """
    if kind not in ("regression", "pairwise"):
        raise ConfigError(f"reward kind={kind!r} is not one of ['pairwise', 'regression']")

    def step(state: TrainState, batch, key):
        del key

        def loss_fn(params, batch):
            if kind == "regression":
                pred = _scores(state, params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
                return losses.regression_loss(pred, batch["target"], axis_name), {
                    "reward/pred_mean": _mean(pred, axis_name),
                    "reward/mae": _mean(jnp.abs(pred - batch["target"]), axis_name),
                }
            ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
            mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
            chosen, rejected = jnp.split(_scores(state, params, ids, mask), 2)
            loss = losses.pairwise_reward_loss(chosen, rejected, batch.get("margin", 0.0), axis_name)
            return loss, {
                "reward/accuracy": _mean((chosen > rejected).astype(jnp.float32), axis_name),
                "reward/margin": _mean(chosen - rejected, axis_name),
            }

        return apply_loss(state, loss_fn, batch, rows, axis_name)

    return step


SLIC_REGULARIZERS = ("sequence", "token_mean")


def make_dpo_step(
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    *,
    label_smoothing: float = 0.0,
    average_log_prob: bool | None = None,
    slic_delta: float = 1.0,
    slic_reg_weight: float = 0.1,
    slic_regularizer: str = "sequence",
    axis_name: str | None = None,
):
    """Preference optimisation on pairs: "sigmoid" (DPO), "hinge", "ipo" or "slic" (SLiC-HF).

    Batch: `chosen_ids`, `chosen_mask` (attention), `chosen_loss_mask` (response tokens) and
    the same three for `rejected_`, all `[B, T]`; optionally `ref_chosen_logps` and
    `ref_rejected_logps` `[B]`, the reference's summed sequence logprobs precomputed, else the
    reference is scored in-step from `state.ref_params`. `average_log_prob` length-averages
    the logprobs the loss sees (default: only for IPO, as TRL does).

    SLiC needs no reference. Its regulariser is on the chosen response (the pairs have no
    separate SFT target; the chosen one stands in for it): `slic_regularizer="sequence"` is
    Zhao et al.'s -log pi(y+|x), summed over the response tokens; "token_mean" is its mean
    per token.

    Metrics mean what TRL's DPOTrainer logs under the same names, whatever the loss averages:
    `logps/*` are mean summed logprobs, `rewards/chosen|rejected` beta times the summed log
    ratio to the reference, `rewards/margins|accuracies` from those rewards. For SLiC (no
    reference) `rewards/margins|accuracies` are on the policy's summed logprobs.
    """
    if loss_type not in (*losses.PREFERENCE_LOSSES, "slic"):
        raise ConfigError(f"loss_type={loss_type!r} is not one of {[*losses.PREFERENCE_LOSSES, 'slic']}")
    if slic_regularizer not in SLIC_REGULARIZERS:
        raise ConfigError(f"slic_regularizer={slic_regularizer!r} is not one of {list(SLIC_REGULARIZERS)}")
    average = loss_type == "ipo" if average_log_prob is None else average_log_prob

    def summed_logps(state, params, batch):
        both = [jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("ids", "mask", "loss_mask")]
        return jnp.split(sequence_logps(state.apply_fn, params, *both), 2)

    def step(state: TrainState, batch, key):
        del key
        if loss_type != "slic" and "ref_chosen_logps" not in batch:
            ref = jax.lax.stop_gradient(summed_logps(state, state.ref_params, batch))
            batch = batch | dict(zip(("ref_chosen_logps", "ref_rejected_logps"), ref))

        def loss_fn(params, batch):
            n_chosen, n_rejected = (
                jnp.maximum(jnp.sum(scored_mask(batch[f"{side}_mask"], batch[f"{side}_loss_mask"]), axis=-1), 1.0)
                for side in ("chosen", "rejected"))

            def seen_by_loss(chosen_B, rejected_B):
                """Summed logprobs, or each over its response's length (IPO, as TRL)."""
                return (chosen_B / n_chosen, rejected_B / n_rejected) if average else (chosen_B, rejected_B)

            chosen, rejected = summed_logps(state, params, batch)
            seen_chosen, seen_rejected = seen_by_loss(chosen, rejected)
            metrics = {"logps/chosen": _mean(chosen, axis_name), "logps/rejected": _mean(rejected, axis_name)}
            if loss_type == "slic":
                reg_nll = -chosen if slic_regularizer == "sequence" else -chosen / n_chosen
                per_pair = losses.slic_loss(seen_chosen, seen_rejected, reg_nll, slic_delta, slic_reg_weight)
                margin = chosen - rejected
            else:
                ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
                per_pair = losses.preference_loss(seen_chosen, seen_rejected, *seen_by_loss(ref_chosen, ref_rejected),
                                                  beta, loss_type, label_smoothing)
                r_chosen, r_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
                margin = r_chosen - r_rejected
                metrics |= {"rewards/chosen": _mean(r_chosen, axis_name),
                            "rewards/rejected": _mean(r_rejected, axis_name)}
            metrics |= {"rewards/margins": _mean(margin, axis_name),
                        "rewards/accuracies": _mean((margin > 0).astype(jnp.float32), axis_name)}
            return _mean(per_pair, axis_name), jax.lax.stop_gradient(metrics)

        return apply_loss(state, loss_fn, batch, rows, axis_name)

    return step
