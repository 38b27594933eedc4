"""What every compiled update shares: the train state, the optimizer, one optimizer update
from a loss (`apply_loss`, with gradient accumulation and the NaN guard), a causal LM's
summed sequence logprobs, a pass over a batch's rows in microbatch-sized chunks (`in_chunks`);
and what the rollout updates (PPO, RLOO, GRPO) share: a policy's response logprobs, the rollout
scored in chunks (`score_responses`), the epochs x minibatches over one permutation of the
global rollout (`minibatch_epochs`), rows gathered over devices and back."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from jaxrlhf import group_losses, losses
from jaxrlhf.config import check_choices
from jaxrlhf.errors import ConfigError
from jaxrlhf.models import lora
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
    # inside the one compiled update; the passes that score a whole batch without gradient (old
    # and reference logprobs, values) run in chunks of the same rows. So the update holds one
    # microbatch's activations and logits at a time, plus whole-batch `[B, N]` scores.
    grad_accum_steps: int = struct.field(pytree_node=False, default=1)
    # LoRA: the frozen base model (also the reference: the adapter off), and the adapters' scale
    # alpha / r; `params` then holds only the trained leaves (`lora.trainable`).
    base_params: Params | None = None
    lora_scale: float | None = struct.field(pytree_node=False, default=None)
    lora_dropout: float = struct.field(pytree_node=False, default=0.0)  # on the adapters' input, in the loss

    @classmethod
    def create(cls, module, params, tx, **frozen) -> "TrainState":
        return cls(apply_fn=module.apply, tx=tx, step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=tx.init(params), **frozen)

    def model_params(self, params: Params, dropout_key: jax.Array | None = None) -> Params:
        """The params a forward pass reads for trained `params` (with LoRA: the base with the
        adapters beside its kernels, `lora.combine`, and their dropout drawn from `dropout_key`
        if given: the loss passes)."""
        if self.base_params is None:
            return params
        dropout = None if dropout_key is None or not self.lora_dropout else (self.lora_dropout, dropout_key)
        return lora.combine(self.base_params, params, self.lora_scale, dropout)

    @property
    def reference(self) -> Params | None:
        """The frozen reference policy's params: `ref_params`, else with LoRA the base (the
        adapter off, no second copy)."""
        return self.base_params if self.ref_params is None else self.ref_params


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same empty state) as torch's `clip_grad_norm_` computes it:
    every gradient times one scalar, min(1, max_norm / norm). optax selects between the gradient
    and gradient / norm * max_norm, and XLA keeps that division a pass of its own over every
    gradient (a divide is too costly to repeat in each consumer), while a multiply by a scalar
    fuses into the AdamW moments. Equal up to rounding when clipping, bitwise otherwise."""

    def update(updates, state, params=None):
        factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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
    parts = [clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    tx = optax.chain(*parts, optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return tx, lr


def rows(batch) -> jax.Array:
    """The number of rows of a batch: the count a per-row mean divides by (see `apply_loss`)."""
    return jnp.float32(jax.tree.leaves(batch)[0].shape[0])


def split_rows(tree, k: int, what: str):
    """Arrays with rows on axis 0 -> `[k, B / k, ...]`, part j holding rows j, j + k, j + 2k, ...
    (so that on a mesh each device's rows split among all k parts); `what` names the k parts
    for the error."""
    b = jax.tree.leaves(tree)[0].shape[0]
    if b % k:
        raise ConfigError(f"a batch of {b} rows does not split into {what}")
    return constrain_rows(jax.tree.map(lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1), tree), axis=1)


def merge_rows(tree):
    """The inverse of `split_rows`: `[k, B / k, ...]` -> `[B, ...]` in the original row order."""
    return constrain_rows(jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree))


def in_chunks(fn, tree, chunks: int, what: str):
    """`fn` (rows `[b, ...]` -> rows `[b, ...]`, each row's result its own) over the rows of
    `tree` in `chunks` chunks, one after another (`lax.map`), split as `split_rows` splits
    them -> the results of all rows, in row order. Only one chunk's activations are live at a
    time: how a pass over a whole batch stays within a loss microbatch's memory."""
    return merge_rows(lax.map(fn, split_rows(tree, chunks, what)))


def apply_loss(state: TrainState, loss_fn, batch, count_fn, axis_name: str | None,
               key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
    """One optimizer update on the whole `batch` (arrays with rows on axis 0).

    `loss_fn(params, batch) -> (loss share, metric shares)`, `params` as a forward pass reads
    them (`state.model_params`): means over `count_fn(batch)`
    (the loss's denominator on this device's batch: its tokens, or `rows`), as shares of the
    mean over devices when `axis_name` is set. The batch is split into
    `state.grad_accum_steps` = k microbatches `[k, B / k, ...]`, microbatch j holding rows
    j, j + k, j + 2k, ... (so that on a mesh each device's rows split among all k), run one
    after another (`lax.scan`); each microbatch's loss, gradient and metrics are scaled by its
    share of the whole batch's count, so their sum (then over devices) is the whole batch's
    mean: k microbatches give the update of one, however their token counts differ. `key` draws
    LoRA's dropout (each microbatch its own), when the state has any."""
    k = state.grad_accum_steps
    micro = split_rows(batch, k, f"grad_accum_steps={k} microbatches")
    counts_K = psum(jax.vmap(count_fn)(micro), axis_name)  # each microbatch's count on all devices
    weights_K = counts_K / jnp.maximum(jnp.sum(counts_K), 1.0)
    # The gradient is taken of the trained leaves alone (with LoRA: no base-sized gradient).
    grad_fn = jax.value_and_grad(lambda params, batch, key: loss_fn(state.model_params(params, key), batch),
                                 has_aux=True)
    keys_K = jax.random.split(key, k) if key is not None and state.lora_dropout else None

    def accumulate(total, xs):
        microbatch, weight, key = xs
        return jax.tree.map(lambda t, x: t + weight * x, total, grad_fn(state.params, microbatch, key)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), None if keys_K is None else keys_K[0]))
    ((loss, metrics), grads), _ = lax.scan(accumulate, zeros, (micro, weights_K, keys_K))
    grads, loss, metrics = psum((grads, loss, metrics), axis_name)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
    if state.skip_nonfinite:  # only what the update changed is chosen (no copy of frozen params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = new.replace(**{f: jax.tree.map(lambda a, b: jnp.where(finite, a, b), getattr(new, f), getattr(state, f))
                             for f in ("params", "opt_state")})
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new, metrics


def mean(x_B: jax.Array, axis_name: str | None) -> jax.Array:
    return losses.masked_mean(x_B, jnp.ones_like(x_B), axis_name=axis_name)


def global_mean(x_B: jax.Array, axis_name: str | None) -> jax.Array:
    """The mean of `x_B` over the global batch (every device's rows), the same on each device."""
    return psum(mean(x_B, axis_name), axis_name)


def response_outputs(apply_fn, params, seq_BxL, attn_BxL, n: int, temperature: float):
    """A policy's logits `[B, N, V]` for the last `n` tokens of `seq`, their logprobs `[B, N]`
    under the tempered softmax, and the values of the states before them (`None` without a
    value head). No LM head runs on the prompt."""
    out = apply_fn({"params": params}, seq_BxL, attn_BxL, head_slice=slice(-n - 1, -1))
    return out.logits, losses.token_logprobs(out.logits, seq_BxL[:, -n:], temperature), out.values


def score_responses(state: TrainState, params, seq_BxL, attn_BxL, n: int, temperature: float,
                    num_minibatches: int, entropy: bool = False) -> dict[str, jax.Array]:
    """A rollout scored under `params` (the policy's or the reference's), without gradient:
    `logprobs` `[B, N]` of the last `n` tokens of `seq` under the tempered softmax, `values`
    `[B, N]` (with a value head) and, if asked, each position's `entropy` `[B, N]`. The rows
    are scored in `num_minibatches` x `state.grad_accum_steps` chunks, one loss microbatch's
    worth each, so no more than one chunk's `[b, N, V]` logits are live at a time."""
    k = state.grad_accum_steps

    def score(rows):
        logits, logprobs, values = response_outputs(state.apply_fn, params, *rows, n, temperature)
        return ({"logprobs": logprobs} | ({} if values is None else {"values": values})
                | ({"entropy": losses.entropy(logits, temperature)} if entropy else {}))

    what = f"num_minibatches x grad_accum_steps = {num_minibatches} x {k} scoring chunks"
    return lax.stop_gradient(in_chunks(score, (seq_BxL, attn_BxL), num_minibatches * k, what))


def all_rows(x, axis_name: str | None):
    """Every device's rows of `x` (a pytree), in global order (under pmap; else `x` itself)."""
    return x if axis_name is None else lax.all_gather(x, axis_name, tiled=True)


def own_rows(x_B: jax.Array, axis_name: str | None) -> jax.Array:
    """This device's rows of a global `[B * devices, ...]` array (the inverse of `all_rows`)."""
    if axis_name is None:
        return x_B
    b = x_B.shape[0] // lax.axis_size(axis_name)
    return lax.dynamic_slice_in_dim(x_B, lax.axis_index(axis_name) * b, b)


def minibatch_epochs(state: TrainState, loss_fn, scored, count_fn, key, epochs: int, num_minibatches: int,
                     axis_name: str | None):
    """`epochs` passes over the rows of `scored` (a dict of arrays, this device's rows), each
    in `num_minibatches` optimizer updates (`apply_loss(state, loss_fn, minibatch, count_fn)`)
    -> (state, metrics stacked `[epochs, num_minibatches]`).

    Each epoch's minibatches are one permutation of the whole rollout, the same on every
    device: under pmap each device gathers the whole rollout and takes its share of each
    minibatch, so N devices give the one-device update."""
    b = jax.tree.leaves(scored)[0].shape[0]
    if b % num_minibatches:
        raise ConfigError(f"{b} rollouts{' per device' if axis_name else ''} do not split into "
                          f"num_minibatches={num_minibatches}")
    mb = b // num_minibatches  # rows of each minibatch on this device
    devices = 1 if axis_name is None else lax.axis_size(axis_name)
    device = 0 if axis_name is None else lax.axis_index(axis_name)
    rollout = all_rows(scored, axis_name)

    def minibatch(state, xs):
        idx, dropout_key = xs
        return apply_loss(state, loss_fn, constrain_rows(jax.tree.map(lambda x: x[idx], rollout)), count_fn,
                          axis_name, dropout_key)

    def epoch(state, epoch_key):
        order = jax.random.permutation(epoch_key, b * devices).reshape(num_minibatches, devices, mb)
        dropout_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), num_minibatches)  # LoRA's, if any
        return lax.scan(minibatch, state, (order[:, device], dropout_keys))

    return lax.scan(epoch, state, jax.random.split(key, epochs))


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


def check_group_config(config, why_two: str) -> None:
    """The checks RLOO's and GRPO's configs share; `why_two`: why the method needs at least two
    samples per prompt."""
    check_choices(config)  # e.g. RLOO's kl_penalty: any other value would silently drop the KL
    if config.num_generations < 2:
        raise ConfigError(f"num_generations={config.num_generations} must be at least 2: {why_two}")
    for name in ("epochs", "num_minibatches"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} must be at least 1")
    if config.beta < 0:
        raise ConfigError(f"beta={config.beta} must be >= 0")
    for name in ("clip_eps", "clip_eps_high"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise ConfigError(f"{name}={getattr(config, name)} must be > 0 (or null)")


def group_rollout_metrics(scores_all_B, std_all_B, resp_BxN, axis_name: str | None) -> Metrics:
    """What TRL's RLOO and GRPO trainers log of a rollout, under their names: `reward` (mean
    score), `reward_std` (its std, Bessel), both of the scored rows (a NaN score, a response
    no reward source scored, left out, as TRL's), `frac_reward_zero_std` (the share of rows
    whose group (or batch) std `std_all_B` is 0: no signal) and `completions/mean_length`.
    `scores_all_B`, `std_all_B`: the global batch's; `resp_BxN`: this device's response mask."""
    return {"reward": group_losses.nanmean(scores_all_B), "reward_std": group_losses.nanstd(scores_all_B),
            "frac_reward_zero_std": group_losses.frac_zero_std(std_all_B),
            "completions/mean_length": global_mean(jnp.sum(resp_BxN, axis=-1), axis_name)}

