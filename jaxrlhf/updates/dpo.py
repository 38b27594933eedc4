"""Preference optimisation on pairs: DPO (sigmoid), hinge, IPO and SLiC-HF."""

import jax
import jax.numpy as jnp

from jaxrlhf import losses
from jaxrlhf.errors import ConfigError
from jaxrlhf.updates.common import TrainState, apply_loss, in_chunks, mean, rows, scored_mask, sequence_logps


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
    reference is scored in-step from `state.reference`. `average_log_prob` length-averages
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
        if loss_type != "slic" and "ref_chosen_logps" not in batch:
            def reference(pairs):  # in the loss's microbatches: one microbatch's logits at a time
                ref = summed_logps(state, state.reference, pairs)
                return dict(zip(("ref_chosen_logps", "ref_rejected_logps"), ref))

            k = state.grad_accum_steps
            batch = batch | jax.lax.stop_gradient(in_chunks(reference, batch, k, f"grad_accum_steps={k} microbatches"))

        def loss_fn(params, batch):
            n_chosen, n_rejected = (
                jnp.maximum(jnp.sum(scored_mask(batch[f"{side}_mask"], batch[f"{side}_loss_mask"]), axis=-1), 1.0)
                for side in ("chosen", "rejected"))

            def seen_by_loss(chosen_B, rejected_B):
                """Summed logprobs, or each over its response's length (IPO, as TRL)."""
                return (chosen_B / n_chosen, rejected_B / n_rejected) if average else (chosen_B, rejected_B)

            chosen, rejected = summed_logps(state, params, batch)
            seen_chosen, seen_rejected = seen_by_loss(chosen, rejected)
            metrics = {"logps/chosen": mean(chosen, axis_name), "logps/rejected": mean(rejected, axis_name)}
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
                metrics |= {"rewards/chosen": mean(r_chosen, axis_name),
                            "rewards/rejected": mean(r_rejected, axis_name)}
            metrics |= {"rewards/margins": mean(margin, axis_name),
                        "rewards/accuracies": mean((margin > 0).astype(jnp.float32), axis_name)}
            return mean(per_pair, axis_name), jax.lax.stop_gradient(metrics)

        return apply_loss(state, loss_fn, batch, rows, axis_name, key)  # key: LoRA's dropout, if any

    return step
