"""Supervised fine-tuning: next-token NLL on the tokens to learn."""

import jax.numpy as jnp

from jaxrlhf import losses
from jaxrlhf.updates.common import TrainState, apply_loss


def make_sft_step(axis_name: str | None = None):
    """Next-token NLL on the response. Batch: `input_ids`, `attention_mask`, `loss_mask`
    (1 on the tokens to learn, i.e. the response), all `[B, T]`."""

    def learned_tokens(batch):  # [B, T - 1]: which next tokens the loss is on
        return batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]

    def step(state: TrainState, batch, key):

        def loss_fn(params, batch):
            logits = state.apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"],
                                    head_slice=slice(0, -1)).logits
            loss = losses.sft_loss(logits, batch["input_ids"][:, 1:], learned_tokens(batch), axis_name)
            return loss, {}

        # The key draws LoRA's dropout, if any (the model's own dropout is off).
        return apply_loss(state, loss_fn, batch, lambda batch: jnp.sum(learned_tokens(batch)), axis_name, key)

    return step
