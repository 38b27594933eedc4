"""Pure loss functions: no model, no optimizer, masks explicit, shapes `[B]` or `[B, T]`."""

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log p(tokens[b, t]) under softmax(logits[b, t] / temperature) -> `[B, T]`, in float32.

    The caller aligns them: logits at position t score the token at t + 1."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
