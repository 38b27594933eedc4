"""Reward-model training on a one-output head: regression or pairwise (Bradley-Terry)."""

import jax.numpy as jnp

from jaxrlhf import losses
from jaxrlhf.errors import ConfigError
from jaxrlhf.updates.common import TrainState, apply_loss, mean, rows


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

        def loss_fn(params, batch):
            if kind == "regression":
                pred = _scores(state, params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
                return losses.regression_loss(pred, batch["target"], axis_name), {
                    "reward/pred_mean": mean(pred, axis_name),
                    "reward/mae": mean(jnp.abs(pred - batch["target"]), axis_name),
                }
            ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
            mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
            chosen, rejected = jnp.split(_scores(state, params, ids, mask), 2)
            loss = losses.pairwise_reward_loss(chosen, rejected, batch.get("margin", 0.0), axis_name)
            return loss, {
                "reward/accuracy": mean((chosen > rejected).astype(jnp.float32), axis_name),
                "reward/margin": mean(chosen - rejected, axis_name),
            }

        return apply_loss(state, loss_fn, batch, rows, axis_name, key)  # key: LoRA's dropout, if any

    return step
